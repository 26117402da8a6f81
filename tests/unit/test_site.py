"""Sites and locations: valid names, nearness, and how a host's site reaches the scheduler."""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import pytest
import trio
from prometheus_client import generate_latest

from p2pdist import wire
from p2pdist.config import ConfigError, PeerConfig, SchedulerConfig, SeedConfig, load
from p2pdist.errors import BadRequest
from p2pdist.site import location_problem, nearness, site_problem
from scheduler.service import SchedulerService
from scheduler.state import Scheduler


@pytest.mark.parametrize("name", ["", "store-0042", "ship.atlantic_7", "A"])
def test_valid_site_names(name: str) -> None:
    assert site_problem(name) is None


@pytest.mark.parametrize("name", ["-x", "a b", "eu/fr", "x" * 64, "é", 3])
def test_invalid_site_names(name: object) -> None:
    assert site_problem(name)


@pytest.mark.parametrize("value", ["", "eu", "eu/fr/paris-3", "/".join("abcdefgh")])
def test_valid_locations(value: str) -> None:
    assert location_problem(value) is None


@pytest.mark.parametrize("value", ["eu//fr", "/eu", "eu/", "eu/f r", "/".join("abcdefghi")])
def test_invalid_locations(value: str) -> None:
    assert location_problem(value)


def test_nearness_counts_shared_leading_parts() -> None:
    assert nearness("eu/fr/paris-3", "eu/fr/paris-3") == 3
    assert nearness("eu/fr/paris-3", "eu/fr/lyon-1") == 2
    assert nearness("eu/fr/paris-3", "eu/de/berlin-1") == 1
    assert nearness("eu/fr", "us/fr") == 0
    assert nearness("", "eu") == 0 and nearness("eu", "") == 0


def test_site_and_location_from_yaml_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "peer.yaml"
    path.write_text("site: store-12\nlocation: eu/fr/paris-3\n")
    peer = load(PeerConfig, path)
    assert (peer.site, peer.location) == ("store-12", "eu/fr/paris-3")
    seed = load(SeedConfig, None, {"site": "core", "location": "eu"})
    assert (seed.site, seed.location) == ("core", "eu")
    assert (PeerConfig().site, PeerConfig().location) == ("", "")


def test_bad_site_in_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "peer.yaml"
    path.write_text("site: 'store 12'\n")
    with pytest.raises(ConfigError, match=r"site \(--site\):"):
        load(PeerConfig, path)
    with pytest.raises(ConfigError, match=r"--location \(location\):"):
        load(PeerConfig, None, {"location": "eu//fr"})


def test_announce_without_site_stays_valid() -> None:
    old = msgpack.packb({"host_id": "h", "url": "http://h:1", "kind": "peer", "upload_slots": 2}, use_bin_type=True)
    host = wire.decode(wire.AnnounceHost, old)
    assert (host.site, host.location) == ("", "")


def test_announce_round_trips_site_and_location() -> None:
    msg = wire.AnnounceHost(host_id="h", url="http://h:1", kind="peer", upload_slots=2, site="s1", location="eu/fr")
    assert wire.decode(wire.AnnounceHost, wire.encode(msg)) == msg


@pytest.mark.parametrize(("field", "value"), [("site", "a/b"), ("site", 7), ("location", "eu//x")])
def test_announce_with_a_bad_site_or_location_is_refused_with_its_name(field: str, value: object) -> None:
    body = msgpack.packb(
        {"host_id": "h", "url": "http://h:1", "kind": "peer", "upload_slots": 2, field: value}, use_bin_type=True
    )
    with pytest.raises(BadRequest, match=f"AnnounceHost.{field}"):
        wire.decode(wire.AnnounceHost, body)


def test_scheduler_keeps_each_hosts_site_and_location() -> None:
    sched = Scheduler(SchedulerConfig(), rng=random.Random(1))
    sched.announce(wire.AnnounceHost(host_id="a", url="http://a:1", kind="peer", upload_slots=2, site="s1"), 0.0)
    sched.announce(
        wire.AnnounceHost(host_id="b", url="http://b:1", kind="seed", upload_slots=2, site="core", location="eu/fr"),
        0.0,
    )
    sched.announce(wire.AnnounceHost(host_id="c", url="http://c:1", kind="peer", upload_slots=2), 0.0)
    assert (sched.hosts["a"].site, sched.hosts["a"].location) == ("s1", "")
    assert (sched.hosts["b"].site, sched.hosts["b"].location) == ("core", "eu/fr")
    assert sched.hosts["c"].site == ""
    sched.announce(wire.AnnounceHost(host_id="a", url="http://a:1", kind="peer", upload_slots=2, site="s2"), 1.0)
    assert sched.hosts["a"].site == "s2"


async def test_scheduler_metrics_count_hosts_per_site() -> None:
    with trio.fail_after(5):
        service = SchedulerService(SchedulerConfig())
        hosts: list[tuple[str, wire.HostKind, str]] = [("a", "peer", "s1"), ("b", "peer", "s1"), ("c", "peer", "s2")]
        hosts.append(("d", "seed", "core"))
        for host, kind, site in hosts:
            service._dispatch(
                wire.AnnounceHost(host_id=host, url=f"http://{host}:1", kind=kind, upload_slots=2, site=site)
            )
        await trio.lowlevel.checkpoint()
        service._refresh_gauges()
        text = generate_latest(service.metrics.registry).decode()
        assert 'p2pdist_scheduler_site_hosts{kind="peer",site="s1"} 2.0' in text
        assert 'p2pdist_scheduler_site_hosts{kind="peer",site="s2"} 1.0' in text
        assert 'p2pdist_scheduler_site_hosts{kind="seed",site="core"} 1.0' in text
        service.state.leave_host("c", trio.current_time())
        service._refresh_gauges()
        assert 'site="s2"' not in generate_latest(service.metrics.registry).decode()
