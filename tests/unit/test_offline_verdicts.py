"""The registry's yeses kept for when it cannot be reached (peer/verdicts.py): what stands in
for the registry, for whom, for how long, and what a no or a restart does to it."""

from __future__ import annotations

import json

import pytest

from p2pdist.errors import StoreError
from peer.verdicts import Verdicts, grant_key

REG = "https://registry.example"
OTHER_REG = "https://other.example"
D1 = "sha256:" + "11" * 32
D2 = "sha256:" + "22" * 32
BASIC = "Basic dXNlcjpwYXNz"
GRACE = 3600.0


def test_a_yes_stands_in_for_the_same_credentials_registry_repository_and_digest() -> None:
    v = Verdicts(GRACE)
    v.allowed(BASIC, REG, "team/app", D1, now=1000.0)
    assert v.offline(BASIC, REG, "team/app", D1, now=1010.0) == pytest.approx(10.0)
    assert v.offline("Basic b3RoZXI6b3RoZXI=", REG, "team/app", D1, now=1010.0) is None  # other credentials
    assert v.offline("", REG, "team/app", D1, now=1010.0) is None  # anonymous is other credentials too
    assert v.offline(BASIC, OTHER_REG, "team/app", D1, now=1010.0) is None  # other registry
    assert v.offline(BASIC, REG, "team/other", D1, now=1010.0) is None  # other repository
    # A digest the registry never confirmed in that repository: a yes for team/app must not
    # open a private layer a client names under team/app.
    assert v.offline(BASIC, REG, "team/app", D2, now=1010.0) is None


def test_a_yes_to_the_repository_covers_a_digest_confirmed_there_for_other_credentials() -> None:
    v = Verdicts(GRACE)
    v.allowed(BASIC, REG, "team/app", D1, now=1000.0)
    v.allowed("Basic b3RoZXI6b3RoZXI=", REG, "team/app", D2, now=1100.0)
    # BASIC was allowed into team/app, and D2 is in team/app as the registry said for another client.
    assert v.offline(BASIC, REG, "team/app", D2, now=1200.0) == pytest.approx(200.0)


def test_a_yes_older_than_the_grace_stands_for_nothing() -> None:
    v = Verdicts(GRACE)
    v.allowed(BASIC, REG, "team/app", D1, now=1000.0)
    assert v.offline(BASIC, REG, "team/app", D1, now=1000.0 + GRACE) == pytest.approx(GRACE)
    assert v.offline(BASIC, REG, "team/app", D1, now=1000.0 + GRACE + 1) is None
    assert v.offline(BASIC, REG, "team/app", D1, now=900.0) is None  # a clock set back: no age to trust


def test_a_no_from_the_registry_voids_the_yes_at_once() -> None:
    v = Verdicts(GRACE)
    v.allowed(BASIC, REG, "team/app", D1, now=1000.0)
    v.refused(BASIC, REG, "team/app")
    assert v.offline(BASIC, REG, "team/app", D1, now=1001.0) is None


def test_the_file_holds_no_credential_and_a_restart_keeps_the_yeses() -> None:
    v = Verdicts(GRACE)
    v.allowed(BASIC, REG, "team/app", D1, now=1000.0)
    data = v.to_json(now=1001.0)
    assert BASIC.encode() not in data and b"dXNlcjpwYXNz" not in data
    assert grant_key(BASIC, REG, "team/app").encode() in data
    again = Verdicts(GRACE)
    again.load_json(data)
    assert again.offline(BASIC, REG, "team/app", D1, now=1002.0) == pytest.approx(2.0)


def test_the_file_drops_what_the_grace_no_longer_covers() -> None:
    v = Verdicts(GRACE)
    v.allowed(BASIC, REG, "team/old", D1, now=0.0)
    v.allowed(BASIC, REG, "team/new", D2, now=GRACE)
    raw = json.loads(v.to_json(now=GRACE + 10))
    assert list(raw["grants"]) == [grant_key(BASIC, REG, "team/new")]
    assert [link[0] for link in raw["links"]] == [D2]


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"format": 2, "grants": {}, "links": []}',
        b'{"format": 1, "grants": {"k": "x"}, "links": []}',
    ],
)
def test_a_malformed_file_is_a_store_error(data: bytes) -> None:
    with pytest.raises(StoreError):
        Verdicts(GRACE).load_json(data)


def test_anonymous_yeses_are_what_a_host_may_tell_its_site() -> None:
    v = Verdicts(GRACE)
    v.allowed("", REG, "library/app", D1, now=1000.0)
    v.allowed(BASIC, REG, "team/app", D1, now=1000.0)  # the same layer in a private repository
    (link,) = v.public(D1, now=1030.0)
    assert (link.registry, link.name) == (REG, "library/app") and link.age_s == pytest.approx(30.0)
    assert v.public(D2, now=1030.0) == []
    assert v.public(D1, now=1000.0 + GRACE + 1) == []
    v.refused("", REG, "library/app")  # the repository went private
    assert v.public(D1, now=1031.0) == []


def test_entries_are_bounded_oldest_first() -> None:
    v = Verdicts(GRACE, max_grants=2, max_links=2)
    for i, name in enumerate(("a", "b", "c")):
        v.allowed(BASIC, REG, name, "sha256:" + f"{i:02d}" * 32, now=1000.0 + i)
    assert len(v.grants) == 2 and len(v.links) == 2
    assert v.offline(BASIC, REG, "a", "sha256:" + "00" * 32, now=1003.0) is None
    assert v.offline(BASIC, REG, "c", "sha256:" + "02" * 32, now=1003.0) is not None


def test_a_pull_of_many_layers_marks_the_file_for_one_write() -> None:
    v = Verdicts(GRACE)
    v.allowed(BASIC, REG, "team/app", D1, now=1000.0)
    assert v.dirty
    v.dirty = False
    v.allowed(BASIC, REG, "team/app", D1, now=1001.0)  # the same yes again, a second later
    assert not v.dirty
    v.allowed(BASIC, REG, "team/app", D2, now=1002.0)  # a new digest: worth writing
    assert v.dirty
