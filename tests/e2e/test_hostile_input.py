"""Hostile argv items, env values and a working directory on a real sshd, via a RemoteCommand.

A sample of what ``tests/unit/test_hostile_input.py`` generates: each value must come out of
the VM literally, and nothing else may happen there (no file appears in the VM's /tmp).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.fleet import Namespace
from vmfleet.dev.sshd import SshdVM

pytestmark = pytest.mark.e2e

ITEMS = [
    "$(touch /tmp/pwned-subst)", "`touch /tmp/pwned-backtick`", "; touch /tmp/pwned-semi",
    "&& touch /tmp/pwned-and", "| touch /tmp/pwned-pipe", "\ntouch /tmp/pwned-newline\n",
    "' ; touch /tmp/pwned-quote ; '", '" ; touch /tmp/pwned-dquote ; "', "'\"'\"'", "\\",
    "$HOME ${IFS} $((6*7))", "~root", "/tmp/*", "-rf", "--", "-n", ">/tmp/pwned-redirect",
    "a\tb  c", "é☃𝄞 \u202e", "%s %n", "",
]
ENV = {
    "V_SUBST": "$(touch /tmp/pwned-env)", "V_TICKS": "`touch /tmp/pwned-env2`",
    "V_QUOTES": "it's \"quoted\"; touch /tmp/pwned-env3", "V_NEWLINE": "line1\nline2\n",
    "V_EMPTY": "", "V_GLOB": "/tmp/*",
}
WORKDIR = "/tmp/dir $(touch pwned-wd) ; `x` 'q' -"


def tmp_listing(vm: SshdVM) -> set[str]:
    return {p.name for p in vm.host_path("/tmp").iterdir()}


def result(ns: Namespace, name: str) -> dict[str, Any]:
    obj = ns.finished(name, timeout=60)
    (entry,) = obj["status"]["results"]
    return entry


def test_hostile_argv_env_and_working_dir_arrive_literally(
    ns: Namespace, make_vm: Callable[..., SshdVM]
) -> None:
    vm = make_vm("hostile")
    ns.add_vms([vm])
    vm.host_path(WORKDIR).mkdir()
    before = tmp_listing(vm)

    ns.run("argv", vm="hostile", argv=["printf", "[%s]\\n", *ITEMS])
    names = sorted(ENV)
    ns.run("env", vm="hostile", env=ENV,
           command='printf "[%s]\\n" ' + " ".join(f'"${n}"' for n in names))
    ns.run("workdir", vm="hostile", workingDir=WORKDIR, argv=["pwd"])
    ns.run("nul", vm="hostile", argv=["echo", "a\0b"])

    out = result(ns, "argv")
    assert (out["phase"], out["exitCode"]) == ("Succeeded", 0), out
    assert out["stdout"] == "".join(f"[{item}]\n" for item in ITEMS)
    env = result(ns, "env")
    assert (env["phase"], env["exitCode"]) == ("Succeeded", 0), env
    assert env["stdout"] == "".join(f"[{ENV[n]}]\n" for n in names)
    wd = result(ns, "workdir")
    assert wd["stdout"] == WORKDIR + "\n", wd
    nul = result(ns, "nul")
    assert (nul["phase"], nul["reason"]) == ("Failed", "InvalidSpec"), nul
    assert "argv contains a NUL character" in nul["message"]

    # Nothing else happened on the VM: no file in /tmp, nothing in the working directory.
    assert tmp_listing(vm) == before
    assert list(vm.host_path(WORKDIR).iterdir()) == []
    code, home, _ = vm.run("ls -A ~ | grep -c pwned || true")
    assert home.strip() == b"0"
