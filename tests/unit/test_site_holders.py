"""Site holders found without the scheduler (peer/sitepeers.py): a holder's answer is checked
field by field, holders that disagree are outvoted, and the site_peers key parses."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from p2pdist import wire
from p2pdist.config import ConfigError, PeerConfig, SchedulerConfig, from_mapping
from peer.sitepeers import (
    MAX_MEMBERS,
    MEMBER_TTL_S,
    SitePeers,
    agreeing,
    merge_members,
    parse_holding,
    parse_manifest,
)
from scheduler.state import Scheduler

TASK = "sha256:" + "cd" * 32
MiB = 1 << 20


def answer(**changes: object) -> bytes:
    body: dict[str, object] = {
        "digest": TASK,
        "host_id": "peer-1",
        "size": 9 * MiB,  # 3 pieces of 4 MiB
        "piece_digests": ["aa" * 32, "bb" * 32, "cc" * 32],
        "public": [{"registry": "http://r:5000", "repository": "edge/app", "age_s": 12.5}],
    }
    body.update(changes)
    return json.dumps(body).encode()


def test_a_well_formed_answer_is_a_holder() -> None:
    holder = parse_holding("http://10.0.0.2:4000", TASK, answer())
    assert holder is not None
    assert (holder.host_id, holder.size, len(holder.piece_digests)) == ("peer-1", 9 * MiB, 3)
    assert holder.public[0].name == "edge/app" and holder.public[0].age_s == 12.5


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        answer(digest="sha256:" + "ef" * 32),  # another blob
        answer(size=-1),
        answer(size="9"),
        answer(size=True),
        answer(piece_digests=["aa" * 32]),  # too few for the size
        answer(piece_digests=["aa" * 31, "bb" * 32, "cc" * 32]),  # a short digest
        answer(piece_digests=["zz" * 32, "bb" * 32, "cc" * 32]),
        answer(host_id=""),
        answer(host_id=7),
        answer(public=[{"registry": "r"}]),
    ],
)
def test_a_malformed_answer_is_no_holder(body: bytes) -> None:
    assert parse_holding("http://10.0.0.2:4000", TASK, body) is None


def test_an_answer_carries_its_piece_size_and_the_digests_are_counted_against_it() -> None:
    five = ["aa" * 32, "bb" * 32, "cc" * 32, "dd" * 32, "ee" * 32]
    holder = parse_holding("http://10.0.0.2:4000", TASK, answer(piece_size=2 * MiB, piece_digests=five))
    assert holder is not None and holder.piece_size == 2 * MiB and len(holder.piece_digests) == 5
    # Without it, a holder from before the piece size travelled: the old rule (4 MiB here).
    old = parse_holding("http://10.0.0.2:4000", TASK, answer())
    assert old is not None and old.piece_size == 4 * MiB
    for body in (
        answer(piece_size=2 * MiB),  # 3 digests: the count of 4 MiB pieces, not of 2 MiB ones
        answer(piece_digests=five),  # 5 digests, no piece size: not the old rule's count
        answer(piece_size=3 * MiB),
        answer(piece_size=128 * MiB),
        answer(piece_size="2MiB"),
        answer(piece_size=True),
    ):
        assert parse_holding("http://10.0.0.2:4000", TASK, body) is None


def test_holders_cut_otherwise_do_not_agree() -> None:
    same = ["aa" * 32, "bb" * 32, "cc" * 32]
    four = parse_holding("http://10.0.0.2:4000", TASK, answer(host_id="p2", piece_digests=same))
    eight = parse_holding(
        "http://10.0.0.3:4000", TASK, answer(host_id="p3", piece_digests=same[:2], piece_size=8 * MiB)
    )
    eight_too = parse_holding(
        "http://10.0.0.4:4000", TASK, answer(host_id="p4", piece_digests=same[:2], piece_size=8 * MiB)
    )
    holders = [h for h in (four, eight, eight_too) if h is not None]
    assert len(holders) == 3
    assert {h.host_id for h in agreeing(holders)} == {"p3", "p4"}


def test_the_holders_that_agree_most_win() -> None:
    good = [parse_holding(f"http://10.0.0.{i}:4000", TASK, answer(host_id=f"p{i}")) for i in (2, 3)]
    liar = parse_holding("http://10.0.0.9:4000", TASK, answer(host_id="p9", piece_digests=["dd" * 32] * 3))
    holders = [h for h in (*good, liar) if h is not None]
    assert {h.host_id for h in agreeing(holders)} == {"p2", "p3"}
    assert agreeing([]) == []


def test_site_peers_take_host_port_entries_names_and_urls() -> None:
    config = from_mapping(
        PeerConfig, {"site_peers": ["10.0.0.2:4000", "peers.store-12.internal:4000", "https://10.0.0.3:4000/"]}
    )
    assert config.site_peers == ("10.0.0.2:4000", "peers.store-12.internal:4000", "https://10.0.0.3:4000")
    assert from_mapping(PeerConfig, {"site_peers": "10.0.0.2:4000"}).site_peers == ("10.0.0.2:4000",)
    for bad in ("10.0.0.2", "host:port", "a b:4000", "user@host:4000", 7):
        with pytest.raises(ConfigError, match="site_peers"):
            from_mapping(PeerConfig, {"site_peers": [bad]})


def test_site_members_named_by_the_scheduler_are_merged_newest_first_and_expire() -> None:
    own = "http://10.0.0.1:4000"
    members = merge_members({}, ["http://10.0.0.2:4000/", own, "not a url"], own, now=100.0)
    assert members == {"http://10.0.0.2:4000": 100.0}
    # A big site is named a sample at a time: the others stay until MEMBER_TTL_S passes.
    members = merge_members(members, ["http://10.0.0.3:4000"], own, now=200.0)
    assert list(members) == ["http://10.0.0.3:4000", "http://10.0.0.2:4000"]
    assert list(merge_members(members, [], own, now=100.0 + MEMBER_TTL_S + 1)) == ["http://10.0.0.3:4000"]
    many = merge_members({}, [f"http://10.0.{i // 250}.{i % 250}:4000" for i in range(MAX_MEMBERS + 10)], own, 1.0)
    assert len(many) == MAX_MEMBERS


def test_the_scheduler_names_a_hosts_site_members_and_nobody_outside_a_named_site() -> None:
    state = Scheduler(SchedulerConfig(), rng=random.Random(1))
    for host_id, site in (("a", "store-1"), ("b", "store-1"), ("c", "store-2"), ("d", ""), ("e", "")):
        state.announce(
            wire.AnnounceHost(host_id=host_id, url=f"http://{host_id}:4000", kind="peer", upload_slots=1, site=site),
            now=1.0,
        )
    assert state.members_of_site("a", 64) == ["http://b:4000"]
    assert state.members_of_site("c", 64) == []
    assert state.members_of_site("d", 64) == []  # the unnamed site: no site to keep apart
    assert state.members_of_site("unknown", 64) == []
    state.leave_host("b", now=2.0)
    assert state.members_of_site("a", 64) == []
    # A host that moves to another site is a member of the new one only.
    state.announce(
        wire.AnnounceHost(host_id="c", url="http://c:4000", kind="peer", upload_slots=1, site="store-1"), 3.0
    )
    assert state.members_of_site("a", 64) == ["http://c:4000"]
    assert "store-2" not in state.site_members
    for i in range(100):
        state.announce(
            wire.AnnounceHost(host_id=f"x{i}", url=f"http://x{i}:4000", kind="peer", upload_slots=1, site="big"), 4.0
        )
    named = state.members_of_site("x0", 10)
    assert len(named) == 10 and "http://x0:4000" not in named
    wire.decode(wire.SiteMembers, wire.encode(wire.SiteMembers(urls=named)))


async def test_site_peers_names_resolve_to_every_address_and_the_own_host_is_left_out(tmp_path: Path) -> None:
    with trio.fail_after(10):
        config = from_mapping(
            PeerConfig,
            {
                "data_dir": str(tmp_path),
                "site": "store-12",
                "site_peers": ["localhost:4000", "127.0.0.2:4000", "https://127.0.0.3:4100", "127.0.0.9:4000"],
            },
        )
        daemon = SimpleNamespace(config=config, advertise="http://127.0.0.9:4000")
        site = SitePeers(daemon)  # type: ignore[arg-type]
        site.learned(["http://127.0.0.4:4000", "http://127.0.0.2:4000/"], now=1.0)
        assert await site.candidates() == [
            "http://127.0.0.1:4000",  # localhost, by its address
            "http://127.0.0.2:4000",
            "https://127.0.0.3:4100",
            "http://127.0.0.4:4000",  # remembered from the scheduler
        ]
        # Kept for a restart in the data dir.
        assert set(SitePeers(daemon).members) == {"http://127.0.0.4:4000", "http://127.0.0.2:4000"}  # type: ignore[arg-type]


def test_a_site_hosts_manifest_is_taken_only_if_its_bytes_hash_to_the_digest_asked() -> None:
    body = b'{"schemaVersion":2}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()

    def manifest(**changes: object) -> bytes:
        raw: dict[str, object] = {
            "digest": digest,
            "media_type": "application/vnd.oci.image.manifest.v1+json",
            "body": base64.b64encode(body).decode(),
            "public": [{"registry": "http://r:5000", "repository": "edge/app", "age_s": 3}],
        }
        raw.update(changes)
        return json.dumps(raw).encode()

    found = parse_manifest("http://10.0.0.2:4000", digest, manifest())
    assert found is not None and found.body == body and found.public[0].name == "edge/app"
    for bad in (
        manifest(body=base64.b64encode(b'{"schemaVersion":3}').decode()),  # other bytes
        manifest(body="not base64!"),
        manifest(digest="sha256:" + "ab" * 32),
        manifest(media_type=5),
        b"[]",
    ):
        assert parse_manifest("http://10.0.0.2:4000", digest, bad) is None
