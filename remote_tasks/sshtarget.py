"""Reaching a VM: its target (address, user, key, pinned host keys, bastion) and the
errors that end an attempt before or while its command runs.

Host keys are always verified against the pinned keys (``remote_tasks.ssh``); a key that
does not match is refused and never added anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass, field

import paramiko


class SSHError(Exception):
    """Base of the errors that end an attempt before or while the command runs."""

    reason = "TransportError"


class TransportError(SSHError):
    reason = "TransportError"

    def __init__(self, message: str, pgid: int | None = None, nonce: str | None = None) -> None:
        super().__init__(message)
        self.pgid = pgid  # the remote process group, if the command had started
        self.nonce = nonce


class NotStarted(Exception):
    """The gate refused: the wrapper was told nothing and exited without running the command."""


class ChannelOpenFailed(TransportError):
    """No channel could be opened: the command never started, so trying again is safe."""


class AuthFailed(SSHError):
    reason = "AuthFailed"


class HostKeyMismatch(SSHError):
    reason = "HostKeyMismatch"


class CredentialsInvalid(SSHError):
    reason = "CredentialsInvalid"


# An OpenSSH host key type and the key types paramiko may negotiate to get it.
NEGOTIATED_TYPES = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class PinnedKey:
    key_type: str
    blob: bytes

    @classmethod
    def parse(cls, line: str) -> PinnedKey:
        """Parse an OpenSSH public key line (``type base64 [comment]``, or known_hosts style)."""
        fields = line.split()
        # known_hosts lines start with the host pattern(s); skip to the key type.
        while fields and not (fields[0].startswith(("ssh-", "ecdsa-", "sk-"))):
            fields = fields[1:]
        if len(fields) < 2:
            raise CredentialsInvalid(f"host key {line[:40]!r}... is not an OpenSSH public key line")
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except ValueError as exc:
            raise CredentialsInvalid(f"host key of type {fields[0]} is not valid base64") from exc
        return cls(fields[0], blob)


@dataclass(frozen=True)
class SSHTarget:
    """Everything needed to reach one VM. ``key`` identifies a pooled connection."""

    host: str
    port: int
    user: str
    private_key: str = field(repr=False)
    host_keys: tuple[str, ...]
    passphrase: str | None = field(default=None, repr=False)
    connect_timeout: float = 30.0
    # TrustOnFirstUse with no key recorded yet: accept the key the VM offers (the caller
    # records it in status.hostKey; once recorded it is pinned like any other).
    trust_on_first_use: bool = False
    # proxyJump: reach this VM through a direct-tcpip channel of the bastion's connection.
    jump: SSHTarget | None = None
    # spec.allowBecome of the RemoteVM, and its sudo password (become-password), if any.
    allow_become: bool = False
    become_password: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def load_private_key(text: str, passphrase: str | None) -> paramiko.PKey:
    """Load an OpenSSH or PEM private key of any type paramiko supports."""
    errors = []
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(text), password=passphrase)
        except paramiko.PasswordRequiredException as exc:
            raise CredentialsInvalid(
                "the private key is encrypted: add its passphrase to the Secret (key 'passphrase')"
            ) from exc
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(f"{key_class.__name__}: {exc}")
    raise CredentialsInvalid(
        "ssh-privatekey is not a private key paramiko can read (or the passphrase is wrong)"
    )
