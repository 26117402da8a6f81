"""The scheduler's wire format: msgpack bodies mapped to frozen, validated message classes.

Every message is checked field by field on decode: unknown keys, missing keys and values of
the wrong type are a BadRequest with a one-line reason, never a crash deeper in.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgpack

from p2pdist.content.digest import PIECE_DIGEST_BYTES, parse_digest
from p2pdist.content.pieces import piece_size_problem
from p2pdist.errors import BadRequest
from p2pdist.site import location_problem, site_problem

CONTENT_TYPE = "application/msgpack"
MAX_BODY_BYTES = 4 << 20
ATTESTATION_MAX_BYTES = 64  # an Ed25519 signature

M = TypeVar("M")

# Field metadata: the field is not encoded while it holds its default (decoding its absence
# gives the default back). For fields added after peers shipped: an older reader refuses
# unknown fields, and this way it sees the new one only when it carries news.
OMIT_WHEN_DEFAULT = {"omit_when_default": True}


# Literal types, not enums: msgpack carries the plain strings, and mypy checks every value a
# caller writes or compares against (a StrEnum compared with a mistyped string goes unnoticed).
HostKind = Literal[
    "peer",
    "seed",  # fetches from the origin when the scheduler wakes it; only its piece digests are trusted
]
TaskState = Literal[  # what a SyncReply tells the peer to do with its task
    "waiting",  # the blob's size is not known yet, or no seed has announced yet: sync again
    "running",  # fetch pieces from `parents`
    "back_to_source",  # P2P cannot serve this task: fetch it from the origin
    "unknown",  # the scheduler does not know this peer in this task (it restarted?): register again
]
PreheatState = Literal[  # how far a node is with a blob a preheat job asked it to hold
    "running",  # fetching it
    "done",  # holds every verified piece
    "failed",  # gave up: `error` says why
    "unknown",  # was never asked (it restarted?), nor holds it
]
HOST_KINDS: tuple[HostKind, ...] = typing.get_args(HostKind)
TASK_STATES: tuple[TaskState, ...] = typing.get_args(TaskState)


@dataclass(frozen=True)
class TaskHolding:
    """What a host holds of one task, announced so a restarted scheduler can rebuild its state."""

    task_id: str
    content_length: int
    pieces: bytes  # Bitmap.to_bytes()
    url: str = ""
    piece_digests: list[bytes] = field(default_factory=list)  # only trusted from seeds
    # The piece size its pieces are cut at; left out when it is the old rule's (see
    # content.pieces.piece_size_sent). The scheduler ignores a holding of another layout.
    piece_size: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)


@dataclass(frozen=True)
class AnnounceHost:
    """POST /v1/hosts — a peer or seed is alive; sent at start and periodically."""

    host_id: str
    url: str  # where its piece server is reached
    kind: HostKind
    upload_slots: int
    tasks: list[TaskHolding] = field(default_factory=list)
    site: str = ""  # the site (WAN link) it is behind; "" is the one site of an unconfigured cluster
    location: str = ""  # "eu/fr/paris-3": hosts sharing a longer prefix are nearer
    # Its upload cap in bytes/s (None: none): the scheduler cuts the blobs it asks for first
    # into pieces that cross its upload in about a quarter second (pieces.piece_floor_for_upload).
    upload_rate_bps: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)


@dataclass(frozen=True)
class Register:
    """POST /v1/tasks/register — a peer wants a task. Headers are passed to the seed, never stored."""

    host_id: str
    task_id: str
    url: str  # the origin blob URL
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None  # the blob's size, when the peer's access check learnt it


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
    # With content_length: the piece size its store is cut at (left out: the old rule's). The
    # scheduler takes no pieces from a peer whose layout is not the task's.
    piece_size: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)


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
    # With done: the seed's Ed25519 signature over the blob's digest, size and piece digests,
    # made after it checked the blob's sha256 (p2pdist.content.attest); empty without a key.
    attestation: bytes = field(default=b"", metadata=OMIT_WHEN_DEFAULT)
    # The piece size it cut the blob at (left out: the old rule's); the digests are of those pieces.
    piece_size: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)


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
class SiteMembersQuery:
    """POST /v1/sites/members — which hosts share my site? Asked while the scheduler answers,
    kept for when it does not (the site's WAN link is down)."""

    host_id: str


@dataclass(frozen=True)
class SiteMembers:
    """The piece URLs of other hosts in the asker's site (a sample of a big site)."""

    urls: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Parent:
    host_id: str
    url: str
    pieces: bytes  # bitmap
    # A seed: the piece digests in its news are trusted (issue 17). Left out of the encoded
    # message when false, so a peer from before it (which refuses unknown fields) still reads
    # every parent that is not a seed.
    seed: bool = field(default=False, metadata=OMIT_WHEN_DEFAULT)


_MEMO_CLASSES = {Parent}


@dataclass(frozen=True)
class PieceNews:
    """GET {node}/v1/tasks/<digest>/news — what a node holds of a task now (p2pdist/node/news.py).

    `version` changes whenever a piece is stored; a seed adds the digests of its pieces from
    `first_digest` on (children trust them only from a parent the scheduler marked as a seed)."""

    task_id: str
    version: int
    pieces: bytes = b""  # bitmap; empty while the node holds nothing of the task
    complete: bool = False
    first_digest: int = 0
    piece_digests: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class SyncReply:
    """The answer to Register and Sync."""

    task_id: str
    state: TaskState
    content_length: int | None = None
    piece_size: int | None = None
    first_digest: int = 0
    piece_digests: list[bytes] = field(default_factory=list)
    parents: list[Parent] = field(default_factory=list)
    reason: str = ""
    # A seed's, relayed as it came (the scheduler cannot make one).
    attestation: bytes = field(default=b"", metadata=OMIT_WHEN_DEFAULT)


@dataclass(frozen=True)
class SeedTrigger:
    """POST {seed}/v1/seed/tasks — scheduler tells a seed to fetch a blob from the origin.

    When another seed got part-way and died, the trigger carries what it left: the blob's size,
    the digests it computed from the origin's bytes, and peers holding those pieces, so the new
    seed takes them from peers (verified against the digests, and its sha256 still covers every
    byte) and asks the origin only for the rest."""

    task_id: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None
    piece_digests: list[bytes] = field(default_factory=list)
    parents: list[Parent] = field(default_factory=list)
    # The task's piece size, with content_length (left out: the old rule's). Without
    # content_length the seed cuts by the rule with min_piece_size as its floor (left out: the
    # old floor). Both are left out when they say what an older seed does anyway, so an older
    # seed (which refuses unknown fields) refuses only a trigger it would cut wrongly.
    piece_size: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    min_piece_size: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)


@dataclass(frozen=True)
class PreheatBlob:
    """POST {node}/v1/preheat — a preheat job asks a seed or peer to hold a blob before anyone
    pulls it. Headers (the registry credentials) are used for this fetch only, never stored."""

    task_id: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    # For a seed: the floor of the piece size rule, as in SeedTrigger (left out: the old floor).
    min_piece_size: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)


@dataclass(frozen=True)
class PreheatStatus:
    """GET {node}/v1/preheat/<task_id> — how far the node is with a blob it was asked to hold."""

    task_id: str
    state: PreheatState
    content_length: int = 0
    bytes_done: int = 0
    error: str = ""


@dataclass(frozen=True)
class Empty:
    pass


def encode(message: object) -> bytes:
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return msgpack.packb(_encoder(type(message))(message), use_bin_type=True)  # type: ignore[no-any-return]
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


_PLAIN = (int, str, bytes, bool, float, type(None))


def _to_plain(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encoder(type(value))(value)
    if isinstance(value, list | tuple):
        # Piece numbers and digests go out as they are: msgpack packs them itself, and walking
        # them one by one was most of the cost of encoding a sync reply.
        if all(type(v) in _PLAIN for v in value):
            return value
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


# Encoders are compiled once per message class, like the validators below: the scheduler
# encodes a reply per request, and walking it generically (is_dataclass and isinstance on
# every value) cost more than packing it. Fields of plain types go out as they are.
@functools.cache
def _encoder(cls: type) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    optional = tuple((f.name, f.default) for f in fields if f.metadata.get("omit_when_default"))
    left_out = {name for name, _ in optional}
    if any(not _is_plain(hints[name]) for name in left_out):
        raise TypeError(f"{cls.__name__}: only fields of plain types may be left out when default")
    plain = tuple(f.name for f in fields if _is_plain(hints[f.name]) and f.name not in left_out)
    nested = tuple((f.name, _value_encoder(hints[f.name])) for f in fields if not _is_plain(hints[f.name]))

    def encode_message(message: Any) -> Any:
        out = {name: getattr(message, name) for name in plain}
        for name, encode_value in nested:
            out[name] = encode_value(getattr(message, name))
        for name, default in optional:
            if (value := getattr(message, name)) != default:
                out[name] = value
        return out

    return encode_message


# Messages that a sender keeps and sends many times over (the scheduler keeps one Parent per
# peer and names it to each of its children): their plain form is kept beside them, by
# identity, until MEMO_ITEMS are kept.
MEMO_ITEMS = 1 << 16


def _memoized(encode_item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    memo: dict[int, tuple[Any, Any]] = {}

    def encode_kept(message: Any) -> Any:
        kept = memo.get(id(message))
        if kept is not None and kept[0] is message:
            return kept[1]
        if len(memo) >= MEMO_ITEMS:
            memo.clear()
        plain = encode_item(message)
        memo[id(message)] = (message, plain)  # holding the message keeps its id from reuse
        return plain

    return encode_kept


def _is_plain(hint: Any) -> bool:
    """Whether values of `hint` are packed by msgpack as they are (no message inside)."""
    origin = typing.get_origin(hint)
    if origin in (list, dict, types.UnionType, typing.Union):
        return all(_is_plain(arg) for arg in typing.get_args(hint))
    return not dataclasses.is_dataclass(hint)


def _value_encoder(hint: Any) -> Callable[[Any], Any]:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            encode_item = _encoder(item)  # type: ignore[arg-type]
            if item in _MEMO_CLASSES:
                encode_item = _memoized(encode_item)
            return lambda value: [encode_item(v) if type(v) is item else _to_plain(v) for v in value]
    if dataclasses.is_dataclass(hint):
        encode_one = _encoder(hint)  # type: ignore[arg-type]
        return lambda value: encode_one(value) if type(value) is hint else _to_plain(value)
    return _to_plain  # a union or map holding messages: rare, walked generically


def _build(cls: type[M], raw: object, where: str) -> M:
    return _builder(cls, where)(raw)  # type: ignore[no-any-return, arg-type]


# Validators are compiled once per message class (the scheduler decodes every sync): reading
# type hints per message cost more than the scheduling decision itself.
Check = Callable[[object], Any]


@functools.cache
def _builder(cls: type, where: str) -> Check:
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    names = frozenset(f.name for f in fields)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    checks = {f.name: _checker(hints[f.name], f"{where}.{f.name}") for f in fields}

    needed = frozenset(required)

    def build(raw: object) -> Any:
        if not isinstance(raw, dict):
            raise BadRequest(f"{where}: expected a map, got {type(raw).__name__}")
        # Set comparisons first (at C speed, every request), the offender named only on refusal.
        if not names.issuperset(raw):
            unknown = next(key for key in raw if key not in names)
            raise BadRequest(f"{where}: unknown field {str(unknown)[:40]!r}")
        if not needed.issubset(raw):
            missing = next(name for name in required if name not in raw)
            raise BadRequest(f"{where}: missing field {missing!r}")
        message = cls(**{key: checks[key](value) for key, value in raw.items()})
        _validate(message, where)
        return message

    return build


@functools.cache
def _checker(hint: Any, where: str) -> Check:
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        args = typing.get_args(hint)
        (inner,) = [a for a in args if a is not type(None)]
        check_inner = _checker(inner, where)
        if type(None) not in args:
            return check_inner
        return lambda value: None if value is None else check_inner(value)
    if origin is list:
        (item,) = typing.get_args(hint)
        check_item = _checker(item, f"{where}[]")

        # Lists of plain values (a sync's piece numbers, a seed's digests) are checked at C
        # speed when every item is right; a wrong one is found by the item check, with its reason.
        fast: Callable[[list[Any]], bool] | None = None
        if item is int:
            fast = _all_small_ints
        elif item in (str, bytes):
            fast = _all_of_type(item, 8192 if item is str else None)

        def check_list(value: object) -> Any:
            if not isinstance(value, list):
                raise BadRequest(f"{where}: expected a list")
            if fast is not None and fast(value):
                return value
            return [check_item(v) for v in value]

        return check_list
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        check_key, check_val = _checker(key_t, where), _checker(val_t, where)

        def check_dict(value: object) -> Any:
            if not isinstance(value, dict):
                raise BadRequest(f"{where}: expected a map")
            return {check_key(k): check_val(v) for k, v in value.items()}

        return check_dict
    if dataclasses.is_dataclass(hint):
        return _builder(hint, where)  # type: ignore[arg-type]
    if origin is Literal:
        allowed = frozenset(typing.get_args(hint))
        refusal = f"{where}: must be one of {', '.join(typing.get_args(hint))}"

        def check_literal(value: object) -> Any:
            if not isinstance(value, str) or value not in allowed:
                raise BadRequest(refusal)
            return value

        return check_literal
    if hint is bool:

        def check_bool(value: object) -> Any:
            if not isinstance(value, bool):
                raise BadRequest(f"{where}: expected a boolean")
            return value

        return check_bool
    if hint is int:

        def check_int(value: object) -> Any:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
                raise BadRequest(f"{where}: expected a non-negative integer")
            return value

        return check_int
    if hint is str:

        def check_str(value: object) -> Any:
            if not isinstance(value, str) or len(value) > 8192:
                raise BadRequest(f"{where}: expected a string of at most 8192 characters")
            return value

        return check_str
    if hint is bytes:

        def check_bytes(value: object) -> Any:
            if not isinstance(value, bytes):
                raise BadRequest(f"{where}: expected bytes")
            return value

        return check_bytes
    raise TypeError(f"unsupported hint {hint!r}")  # a bug in this module, not bad input


_INT_ONLY = {int}


def _all_small_ints(values: list[Any]) -> bool:
    """Every value a non-negative int below 2**62 (bools excluded), as check_int asks."""
    return not values or (set(map(type, values)) == _INT_ONLY and min(values) >= 0 and max(values) < 1 << 62)


def _all_of_type(kind: type, max_len: int | None) -> Callable[[list[Any]], bool]:
    """Every value of exactly `kind` (and at most `max_len` long), as check_str/check_bytes ask."""
    if max_len is None:
        return lambda values: all(type(v) is kind for v in values)
    limit = max_len

    def all_short(values: list[Any]) -> bool:
        return all(type(v) is kind for v in values) and all(len(v) <= limit for v in values)

    return all_short


def _task_id_problem(task_id: object) -> str | None:
    """Why a task id is not a digest (None: it is one). Ids of a digest's length are cached
    (the same few come in every sync); others are refused without filling the cache."""
    if isinstance(task_id, str) and len(task_id) == DIGEST_CHARS:
        return _digest_problem(task_id)
    return _digest_problem.__wrapped__(task_id)


DIGEST_CHARS = len("sha256:") + 64


@functools.lru_cache(maxsize=4096)
def _digest_problem(task_id: object) -> str | None:
    try:
        parse_digest(task_id)
    except BadRequest as exc:
        return str(exc)
    return None


def _validate(message: object, where: str) -> None:
    """Cross-field rules that types alone don't say."""
    if hasattr(message, "task_id") and (problem := _task_id_problem(message.task_id)) is not None:
        raise BadRequest(f"{where}.task_id: {problem}", code="DIGEST_INVALID")
    for name in ("url",):
        url = getattr(message, name, None)
        if isinstance(url, str) and url and not url.startswith(("http://", "https://")):
            raise BadRequest(f"{where}.{name}: must be an http(s) URL")
    if isinstance(message, AnnounceHost):
        for name, problem in (("site", site_problem(message.site)), ("location", location_problem(message.location))):
            if problem:
                raise BadRequest(f"{where}.{name}: {problem}")
    for name in ("piece_size", "min_piece_size"):
        value = getattr(message, name, None)
        if value is not None and (problem := piece_size_problem(value)) is not None:
            raise BadRequest(f"{where}.{name}: {problem}")
    if len(getattr(message, "attestation", b"")) > ATTESTATION_MAX_BYTES:
        raise BadRequest(f"{where}.attestation: over {ATTESTATION_MAX_BYTES} bytes")
    digests = getattr(message, "piece_digests", None)
    if digests and any(len(d) != PIECE_DIGEST_BYTES for d in digests):
        raise BadRequest(f"{where}.piece_digests: each must be {PIECE_DIGEST_BYTES} bytes")
