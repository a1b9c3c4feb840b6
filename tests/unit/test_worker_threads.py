"""A dropped SFTP read-ahead thread is one warning line; other threads keep tracebacks."""

import importlib
import logging
import threading

worker_app = importlib.import_module("remote_tasks.app")  # the package re-exports `app`



def args_for(name, exc):
    thread = threading.Thread(name=name)
    return threading.ExceptHookArgs((type(exc), exc, None, thread))


def test_prefetch_thread_socket_error_is_one_line(caplog, monkeypatch):
    delegated = []
    monkeypatch.setattr(worker_app, "_default_excepthook", delegated.append)
    with caplog.at_level(logging.WARNING, logger="remote_tasks"):
        worker_app._quiet_prefetch_failures(
            args_for("Thread-7 (_prefetch_thread)", OSError("Socket is closed")))
    assert "SFTP read-ahead stopped: Socket is closed" in caplog.text
    assert delegated == []


def test_other_thread_exceptions_keep_their_traceback(caplog, monkeypatch):
    delegated = []
    monkeypatch.setattr(worker_app, "_default_excepthook", delegated.append)
    worker_app._quiet_prefetch_failures(args_for("Thread-8 (worker)", ValueError("real bug")))
    worker_app._quiet_prefetch_failures(
        args_for("Thread-9 (_prefetch_thread)", KeyError("not a connection error")))
    assert [a.thread.name for a in delegated] == ["Thread-8 (worker)", "Thread-9 (_prefetch_thread)"]
    assert "read-ahead" not in caplog.text


def test_the_hook_is_installed():
    assert threading.excepthook is worker_app._quiet_prefetch_failures


def test_paramikos_transport_tracebacks_stay_out_of_the_workers_log(caplog) -> None:
    """A VM resetting a connection: paramiko's one-line error stays, its traceback goes."""
    import logging

    import remote_tasks.app  # noqa: F401 - installs the filter

    transport = logging.getLogger("paramiko.transport")
    with caplog.at_level(logging.DEBUG, logger="paramiko.transport"):
        transport.error("Exception (client): Error reading SSH protocol banner")
        transport.error("Traceback (most recent call last):")
        transport.error('  File "paramiko/transport.py", line 2227, in _check_banner')
        transport.info("Connected (version 2.0, client OpenSSH_9.2p1)")
    assert [r.getMessage() for r in caplog.records] == [
        "Exception (client): Error reading SSH protocol banner",
        "Connected (version 2.0, client OpenSSH_9.2p1)"]
