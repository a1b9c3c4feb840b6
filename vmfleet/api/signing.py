"""Signed messages: the controller signs what it sends, workers verify (Ed25519).

Every message the controller puts on a worker's queue (a command's envelope, a transfer
and its cleanup, the termination of a lost attempt, a health probe) is one argument::

    {"signed": 1, "task": "remote_tasks.execute_on_vm", "expires": 1765062000.0,
     "body": {...}, "signature": "<base64 of 64 bytes>"}

The signature covers the canonical JSON (sorted keys, no spaces, UTF-8) of the whole
message but its ``signature``: the task name (a terminate body cannot be replayed as a
command), the body and ``expires`` (wall-clock seconds since the epoch). The controller
holds the private key (``VMFLEET_SIGNING_KEY_FILE``), workers only the public key
(``VMFLEET_VERIFY_KEY`` or ``VMFLEET_VERIFY_KEY_FILE``). A message that does not verify,
names another task, or has expired is refused (:class:`Refused`) before anything in it
is trusted. This module is pure (no I/O but reading and writing key files).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNED_VERSION: Final = 1
PRIVATE_KEY_FILE: Final = "signing.key"
PUBLIC_KEY_FILE: Final = "verify.pub"


class Refusal:
    """Why a worker refused a message (the ``reason`` label of
    ``vmfleet_messages_refused_total``)."""

    UNSIGNED: Final = "Unsigned"  # not a signed message at all (or of another version)
    BAD_SIGNATURE: Final = "BadSignature"
    WRONG_TASK: Final = "WrongTask"  # signed for another task
    EXPIRED: Final = "Expired"
    NOT_SERVED: Final = "VMNotServed"  # names a VM this worker does not serve
    WRONG_SECRET: Final = "SecretMismatch"  # names a Secret that is not that VM's
    NO_KEY: Final = "NoVerifyKey"  # the worker has no public key: it runs nothing
    ALL: Final = (UNSIGNED, BAD_SIGNATURE, WRONG_TASK, EXPIRED, NOT_SERVED, WRONG_SECRET, NO_KEY)


class Refused(Exception):
    """A message the worker must not run; ``detail`` never repeats the message's content."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SigningKeyError(ValueError):
    """A key file or value vmfleet cannot use."""


def canonical(value: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _signed_part(task: str, body: dict[str, Any], expires: float) -> bytes:
    return canonical({"signed": SIGNED_VERSION, "task": task, "expires": expires, "body": body})


@dataclass(frozen=True)
class Signer:
    """The controller's half: signs each message as it is sent (a resend is signed anew)."""

    key: Ed25519PrivateKey
    ttl_seconds: float

    def sign(self, task: str, body: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        # Through JSON once: the worker verifies what the broker carried (tuples are lists).
        body = json.loads(canonical(body))
        expires = round((time.time() if now is None else now) + self.ttl_seconds, 3)
        signature = self.key.sign(_signed_part(task, body, expires))
        return {"signed": SIGNED_VERSION, "task": task, "expires": expires, "body": body,
                "signature": base64.b64encode(signature).decode()}

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()


@dataclass(frozen=True)
class Verifier:
    """The worker's half: the body of a message the controller signed for ``task``."""

    key: Ed25519PublicKey | None

    def open(self, message: Any, task: str, now: float | None = None) -> dict[str, Any]:
        """The verified body; raises :class:`Refused` (nothing of the message is trusted)."""
        if self.key is None:
            raise Refused(Refusal.NO_KEY, "this worker has no verify key "
                          "(VMFLEET_VERIFY_KEY or VMFLEET_VERIFY_KEY_FILE): it runs nothing")
        if not isinstance(message, dict) or message.get("signed") != SIGNED_VERSION:
            raise Refused(Refusal.UNSIGNED, "not a signed message of version "
                          f"{SIGNED_VERSION}")
        body, expires, signature = message.get("body"), message.get("expires"), message.get("signature")
        if not isinstance(body, dict) or not isinstance(expires, (int, float)) \
                or not isinstance(signature, str):
            raise Refused(Refusal.UNSIGNED, "a signed message lacks its body, expiry or signature")
        try:
            raw = base64.b64decode(signature, validate=True)
            self.key.verify(raw, _signed_part(str(message.get("task")), body, expires))
        except (InvalidSignature, binascii.Error, ValueError) as exc:
            raise Refused(Refusal.BAD_SIGNATURE, "the signature does not verify") from exc
        if message.get("task") != task:
            raise Refused(Refusal.WRONG_TASK, f"signed for another task, delivered to {task}")
        if (time.time() if now is None else now) > expires:
            raise Refused(Refusal.EXPIRED, f"expired at {expires:.3f}")
        return body


# --------------------------------------------------------------------------- keys


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_private_key(pem: str | bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PKCS#8 PEM (what ``openssl genpkey -algorithm ed25519``
    and Helm's ``genPrivateKey "ed25519"`` write)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"not an Ed25519 key but {type(key).__name__}")
    return key


def load_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo) or the base64 of its 32 bytes."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise SigningKeyError(f"not an Ed25519 key but {type(key).__name__}")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise SigningKeyError(f"not an Ed25519 public key: {exc}") from exc


def read_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror}") from exc
    return load_private_key(data)


def write_key_pair(directory: Path) -> tuple[Path, Path]:
    """A new key pair in ``directory`` (the local environment's and the tests' state
    directory), unless one is there: ``(private key file, public key file)``."""
    private, public = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if not private.exists():
        directory.mkdir(parents=True, exist_ok=True)
        key = generate_private_key()
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(private_pem(key))
    public.write_text(public_pem(read_private_key(private).public_key()))
    return private, public


__all__ = ["SigningKeyError", "Refusal", "Refused", "SIGNED_VERSION", "Signer", "Verifier", "canonical",
           "generate_private_key", "load_private_key", "load_public_key", "private_pem",
           "public_pem", "read_private_key", "write_key_pair"]
