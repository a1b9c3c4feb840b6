"""The broker's tenancy fence: every key a namespace's workers touch, and who may touch it.

The namespace is the boundary, the broker included. Every Redis key and channel that a
worker of namespace ``ns`` reads or writes starts with :func:`key_prefix` (``vmfleet.<ns>:``):

- kombu's own keys (the queue lists, ``unacked``, ``unacked_index``, ``unacked_mutex``,
  ``_kombu.binding.*``), through the Redis transport's ``global_keyprefix``
  (:func:`transport_options`): a queue ``vmfleet.<ns>.vm1`` is the list
  ``vmfleet.<ns>:vmfleet.<ns>.vm1``;
- vmfleet's shared state (``vmfleet.state``): claims, cancels, the cancel channel, the
  heartbeats and the reports stream of the controller's scope, and the VMs' slots.

Only the controller's own set of live commands (``vmfleet:live:<scope>``) and the legacy
shared transfer queue's keys (:data:`SHARED_PREFIX`) are outside every namespace.

A namespace's Redis ACL user (:func:`namespace_user`, ``vmfleet-ns-<ns>``) reaches only
that prefix (``~vmfleet.<ns>:*``, ``&vmfleet.<ns>:*``) with the commands a worker needs
(:data:`WORKER_COMMANDS`); the controller's user reaches every ``vmfleet`` key. No name
a product key uses can be a tenant's queue: under a namespace's prefix, a RemoteVM's queue
always begins with ``vmfleet.`` (its queue prefix) and no product key does
(:func:`collides`).

Passwords: the controller derives a namespace's password from its own (HMAC-SHA256 of the
namespace, :func:`derive_password`) when it creates the users itself (the ``Process``
runtime, ``vmfleet dev up``, the tests); the Helm chart generates them into Secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

#: Keys outside every namespace: the legacy shared transfer queue (``vmfleet.transfers``).
SHARED_PREFIX: Final = "vmfleet:shared:"
#: The controller's own keys begin with this (``vmfleet:live:<scope>``); no namespace's do.
CONTROLLER_PREFIX: Final = "vmfleet:"

#: The Secret, in each namespace with workers, holding that namespace's broker URLs.
BROKER_SECRET_NAME: Final = "vmfleet-broker"
#: The key of a namespace's state URL in its broker Secret (beside the broker URL's).
STATE_SECRET_KEY: Final = "state-url"

CONTROLLER_USER: Final = "vmfleet-controller"
TRANSFERS_USER: Final = "vmfleet-transfers"
NAMESPACE_USER_PREFIX: Final = "vmfleet-ns-"

#: The ``default`` user of a Redis that asks who is there: off, so no connection is ever
#: it (with ``default`` off a new connection is unauthenticated until AUTH, and ``off``
#: refuses AUTH as it), yet with every permission. Redis 7 replays its append-only file as
#: ``default`` and re-checks each MULTI/EXEC in it (what every script's writes become:
#: claims, reports) against that user's rules; a bare ``user default off`` drops them all
#: at a restart, with a CRITICAL line in its log (an upstream bug: redis/redis#14541).
DEFAULT_USER_ACL: Final = "user default off resetpass ~* &* +@all"

# What a worker needs (kombu's Redis transport and vmfleet.state): lists, hashes, sets,
# sorted sets, strings, streams, scripts, transactions, pub/sub and its own connection.
# Nothing that lists or reaches beyond the user's keys (SCAN, KEYS, RANDOMKEY, DBSIZE,
# PUBSUB CHANNELS), changes the server (@admin, @dangerous) or is shared by every user
# (FUNCTION, SCRIPT FLUSH/KILL).
WORKER_COMMANDS: Final = (
    "-@all", "+@connection", "+@transaction", "+@list", "+@hash", "+@set", "+@sortedset",
    "+@string", "+@stream", "+@scripting", "+@pubsub", "+@keyspace", "+time",
    "-@admin", "-@dangerous", "-scan", "-randomkey", "-dbsize", "-keys", "-pubsub",
    "-function", "-fcall", "-fcall_ro", "-script|flush", "-script|kill", "-move",
)
#: The controller also reads ``INFO memory`` (``vmfleet_broker_memory_used_ratio``).
CONTROLLER_COMMANDS: Final = (*WORKER_COMMANDS, "+info")
#: ...and, when it creates the namespaces' users itself, ``ACL SETUSER`` and ``ACL SAVE``
#: (into the Redis' ACL file, when it has one: a restarted Redis knows them at once).
PROVISION_COMMANDS: Final = ("+acl|setuser", "+acl|save", "+acl|whoami")

_NAMESPACE_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_namespace(namespace: str) -> str:
    """A Kubernetes namespace name (a DNS label: no glob or separator characters)."""
    if not _NAMESPACE_RE.fullmatch(namespace) or len(namespace) > 63:
        raise ValueError(f"{namespace!r} is not a Kubernetes namespace name")
    return namespace


def key_prefix(namespace: str) -> str:
    """The prefix of every key and channel of the namespace's workers."""
    return f"vmfleet.{check_namespace(namespace)}:"


def transport_options(namespace: str | None) -> dict[str, Any]:
    """kombu Redis transport options: the namespace's ``global_keyprefix`` (None: the
    legacy shared transfer queue's)."""
    return {"global_keyprefix": key_prefix(namespace) if namespace else SHARED_PREFIX}


_QUEUE_RE: Final = re.compile(r"vmfleet\.([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)[.:].+")


def queue_key(queue: str) -> str:
    """The Redis list of a Celery queue: under the prefix of the namespace its name begins
    with (``vmfleet.<ns>.`` or ``vmfleet.<ns>:``): what the queue depth reads."""
    found = _QUEUE_RE.fullmatch(queue)
    return f"{key_prefix(found.group(1))}{queue}" if found else queue


def collides(namespace: str, queue: str) -> str | None:
    """Why ``queue`` may not be a RemoteVM queue of ``namespace`` (None: it may).

    Under the namespace's key prefix kombu and vmfleet keep keys of their own
    (``unacked``, ``claim:…``, ``reports:…``): a queue that does not begin with the
    namespace's queue prefix ``vmfleet.<ns>.`` could be one of them."""
    expected = f"vmfleet.{namespace}."
    if not queue.startswith(expected) or len(queue) == len(expected):
        return f"a queue of namespace {namespace} begins with {expected!r} (got {queue!r})"
    if ":" in queue[len(expected):]:
        return f"{queue!r}: ':' after {expected!r} is reserved for vmfleet's own queues"
    return None


def namespace_user(namespace: str) -> str:
    return f"{NAMESPACE_USER_PREFIX}{check_namespace(namespace)}"


def namespace_rules(namespace: str) -> list[str]:
    """The ACL rules of the namespace's user, without its password."""
    prefix = key_prefix(namespace)
    return [f"~{prefix}*", f"&{prefix}*", *WORKER_COMMANDS]


#: Every vmfleet key and channel, and the pattern of every namespace's cancel channel
#: (``PSUBSCRIBE`` needs the very pattern among the user's channel rules).
ALL_NAMESPACES: Final = ("~vmfleet*", "&vmfleet*", "&vmfleet.*:cancels")


def controller_rules(provision: bool) -> list[str]:
    """The controller's user: every vmfleet key and channel (``~vmfleet*``)."""
    return [*ALL_NAMESPACES, *CONTROLLER_COMMANDS, *(PROVISION_COMMANDS if provision else ())]


def transfers_rules() -> list[str]:
    """The legacy shared transfer worker: every namespace's state, no INFO, no ACL."""
    return [*ALL_NAMESPACES, *WORKER_COMMANDS]


def password_hash(password: str) -> str:
    """The ``#<sha256>`` form of a password in an ACL rule (no clear text in the rule)."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def acl_line(user: str, password: str, rules: list[str]) -> str:
    """One line of an ACL file (``user NAME on #HASH RULES…``)."""
    return " ".join(["user", user, "on", password_hash(password), *rules])


def derive_password(secret: str, namespace: str) -> str:
    """A namespace's password, derived from the controller's: HMAC-SHA256, hex."""
    if not secret:
        raise ValueError("deriving a namespace's broker password needs the controller's password")
    return hmac.new(secret.encode(), f"vmfleet-ns:{namespace}".encode(), hashlib.sha256).hexdigest()


def url_credentials(url: str) -> tuple[str | None, str | None]:
    """The user and password of a ``redis://`` URL (None where absent)."""
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return user, password


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password@`` in place of its own credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redacted(url: str) -> str:
    """The URL without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{name}:***@{host}", parts.path, parts.query, parts.fragment))


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


__all__ = [
    "CONTROLLER_USER", "SHARED_PREFIX", "TRANSFERS_USER", "acl_line", "collides",
    "controller_rules", "derive_password", "is_redis", "key_prefix", "namespace_rules",
    "namespace_user", "queue_key", "redacted", "transfers_rules", "transport_options", "url_credentials",
    "with_credentials",
]
