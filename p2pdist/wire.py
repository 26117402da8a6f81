"""The scheduler's wire format: msgpack bodies mapped to frozen, validated message classes.

Every message is checked field by field on decode: unknown keys, missing keys and values of
the wrong type are a BadRequest with a one-line reason, never a crash deeper in.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from p2pdist.digest import PIECE_DIGEST_BYTES, parse_digest
from p2pdist.errors import BadRequest

CONTENT_TYPE = "application/msgpack"
MAX_BODY_BYTES = 4 << 20
HOST_KINDS = ("peer", "seed")

M = TypeVar("M")


@dataclass(frozen=True)
class TaskHolding:
    """What a host holds of one task, announced so a restarted scheduler can rebuild its state."""

    task_id: str
    content_length: int
    pieces: bytes  # Bitmap.to_bytes()
    url: str = ""
    piece_digests: list[bytes] = field(default_factory=list)  # only trusted from seeds


@dataclass(frozen=True)
class AnnounceHost:
    """POST /v1/hosts — a peer or seed is alive; sent at start and periodically."""

    host_id: str
    url: str  # where its piece server is reached
    kind: str  # "peer" or "seed"
    upload_slots: int
    tasks: list[TaskHolding] = field(default_factory=list)


@dataclass(frozen=True)
class Register:
    """POST /v1/tasks/register — a peer wants a task. Headers are passed to the seed, never stored."""

    host_id: str
    task_id: str
    url: str  # the origin blob URL
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sync:
    """POST /v1/tasks/sync — report new pieces and failing parents; get fresh parents back."""

    host_id: str
    task_id: str
    new_pieces: list[int] = field(default_factory=list)
    have_digests: int = 0  # digests the peer already holds; the reply sends the rest
    bad_parents: list[str] = field(default_factory=list)  # sent bytes that failed verification
    failed_parents: list[str] = field(default_factory=list)  # timed out or refused
    done: bool = False
    content_length: int | None = None  # set by back-to-source peers that learnt it from the origin


@dataclass(frozen=True)
class SeedProgress:
    """POST /v1/tasks/seed — a seed reports the blob's size and the digests of pieces it verified."""

    host_id: str
    task_id: str
    content_length: int
    first_digest: int  # index of piece_digests[0]
    piece_digests: list[bytes]
    done: bool = False
    error: str = ""


@dataclass(frozen=True)
class Leave:
    """POST /v1/tasks/leave — a peer no longer holds a task."""

    host_id: str
    task_id: str


@dataclass(frozen=True)
class LeaveHost:
    """POST /v1/hosts/leave — a host is shutting down: forget it and everything it held."""

    host_id: str


@dataclass(frozen=True)
class Parent:
    host_id: str
    url: str
    pieces: bytes  # bitmap


@dataclass(frozen=True)
class SyncReply:
    """The answer to Register and Sync."""

    task_id: str
    state: str  # "waiting" (size not known yet), "running", "failed", "back_to_source"
    content_length: int | None = None
    piece_size: int | None = None
    first_digest: int = 0
    piece_digests: list[bytes] = field(default_factory=list)
    parents: list[Parent] = field(default_factory=list)
    reason: str = ""


@dataclass(frozen=True)
class SeedTrigger:
    """POST {seed}/v1/seed/tasks — scheduler tells a seed to fetch a blob from the origin."""

    task_id: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Empty:
    pass


def encode(message: object) -> bytes:
    return msgpack.packb(_to_plain(message), use_bin_type=True)  # type: ignore[no-any-return]


def decode(cls: type[M], body: bytes) -> M:
    """Parse and validate a msgpack body as message `cls`."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"body over {MAX_BODY_BYTES} bytes")
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types for garbage
        raise BadRequest(f"malformed msgpack body: {type(exc).__name__}") from None
    return _build(cls, raw, cls.__name__)


def _to_plain(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: type[M], raw: object, where: str) -> M:
    if not isinstance(raw, dict):
        raise BadRequest(f"{where}: expected a map, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise BadRequest(f"{where}: unknown field {str(unknown[0])[:40]!r}")
    hints = _hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BadRequest(f"{where}: missing field {name!r}")
            continue
        values[name] = _check(hints[name], raw[name], f"{where}.{name}")
    message = cls(**values)
    _validate(message, where)
    return message


def _check(hint: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, value, where)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise BadRequest(f"{where}: expected a list")
        return [_check(inner, v, f"{where}[]") for v in value]
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(value, dict):
            raise BadRequest(f"{where}: expected a map")
        return {_check(key_t, k, where): _check(val_t, v, where) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)  # type: ignore[arg-type]
    if hint is bool:
        if not isinstance(value, bool):
            raise BadRequest(f"{where}: expected a boolean")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
            raise BadRequest(f"{where}: expected a non-negative integer")
        return value
    if hint is str:
        if not isinstance(value, str) or len(value) > 8192:
            raise BadRequest(f"{where}: expected a string of at most 8192 characters")
        return value
    if hint is bytes:
        if not isinstance(value, bytes):
            raise BadRequest(f"{where}: expected bytes")
        return value
    raise TypeError(f"unsupported hint {hint!r}")  # a bug in this module, not bad input


def _validate(message: object, where: str) -> None:
    """Cross-field rules that types alone don't say."""
    if hasattr(message, "task_id"):
        try:
            parse_digest(message.task_id)
        except BadRequest as exc:
            raise BadRequest(f"{where}.task_id: {exc}") from None
    if isinstance(message, AnnounceHost) and message.kind not in HOST_KINDS:
        raise BadRequest(f"{where}.kind: must be one of {', '.join(HOST_KINDS)}")
    for name in ("url",):
        url = getattr(message, name, None)
        if isinstance(url, str) and url and not url.startswith(("http://", "https://")):
            raise BadRequest(f"{where}.{name}: must be an http(s) URL")
    digests = getattr(message, "piece_digests", None)
    if digests and any(len(d) != PIECE_DIGEST_BYTES for d in digests):
        raise BadRequest(f"{where}.piece_digests: each must be {PIECE_DIGEST_BYTES} bytes")
