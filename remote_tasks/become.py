"""``spec.become``: run an action as another user through ``sudo -S``.

The password (when the VM's sudoers wants one) comes only from the RemoteVM's credentials
Secret, key ``become-password``: a file of that name beside the private key when the
Secret is mounted, else the Secret's data. It travels to sudo on the command's channel
(stdin), only after sudo printed its prompt; it is never in argv, the environment, a log
line, status, an Event or a metric. ``SudoDialogue`` reads what sudo says on stderr
before the action runs (pure: bytes in, actions out).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmfleet.api.constants import SECRET_KEY_BECOME_PASSWORD

from .shell import become_prompt, become_ready

log = logging.getLogger("remote_tasks")


@dataclass(frozen=True)
class Become:
    """Who the action runs as, and the sudo password if the VM has one."""

    user: str
    password: str | None = field(default=None, repr=False)

    def password_line(self) -> bytes:
        assert self.password is not None
        return self.password.encode() + b"\n"


class PasswordInvalid(ValueError):
    """The become-password cannot be sent to sudo (it holds a line break)."""


def clean_password(raw: str | None) -> str | None:
    """The password as sudo reads it: one line (a trailing newline of the file dropped)."""
    if raw is None:
        return None
    value = raw[:-1] if raw.endswith("\n") else raw
    value = value[:-1] if value.endswith("\r") else value
    if "\n" in value or "\r" in value:
        raise PasswordInvalid(f"{SECRET_KEY_BECOME_PASSWORD} holds a line break: sudo reads "
                              "one line")
    return value or None


def read_become_password(
    credentials_dir: Path | None, read_secret: Callable[[], Mapping[str, str]]
) -> str | None:
    """The VM's sudo password: ``<credentials_dir>/become-password`` when the Secret is
    mounted, else the Secret's data (``read_secret``); None when there is none (NOPASSWD)."""
    if credentials_dir is not None:
        path = credentials_dir / SECRET_KEY_BECOME_PASSWORD
        return clean_password(path.read_text()) if path.exists() else None
    return clean_password(read_secret().get(SECRET_KEY_BECOME_PASSWORD))


def refusal(vm: str, allow_become: bool, become_user: str | None) -> str | None:
    """Why a command with ``become`` may not run on this VM (None: it may)."""
    if become_user is None or allow_become:
        return None
    return (f"RemoteVM {vm} does not allow become (spec.allowBecome is false): the command "
            f"was not run as {become_user}; set allowBecome: true on the RemoteVM to allow it")


class Step(enum.Enum):
    SEND_PASSWORD = "send-password"
    READY = "ready"  # sudo let the action run: stdin is the action's from now on
    FAILED = "failed"


@dataclass
class SudoDialogue:
    """What sudo said before the action ran: its prompt, or the action's ready line.

    ``feed(stderr bytes)`` returns the bytes that are the command's own stderr (prompts
    and the ready line removed) and the steps to take: send the password at the first
    prompt; a second prompt (wrong password) or a prompt with no password fails at once,
    instead of sudo waiting on stdin. ``failure`` says why.
    """

    nonce: str
    has_password: bool
    prompts: int = 0
    ready: bool = False
    failure: str | None = None
    _held: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self._prompt = become_prompt(self.nonce).encode()
        self._ready = become_ready(self.nonce).encode() + b"\n"

    def feed(self, data: bytes) -> tuple[bytes, list[Step]]:
        if self.ready or self.failure is not None:
            return data, []
        self._held += data
        out = bytearray()
        steps: list[Step] = []
        while not self.ready and self.failure is None:
            p = self._held.find(self._prompt)
            r = self._held.find(self._ready)
            if p < 0 and r < 0:
                # keep what could be the start of a marker; the rest is stderr
                keep = max(len(self._prompt), len(self._ready)) - 1
                cut = max(len(self._held) - keep, 0)
                out += self._held[:cut]
                del self._held[:cut]
                break
            if r >= 0 and (p < 0 or r < p):
                out += self._held[:r]
                rest = bytes(self._held[r + len(self._ready):])
                self._held.clear()
                out += rest
                self.ready = True
                steps.append(Step.READY)
                break
            out += self._held[:p]
            del self._held[:p + len(self._prompt)]
            self.prompts += 1
            if not self.has_password:
                self.failure = ("sudo asked for a password and the RemoteVM's credentials Secret "
                                f"has no {SECRET_KEY_BECOME_PASSWORD!r} key")
                steps.append(Step.FAILED)
            elif self.prompts > 1:
                self.failure = ("sudo refused the password (the credentials Secret's "
                                f"{SECRET_KEY_BECOME_PASSWORD!r})")
                steps.append(Step.FAILED)
            else:
                steps.append(Step.SEND_PASSWORD)
        return bytes(out), steps

    def flush(self) -> bytes:
        """What is still held back (the channel ended): it is stderr."""
        held = bytes(self._held)
        self._held.clear()
        return held


def become_for(user: str | None, password: str | None) -> Become | None:
    return Become(user, password) if user is not None else None


__all__ = ["Become", "PasswordInvalid", "Step", "SudoDialogue", "become_for", "clean_password",
           "read_become_password", "refusal"]
