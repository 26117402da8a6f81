"""Site holders found without the scheduler (peer/sitepeers.py): a holder's answer is checked
field by field, holders that disagree are outvoted, and the site_peers key parses."""

from __future__ import annotations

import json

import pytest

from p2pdist.config import ConfigError, PeerConfig, from_mapping
from peer.sitepeers import agreeing, parse_holding

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
