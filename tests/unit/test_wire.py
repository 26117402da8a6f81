"""The scheduler wire format: round trips and strict validation of every field."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from p2pdist import wire
from p2pdist.content.pieces import piece_size_read, piece_size_sent
from p2pdist.errors import BadRequest
from p2pdist.wire import (
    AnnounceHost,
    Empty,
    Leave,
    Parent,
    Register,
    SeedProgress,
    SeedTrigger,
    Sync,
    SyncReply,
    TaskHolding,
    decode,
    encode,
)

TASK = "sha256:" + "ab" * 32
D = bytes(range(32))


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


MESSAGES: list[object] = [
    TaskHolding(task_id=TASK, content_length=10, pieces=b"\x80", url="http://o/x", piece_digests=[D]),
    AnnounceHost(host_id="h1", url="http://127.0.0.1:4000", kind="peer", upload_slots=16),
    AnnounceHost(
        host_id="s1",
        url="https://seed:4010",
        kind="seed",
        upload_slots=32,
        tasks=[
            TaskHolding(task_id=TASK, content_length=9 << 20, pieces=b"\xe0", piece_digests=[D, D, D]),
        ],
    ),
    Register(host_id="h1", task_id=TASK, url="http://origin/v2/r/blobs/" + TASK, headers={"Authorization": "Bearer x"}),
    Sync(
        host_id="h1",
        task_id=TASK,
        new_pieces=[0, 5],
        have_digests=3,
        bad_parents=["p"],
        failed_parents=["q"],
        done=True,
        content_length=123,
    ),
    Sync(host_id="h1", task_id=TASK),
    SeedProgress(host_id="s", task_id=TASK, content_length=0, first_digest=2, piece_digests=[D], done=True, error=""),
    Leave(host_id="h", task_id=TASK),
    Parent(host_id="p", url="http://p:1", pieces=b"\xff\x00"),
    SyncReply(
        task_id=TASK,
        state="running",
        content_length=5,
        piece_size=4 << 20,
        first_digest=1,
        piece_digests=[D],
        parents=[Parent(host_id="p", url="http://p:1", pieces=b"\x80", seed=True)],
    ),
    SyncReply(task_id=TASK, state="waiting"),
    SyncReply(task_id=TASK, state="back_to_source", reason="no seed peer available"),
    SyncReply(task_id=TASK, state="unknown", reason="register first"),
    SeedTrigger(task_id=TASK, url="http://o/b", headers={"a": "b"}),
    Empty(),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    body = encode(message)
    assert isinstance(body, bytes)
    assert decode(type(message), body) == message


def test_a_parent_from_before_peer_news_decodes_as_not_a_seed() -> None:
    parent = decode(Parent, pack({"host_id": "p", "url": "http://p:1", "pieces": b"\x80"}))
    assert parent.seed is False
    with pytest.raises(BadRequest, match="Parent.seed: expected a boolean"):
        decode(Parent, pack({"host_id": "p", "url": "http://p:1", "pieces": b"", "seed": 1}))


def test_defaults_filled_when_absent() -> None:
    sync = decode(Sync, pack({"host_id": "h", "task_id": TASK}))
    assert sync.new_pieces == [] and sync.have_digests == 0 and sync.done is False
    assert sync.content_length is None
    assert decode(Sync, pack({"host_id": "h", "task_id": TASK, "content_length": None})).content_length is None


def bad(cls: type, body: bytes, match: str) -> str:
    with pytest.raises(BadRequest, match=match) as info:
        decode(cls, body)
    return str(info.value)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1a", pack({}) + b"\x00", b"\xde\xff\xff"])
def test_malformed_msgpack(body: bytes) -> None:
    bad(Leave, body, "malformed msgpack")


def test_body_too_large() -> None:
    bad(Leave, b"\x00" * (wire.MAX_BODY_BYTES + 1), "body over")


@pytest.mark.parametrize("raw", [[1, 2], "str", 5, None, b"x"])
def test_non_map_body(raw: object) -> None:
    bad(Leave, pack(raw), "Leave: expected a map")


def test_non_string_map_key_rejected() -> None:
    bad(Leave, pack({1: "x"}), "malformed msgpack")


def test_unknown_field() -> None:
    msg = bad(Leave, pack({"host_id": "h", "task_id": TASK, "sneaky": 1}), "unknown field 'sneaky'")
    assert msg.startswith("Leave")


def test_missing_required_field() -> None:
    bad(Register, pack({"host_id": "h", "task_id": TASK}), r"Register: missing field 'url'")
    bad(
        SeedProgress,
        pack({"host_id": "s", "task_id": TASK, "content_length": 1, "first_digest": 0}),
        "missing field 'piece_digests'",
    )


BASE_SYNC = {"host_id": "h", "task_id": TASK}


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("have_digests", "3", "Sync.have_digests: expected a non-negative integer"),
        ("have_digests", True, "Sync.have_digests: expected a non-negative integer"),
        ("have_digests", -1, "Sync.have_digests: expected a non-negative integer"),
        ("have_digests", 1.0, "Sync.have_digests: expected a non-negative integer"),
        ("have_digests", 1 << 62, "Sync.have_digests: expected a non-negative integer"),
        ("content_length", -5, "Sync.content_length"),
        ("content_length", "5", "Sync.content_length"),
        ("new_pieces", 3, r"Sync.new_pieces: expected a list"),
        ("new_pieces", [1, "2"], r"Sync.new_pieces\[\]"),
        ("new_pieces", [1, -2], r"Sync.new_pieces\[\]"),
        ("new_pieces", [True], r"Sync.new_pieces\[\]"),
        ("done", 1, "Sync.done: expected a boolean"),
        ("done", "true", "Sync.done: expected a boolean"),
        ("bad_parents", [1], r"Sync.bad_parents\[\]: expected a string"),
        ("host_id", 5, "Sync.host_id: expected a string"),
        ("host_id", b"h", "Sync.host_id: expected a string"),
        ("host_id", "x" * 8193, "Sync.host_id: expected a string of at most"),
    ],
)
def test_wrong_types(field: str, value: object, match: str) -> None:
    bad(Sync, pack({**BASE_SYNC, field: value}), match)


def test_wrong_types_bytes_and_maps() -> None:
    bad(Parent, pack({"host_id": "p", "url": "http://p", "pieces": "not bytes"}), "Parent.pieces: expected bytes")
    bad(
        Register,
        pack({"host_id": "h", "task_id": TASK, "url": "http://o", "headers": ["a"]}),
        "Register.headers: expected a map",
    )
    bad(Register, pack({"host_id": "h", "task_id": TASK, "url": "http://o", "headers": {"a": 1}}), "Register.headers")


@pytest.mark.parametrize(
    "task_id",
    ["sha256:" + "AB" * 32, "sha256:" + "ab" * 31, "ab" * 32, "sha256:" + "ab" * 32 + "a", "", "sha512:" + "ab" * 32],
)
def test_invalid_task_id(task_id: str) -> None:
    bad(Leave, pack({"host_id": "h", "task_id": task_id}), "Leave.task_id: invalid digest")


def test_invalid_task_id_nested_in_announce() -> None:
    body = pack(
        {
            "host_id": "h",
            "url": "http://h:1",
            "kind": "peer",
            "upload_slots": 1,
            "tasks": [{"task_id": "sha256:short", "content_length": 1, "pieces": b"\x80"}],
        }
    )
    bad(AnnounceHost, body, r"AnnounceHost.tasks\[\].task_id: invalid digest")


def test_piece_digests_wrong_length() -> None:
    base = {"host_id": "s", "task_id": TASK, "content_length": 1, "first_digest": 0}
    bad(SeedProgress, pack({**base, "piece_digests": [D, D[:31]]}), "piece_digests: each must be 32 bytes")
    bad(SeedProgress, pack({**base, "piece_digests": [D + b"x"]}), "piece_digests: each must be 32 bytes")
    bad(SeedProgress, pack({**base, "piece_digests": ["a" * 32]}), r"piece_digests\[\]: expected bytes")
    holding = {"task_id": TASK, "content_length": 1, "pieces": b"\x80", "piece_digests": [b"short"]}
    bad(
        AnnounceHost,
        pack({"host_id": "s", "url": "http://s:1", "kind": "seed", "upload_slots": 1, "tasks": [holding]}),
        "piece_digests",
    )


@pytest.mark.parametrize("kind", ["Peer", "SEED", "origin", ""])
def test_announce_kind(kind: str) -> None:
    body = pack({"host_id": "h", "url": "http://h:1", "kind": kind, "upload_slots": 1})
    bad(AnnounceHost, body, "AnnounceHost.kind: must be one of peer, seed")


@pytest.mark.parametrize("state", ["failed", "RUNNING", "", "done", 1, None, b"running"])
def test_reply_state_is_one_the_scheduler_sends(state: object) -> None:
    bad(
        SyncReply,
        pack({"task_id": TASK, "state": state}),
        "SyncReply.state: must be one of waiting, running, back_to_source, unknown$",
    )


def test_an_announce_carries_an_upload_cap_only_when_there_is_one() -> None:
    """A host with no cap sends what a host from before the field sent (a scheduler from
    before reads it); a capped one sends its cap, which must be an integer."""
    plain = AnnounceHost(host_id="h", url="http://h:1", kind="peer", upload_slots=1)
    assert "upload_rate_bps" not in msgpack.unpackb(encode(plain))
    capped = AnnounceHost(host_id="h", url="http://h:1", kind="peer", upload_slots=1, upload_rate_bps=8 << 20)
    assert decode(AnnounceHost, encode(capped)).upload_rate_bps == 8 << 20
    body = pack({"host_id": "h", "url": "http://h:1", "kind": "peer", "upload_slots": 1, "upload_rate_bps": "fast"})
    bad(AnnounceHost, body, "upload_rate_bps")


def test_decoded_kind_and_state_are_plain_strings() -> None:
    """msgpack carries plain strings both ways: nothing but the value crosses the wire."""
    host = decode(AnnounceHost, encode(AnnounceHost(host_id="s", url="http://s:1", kind="seed", upload_slots=1)))
    reply = decode(SyncReply, encode(SyncReply(task_id=TASK, state="running")))
    assert (type(host.kind), host.kind, type(reply.state), reply.state) == (str, "seed", str, "running")


@pytest.mark.parametrize("url", ["ftp://h:1", "h:1", "file:///etc/passwd", "javascript:alert(1)", "HTTP//x"])
def test_url_must_be_http(url: str) -> None:
    bad(
        AnnounceHost,
        pack({"host_id": "h", "url": url, "kind": "peer", "upload_slots": 1}),
        "AnnounceHost.url: must be an http",
    )
    bad(Register, pack({"host_id": "h", "task_id": TASK, "url": url}), "Register.url: must be an http")


def test_encode_is_plain_msgpack() -> None:
    raw = msgpack.unpackb(encode(Leave(host_id="h", task_id=TASK)), raw=False)
    assert raw == {"host_id": "h", "task_id": TASK}


def test_a_parent_that_is_not_a_seed_is_encoded_without_the_seed_field() -> None:
    # A peer from before peer news refuses unknown fields: it must still read a reply whose
    # parents are not seeds, and a seed parent must still say so to a newer peer.
    reply = SyncReply(
        task_id=TASK,
        state="running",
        content_length=5,
        piece_size=4 << 20,
        parents=[
            Parent(host_id="p", url="http://p:1", pieces=b"\x80"),
            Parent(host_id="s", url="http://s:1", pieces=b"\x80", seed=True),
        ],
    )
    raw = msgpack.unpackb(encode(reply), raw=False)
    assert raw["parents"][0] == {"host_id": "p", "url": "http://p:1", "pieces": b"\x80"}
    assert raw["parents"][1]["seed"] is True
    assert decode(SyncReply, encode(reply)) == reply
    assert "seed" not in msgpack.unpackb(encode(Parent(host_id="p", url="http://p:1", pieces=b"")), raw=False)


def test_attestation_is_encoded_only_when_there_is_one() -> None:
    # Added with verify once: a scheduler or peer from before it refuses unknown fields, so
    # a reply or seed report without a signature must not carry the empty field.
    reply = SyncReply(task_id=TASK, state="running")
    assert "attestation" not in msgpack.unpackb(encode(reply), raw=False)
    assert decode(SyncReply, encode(reply)) == reply
    signed = SyncReply(task_id=TASK, state="running", attestation=b"s" * 64)
    assert msgpack.unpackb(encode(signed), raw=False)["attestation"] == b"s" * 64
    assert decode(SyncReply, encode(signed)) == signed
    progress = SeedProgress(host_id="seed", task_id=TASK, content_length=5, first_digest=0, piece_digests=[])
    assert "attestation" not in msgpack.unpackb(encode(progress), raw=False)
    assert decode(SeedProgress, encode(progress)) == progress


def _older_reader(cls: type, body: bytes) -> dict[str, Any]:
    """What a reader from before the piece size travelled sees: it refuses any field its
    message class does not have, here every field named *piece_size."""
    raw = msgpack.unpackb(body, raw=False)
    unknown = [key for key in raw if key in ("piece_size", "min_piece_size")]
    if unknown:
        raise BadRequest(f"{cls.__name__}: unknown field {unknown[0]!r}")
    for holding in raw.get("tasks", []):
        if "piece_size" in holding:
            raise BadRequest("TaskHolding: unknown field 'piece_size'")
    return raw  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "message",
    [
        TaskHolding(task_id=TASK, content_length=9 << 20, pieces=b"\xe0", piece_size=2 << 20),
        Sync(host_id="h", task_id=TASK, content_length=9 << 20, piece_size=2 << 20),
        SeedProgress(
            host_id="s", task_id=TASK, content_length=9 << 20, first_digest=0, piece_digests=[D], piece_size=2 << 20
        ),
        SeedTrigger(task_id=TASK, url="http://o/b", content_length=9 << 20, piece_size=2 << 20),
        SeedTrigger(task_id=TASK, url="http://o/b", min_piece_size=2 << 20),
        wire.PreheatBlob(task_id=TASK, url="http://o/b", min_piece_size=1 << 20),
    ],
    ids=lambda m: type(m).__name__,
)
def test_a_piece_size_round_trips_and_an_older_reader_refuses_it(message: Any) -> None:
    body = encode(message)
    assert decode(type(message), body) == message
    with pytest.raises(BadRequest, match="piece_size"):
        _older_reader(type(message), body)


def test_a_piece_size_of_the_old_rule_is_left_out_for_older_readers() -> None:
    """A node or scheduler cutting by the old rule (min_piece_bytes 4 MiB during an upgrade)
    sends what an older version sends, byte for byte: the field left out."""
    size = 9 << 20
    sent = piece_size_sent(size, 4 << 20)
    messages: list[Any] = [
        AnnounceHost(
            host_id="s1",
            url="http://s:1",
            kind="seed",
            upload_slots=4,
            tasks=[TaskHolding(task_id=TASK, content_length=size, pieces=b"\xe0", piece_size=sent)],
        ),
        Sync(host_id="h", task_id=TASK, content_length=size, piece_size=sent),
        SeedProgress(host_id="s", task_id=TASK, content_length=size, first_digest=0, piece_digests=[], piece_size=sent),
        SeedTrigger(task_id=TASK, url="http://o/b", content_length=size, piece_size=sent, min_piece_size=None),
        wire.PreheatBlob(task_id=TASK, url="http://o/b"),
    ]
    for message in messages:
        body = encode(message)
        _older_reader(type(message), body)  # no unknown field
        decoded = decode(type(message), body)
        assert decoded == message
    assert piece_size_read(size, decode(Sync, encode(messages[1])).piece_size) == 4 << 20
    # And what an older sender sends reads as the old rule.
    old = decode(Sync, pack({"host_id": "h", "task_id": TASK, "content_length": size}))
    assert old.piece_size is None and piece_size_read(size, old.piece_size) == 4 << 20


@pytest.mark.parametrize("value", [3 << 20, 1 << 19, 128 << 20, 0])
@pytest.mark.parametrize("cls", [Sync, SeedProgress, SyncReply, SeedTrigger, TaskHolding])
def test_a_piece_size_that_is_not_one_is_refused(cls: type, value: int) -> None:
    fields: dict[type, dict[str, Any]] = {
        Sync: {"host_id": "h", "task_id": TASK},
        SeedProgress: {"host_id": "s", "task_id": TASK, "content_length": 5, "first_digest": 0, "piece_digests": []},
        SyncReply: {"task_id": TASK, "state": "running"},
        SeedTrigger: {"task_id": TASK, "url": "http://o/b"},
        TaskHolding: {"task_id": TASK, "content_length": 5, "pieces": b"\x80"},
    }
    bad(cls, pack({**fields[cls], "piece_size": value}), f"{cls.__name__}.piece_size: piece size {value} is not")
    if cls is SeedTrigger:
        bad(cls, pack({**fields[cls], "min_piece_size": value}), "SeedTrigger.min_piece_size: piece size")
