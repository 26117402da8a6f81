"""What a seed may be asked to fetch and which registrations the scheduler takes: the allow-list
rules, the per-host rate, the cap on waiting tasks and their sweep, driven with fixed clocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pdist.config import SchedulerConfig, SeedConfig, load
from p2pdist.errors import BadRequest, ConfigError, Forbidden, TooManyRequests
from p2pdist.memory import ShrinkWatch, release_freed_memory
from p2pdist.registry.allowlist import check_seed_url, parse_allowed_registries, registry_allowed
from p2pdist.wire import Register
from scheduler.admission import Admission

TASK = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
SECRET = "s3cret-for-the-cluster-0123"


def url(task: str = TASK, host: str = "registry.example:5000", name: str = "lib/app") -> str:
    return f"http://{host}/v2/{name}/blobs/{task}"


# -- the allow-list ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("netloc", "allowed", "ok"),
    [
        ("registry.example:5000", ("registry.example",), True),  # a host without a port: any port
        ("registry.example", ("registry.example",), True),
        ("registry.example:5000", ("registry.example:5000",), True),
        ("registry.example:5001", ("registry.example:5000",), False),
        ("REGISTRY.example:5000", ("registry.example",), True),  # host names are case-blind
        ("evil.example", ("registry.example",), False),
        ("registry.example.evil.example", ("registry.example",), False),  # no suffix games
        ("registry-1.docker.io", ("docker.io",), True),  # how Docker Hub's blob URLs are named
        ("index.docker.io", ("docker.io",), True),
        ("docker.io.evil.example", ("docker.io",), False),
        ("169.254.169.254", ("docker.io",), False),
        ("[::1]:5000", ("[::1]",), True),
        ("anything.example:1", ("*",), True),
        ("anything.example", (), False),
    ],
)
def test_registry_allowed(netloc: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert registry_allowed(netloc, allowed) is ok


def test_seed_url_must_be_this_tasks_blob_on_an_allowed_registry() -> None:
    allowed = ("registry.example",)
    check_seed_url(url(), TASK, allowed)  # the one shape that passes
    refusals = {
        "http://registry.example/v2/lib/app/manifests/latest": BadRequest,
        "http://registry.example/admin": BadRequest,
        url(task=OTHER): BadRequest,  # a digest that is not the task's
        url() + "?x=1": BadRequest,
        "http://registry.example/v2/../../admin/blobs/" + TASK: BadRequest,
        "http://user:pw@registry.example/v2/lib/app/blobs/" + TASK: BadRequest,
        "file:///etc/passwd": BadRequest,
        url(host="metadata.internal"): Forbidden,
    }
    for bad, error in refusals.items():
        with pytest.raises(error) as caught:
            check_seed_url(bad, TASK, allowed)
        assert "\n" not in str(caught.value) and str(caught.value)
    with pytest.raises(Forbidden) as caught:
        check_seed_url(url(host="metadata.internal"), TASK, allowed)
    assert caught.value.status == 403 and "allowed_registries" in str(caught.value)


def test_allowed_registries_config_defaults_to_docker_hub_and_any_needs_a_secret(tmp_path: Path) -> None:
    assert SchedulerConfig().allowed_registries == SeedConfig().allowed_registries == ("docker.io",)
    assert parse_allowed_registries(["Ghcr.io", "10.0.0.5:5000"]) == ("ghcr.io", "10.0.0.5:5000")
    with pytest.raises(ConfigError, match="invalid registry"):
        parse_allowed_registries(["http://ghcr.io"])
    with pytest.raises(ConfigError, match="needs a cluster_secret"):
        load(SchedulerConfig, None, {"allowed_registries": ["*"]})
    with pytest.raises(ConfigError, match="needs a cluster_secret"):
        load(SeedConfig, None, {"allowed_registries": "*"})
    config = load(SeedConfig, None, {"allowed_registries": ["*"], "cluster_secret": SECRET})
    assert config.allowed_registries == ("*",)


# -- the registration checks ------------------------------------------------------------------


def register(host: str = "peer-1", task: str = TASK, blob_url: str | None = None) -> Register:
    return Register(host_id=host, task_id=task, url=blob_url or url(task=task))


def admission(**cfg: object) -> Admission:
    return Admission(SchedulerConfig(allowed_registries=("registry.example",), **cfg))  # type: ignore[arg-type]


def test_a_host_over_its_burst_gets_429_until_its_rate_refills() -> None:
    a = admission(host_registrations_per_s=2.0, host_registration_burst=3, max_waiting_tasks=0)
    for _ in range(3):
        a.admit(register(), 100.0, new_task=False, known_host=True, address="10.0.0.1")
    with pytest.raises(TooManyRequests) as caught:
        a.admit(register(), 100.0, new_task=False, known_host=True, address="10.0.0.1")
    assert caught.value.status == 429 and "peer-1" in str(caught.value)
    # Another host is not held back by this one.
    a.admit(register("peer-2"), 100.0, new_task=False, known_host=True, address="10.0.0.1")
    # Half a second later one token (2/s) is back, and only one.
    a.admit(register(), 100.5, new_task=False, known_host=True, address="10.0.0.1")
    with pytest.raises(TooManyRequests):
        a.admit(register(), 100.5, new_task=False, known_host=True, address="10.0.0.1")
    assert a.refused["host_rate"] == 2


def test_hosts_that_never_announced_share_the_rate_of_their_address() -> None:
    a = admission(host_registrations_per_s=1.0, host_registration_burst=5, max_waiting_tasks=0)
    for i in range(5):  # made-up host ids from one address: one bucket
        a.admit(register(f"made-up-{i}"), 0.0, new_task=False, known_host=False, address="10.0.0.9")
    with pytest.raises(TooManyRequests) as caught:
        a.admit(register("made-up-5"), 0.0, new_task=False, known_host=False, address="10.0.0.9")
    assert "10.0.0.9" in str(caught.value)
    # An announced host at the same address keeps its own rate.
    a.admit(register("peer-1"), 0.0, new_task=False, known_host=True, address="10.0.0.9")


def test_new_tasks_beyond_the_waiting_cap_get_429_and_known_tasks_still_register() -> None:
    a = admission(max_waiting_tasks=2, host_registrations_per_s=0.0)
    a.admit(register(task="sha256:" + "01" * 32), 0.0, new_task=True, known_host=True, address="a")
    a.admit(register(task="sha256:" + "02" * 32), 0.0, new_task=True, known_host=True, address="a")
    with pytest.raises(TooManyRequests) as caught:
        a.admit(register(task="sha256:" + "03" * 32), 0.0, new_task=True, known_host=True, address="a")
    assert "max_waiting_tasks 2" in str(caught.value)
    a.admit(register(task="sha256:" + "01" * 32), 0.0, new_task=False, known_host=True, address="a")
    a.sweep(1.0, waiting=1)  # one got its first holder or expired
    a.admit(register(task="sha256:" + "03" * 32), 1.0, new_task=True, known_host=True, address="a")
    assert a.refused == {"waiting_cap": 1}


def test_bad_urls_are_refused_and_counted_by_reason() -> None:
    a = admission()
    with pytest.raises(BadRequest):
        a.admit(register(blob_url=url(task=OTHER)), 0.0, new_task=True, known_host=True, address="a")
    with pytest.raises(Forbidden):
        a.admit(register(blob_url=url(host="elsewhere")), 0.0, new_task=True, known_host=True, address="a")
    assert a.refused == {"url": 1, "registry": 1}
    assert a.waiting == 0  # refused registrations hold no place under the cap


def test_sweep_forgets_hosts_whose_tokens_are_full_again() -> None:
    a = admission(host_registrations_per_s=10.0, host_registration_burst=20)
    for i in range(1000):
        a.admit(register(f"h{i}"), 0.0, new_task=False, known_host=True, address="a")
    assert len(a.buckets) == 1000
    a.sweep(0.05, waiting=0)  # half a token back each: not full yet
    assert len(a.buckets) == 1000
    a.sweep(0.2, waiting=0)
    assert a.buckets == {}


def test_shrink_watch_trims_once_a_collection_halves_from_its_peak() -> None:
    watch = ShrinkWatch(min_drop=100)
    assert not any(watch.shrunk(n) for n in (0, 500, 1000, 900, 600, 501))
    assert watch.shrunk(500)
    assert not watch.shrunk(400)  # the peak is now 500: 400 is not half of it
    assert watch.shrunk(150)
    small = ShrinkWatch(min_drop=100)
    assert not small.shrunk(50) and not small.shrunk(0)  # too small a drop to bother
    assert release_freed_memory()  # glibc, as on every machine this runs on
