"""The mirror's pure parts: `p2pdist mirror-config` output and installs, choosing the upstream,
and the access check's cache."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from p2pdist.cli.main import main
from p2pdist.errors import BadRequest
from peer.auth import AccessCheck, cache_key
from peer.upstream import MAX_HOPS, Upstream, forwarded_headers, hops_of, resolve_upstream


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["mirror-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_containerd_config_names_the_proxy_as_mirror_and_the_registry_as_fallback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(
        capsys,
        "containerd",
        "--proxy",
        "http://127.0.0.1:4001",
        "--registry",
        "docker.io",
        "--registry",
        "http://10.0.0.5:5000",
        "--hosts-dir",
        str(tmp_path),
    )
    assert code == 0
    assert not list(tmp_path.iterdir())  # printing writes nothing
    sections = {
        chunk.split("\n", 1)[0]: chunk.split("\n", 1)[1] for chunk in out.strip().split("# " + str(tmp_path))[1:]
    }
    assert set(sections) == {"/docker.io/hosts.toml", "/10.0.0.5:5000/hosts.toml"}
    hub = tomllib.loads(sections["/docker.io/hosts.toml"])
    assert hub == {
        "server": "https://registry-1.docker.io",
        "host": {"http://127.0.0.1:4001": {"capabilities": ["pull", "resolve"]}},
    }
    assert tomllib.loads(sections["/10.0.0.5:5000/hosts.toml"])["server"] == "http://10.0.0.5:5000"
    assert "--insecure-registry 10.0.0.5:5000" in err


def test_containerd_write_installs_and_keeps_a_backup_of_what_was_there(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    existing = tmp_path / "ghcr.io" / "hosts.toml"
    existing.parent.mkdir()
    existing.write_text('server = "https://ghcr.io"\n')
    code, out, _ = run(capsys, "containerd", "--registry", "ghcr.io", "--hosts-dir", str(tmp_path), "--write")
    assert code == 0 and "previous file kept" in out
    assert tomllib.loads(existing.read_text())["host"]["http://127.0.0.1:4001"]["capabilities"] == ["pull", "resolve"]
    (backup,) = existing.parent.glob("hosts.toml.p2pdist-backup-*")
    assert backup.read_text() == 'server = "https://ghcr.io"\n'
    # Writing the same again changes nothing and makes no second backup.
    assert run(capsys, "containerd", "--registry", "ghcr.io", "--hosts-dir", str(tmp_path), "--write")[0] == 0
    assert len(list(existing.parent.glob("hosts.toml.p2pdist-backup-*"))) == 1


def test_docker_write_merges_daemon_json_and_keeps_a_backup(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    daemon_json = tmp_path / "daemon.json"
    original = {"log-driver": "journald", "registry-mirrors": ["https://mirror.example"]}
    daemon_json.write_text(json.dumps(original))
    code, _, err = run(
        capsys, "docker", "--proxy", "http://127.0.0.1:4001", "--daemon-json", str(daemon_json), "--write"
    )
    assert code == 0
    assert json.loads(daemon_json.read_text()) == {
        "log-driver": "journald",
        "registry-mirrors": ["http://127.0.0.1:4001", "https://mirror.example"],
    }
    (backup,) = tmp_path.glob("daemon.json.p2pdist-backup-*")
    assert json.loads(backup.read_text()) == original
    assert "--registry-mirror https://registry-1.docker.io" in err


def test_docker_print_without_a_daemon_json_and_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "docker", "--daemon-json", str(tmp_path / "none.json"))
    assert code == 0
    assert json.loads(out.split("\n", 1)[1]) == {"registry-mirrors": ["http://127.0.0.1:4001"]}
    (tmp_path / "broken.json").write_text("{not json")
    assert run(capsys, "docker", "--daemon-json", str(tmp_path / "broken.json"), "--write")[0] == 1
    assert (tmp_path / "broken.json").read_text() == "{not json"
    assert run(capsys, "docker", "--proxy", "ftp://x")[0] == 1
    assert run(capsys, "containerd", "--registry", "a/b")[0] == 1


def test_upstream_is_https_unless_listed_insecure_or_asked_for_http() -> None:
    insecure = ("127.0.0.1:5000",)
    resolve = lambda ns, scheme=None: resolve_upstream(ns, scheme, insecure=insecure, default="http://10.0.0.9:5000/")  # noqa: E731
    assert resolve("ghcr.io") == Upstream("https://ghcr.io", "ghcr.io")
    assert resolve("127.0.0.1:5000") == Upstream("http://127.0.0.1:5000", "127.0.0.1:5000")
    assert resolve("127.0.0.1:6000", "http") == Upstream("http://127.0.0.1:6000", "127.0.0.1:6000")
    assert resolve("docker.io") == Upstream("https://registry-1.docker.io", "docker.io")
    # docker's registry-mirrors send no ns: the default upstream.
    assert resolve(None) == Upstream("http://10.0.0.9:5000", "10.0.0.9:5000")
    assert resolve("[::1]:5000").base == "https://[::1]:5000"
    assert resolve("a" * 63 + ".example:443").namespace == "a" * 63 + ".example:443"
    # Each of these once got past the check and crashed the handler in the resolver's IDNA step
    # ("..": a 500 where the client should see 400), or would have been dialled as nonsense.
    for bad_ns in (
        "a/b",
        "user@host",
        "host:99999999",
        "..",
        ".",
        "a..b",
        "-a.io",
        "a-.io",
        "a" * 64 + ".io",
        ".".join(["a" * 60] * 5),
        "host:0",
        "host:65536",
        "[zz::1]",
        "[::1",
        "::1",
    ):
        with pytest.raises(BadRequest):
            resolve(bad_ns)
    with pytest.raises(BadRequest):
        resolve("ghcr.io", "file")
    with pytest.raises(BadRequest):
        resolve_upstream(None, None, insecure=(), default=None)


def test_forwarded_requests_count_hops_and_carry_only_what_the_registry_needs() -> None:
    client = {"authorization": "Bearer t", "accept": "x", "cookie": "c", "x-p2pdist-origin-scheme": "http"}
    out = forwarded_headers(client, hops=0)
    assert out == {"authorization": "Bearer t", "accept": "x", "accept-encoding": "identity", "x-p2pdist": "1"}
    assert hops_of({}) == 0 and hops_of({"x-p2pdist": "1"}) == 1 and hops_of({"x-p2pdist": "junk"}) == 1
    assert hops_of(forwarded_headers({"x-p2pdist": str(MAX_HOPS - 1)}, hops=MAX_HOPS - 1)) == MAX_HOPS


def test_access_check_remembers_a_yes_per_credentials_repository_and_digest_for_a_while() -> None:
    now = [0.0]
    check = AccessCheck(client=None, ttl_s=60, max_entries=2, clock=lambda: now[0])  # type: ignore[arg-type]
    key = cache_key("Basic abc", "https://r", "team/app", "sha256:" + "1" * 64)
    assert key != cache_key("Basic abd", "https://r", "team/app", "sha256:" + "1" * 64)
    assert key != cache_key("Basic abc", "https://r", "public/app", "sha256:" + "1" * 64)
    assert key != cache_key("Basic abc", "https://r", "team/app", "sha256:" + "2" * 64)
    assert "abc" not in key
    check.remember(key, 42)
    assert check.recall(key) == (True, 42)
    now[0] = 61.0
    assert check.recall(key) == (False, None)
    for k in ("a", "b", "c"):
        check.remember(k, None)
    assert check.recall("a") == (False, None) and check.recall("c") == (True, None)
