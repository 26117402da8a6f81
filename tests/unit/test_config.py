"""Config loading: YAML + flag overrides, strict keys, size/rate parsing."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from p2pdist.config import (
    ConfigError,
    NodeConfig,
    PeerConfig,
    SchedulerConfig,
    SeedConfig,
    add_flags,
    flag_overrides,
    from_mapping,
    load,
    parse_hostport,
    parse_rate,
    parse_size,
    parse_url,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    cfg = load(PeerConfig, None)
    assert cfg == PeerConfig()
    assert cfg.upload_rate_bps is None


def test_yaml_load_and_flag_overrides_win(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen: 127.0.0.1:5000
data_dir: /tmp/peer-a
upload_rate_bps: 8MiB
concurrent_pieces: 3
piece_timeout_s: 2.5
insecure_registries: [a.example:5000, b.example]
""",
    )
    cfg = load(PeerConfig, path, {"listen": "127.0.0.2:6000", "concurrent_pieces": "5", "data_dir": None})
    assert cfg.listen == "127.0.0.2:6000"  # flag wins
    assert cfg.concurrent_pieces == 5  # flag wins, parsed from a string
    assert cfg.data_dir == "/tmp/peer-a"  # None override means "flag absent"
    assert cfg.upload_rate_bps == 8 * 1024 * 1024
    assert cfg.piece_timeout_s == 2.5
    assert cfg.insecure_registries == ("a.example:5000", "b.example")
    assert cfg.proxy_listen == PeerConfig().proxy_listen


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load(SchedulerConfig, write(tmp_path, "")) == SchedulerConfig()


def test_unknown_key_named(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:1\nuplaod_slots: 3\n")
    with pytest.raises(ConfigError, match="uplaod_slots") as info:
        load(SeedConfig, path)
    assert str(path) in str(info.value)


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        load(SchedulerConfig, None, {"bogus": "1"})


def test_unknown_non_string_keys_are_config_errors(tmp_path: Path) -> None:
    # YAML keys need not be strings; a mix of int and str unknown keys must still be a
    # ConfigError, not a TypeError from sorting mixed types.
    path = write(tmp_path, "1: a\nfoo: b\n")
    with pytest.raises(ConfigError, match="foo"):
        load(SchedulerConfig, path)


@pytest.mark.parametrize("word", ["on", "no", "yes", "off", "true"])
def test_yaml_booleans_for_string_field(tmp_path: Path, word: str) -> None:
    with pytest.raises(ConfigError, match="log_level"):
        load(SchedulerConfig, write(tmp_path, f"log_level: {word}\n"))


def test_yaml_boolean_for_int_and_rate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upload_slots"):
        load(SeedConfig, write(tmp_path, "upload_slots: yes\n"))
    with pytest.raises(ConfigError, match="upload_rate_bps"):
        load(SeedConfig, write(tmp_path, "upload_rate_bps: on\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8MiB", 8388608),
        ("8 MiB", 8388608),
        ("8MiB/s", 8388608),
        ("500KiB", 512000),
        ("1GB", 1_000_000_000),
        ("8MB", 8_000_000),
        ("500kB", 500_000),
        ("100Mbit", 12_500_000),
        ("100Mbps", 12_500_000),
        ("1Gbit/s", 125_000_000),
        ("1GiB", 1 << 30),
        ("1.5KiB", 1536),
        ("1000", 1000),
        (1048576, 1048576),
        ("0", None),
        (0, None),
        ("none", None),
        ("None", None),
        ("unlimited", None),
        (None, None),
    ],
)
def test_parse_rate(text: object, expected: int | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "MiB", "-1", -1, "8MiBs", "1e6", True, 1.5, [], "8..0M"])
def test_parse_size_invalid(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_invalid_rate_in_yaml_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="download_rate_bps.*8 parsecs"):
        load(PeerConfig, write(tmp_path, "download_rate_bps: 8 parsecs\n"))


@pytest.mark.parametrize("addr", ["localhost", "localhost:", ":80", "host:99999", "host:-1", "host:http", 8080])
def test_invalid_listen_address(addr: object) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(addr)
    with pytest.raises(ConfigError, match="listen"):
        from_mapping(SchedulerConfig, {"listen": addr})


def test_listen_address_non_ascii_digit_port() -> None:
    # "²".isdigit() is True but int("²") raises ValueError: must still be a ConfigError.
    with pytest.raises(ConfigError):
        parse_hostport("host:²")


def test_valid_listen_addresses() -> None:
    assert parse_hostport("127.0.0.1:8002") == ("127.0.0.1", 8002)
    assert parse_hostport("[::1]:80") == ("::1", 80)
    assert parse_hostport("0.0.0.0:0") == ("0.0.0.0", 0)


def test_urls() -> None:
    assert parse_url("http://sched:8002/") == "http://sched:8002"
    assert parse_url("https://x") == "https://x"
    for bad in ("ftp://x", "sched:8002", "http://", "http://a b", None):
        with pytest.raises(ConfigError):
            parse_url(bad)
    assert from_mapping(PeerConfig, {"advertise": ""}).advertise is None


def test_invalid_numbers() -> None:
    with pytest.raises(ConfigError, match="peer_ttl_s"):
        from_mapping(SchedulerConfig, {"peer_ttl_s": "soon"})
    with pytest.raises(ConfigError, match="peer_ttl_s"):
        from_mapping(SchedulerConfig, {"peer_ttl_s": -1})
    with pytest.raises(ConfigError, match="candidate_parents"):
        from_mapping(SchedulerConfig, {"candidate_parents": "four"})
    with pytest.raises(ConfigError, match="candidate_parents"):
        from_mapping(SchedulerConfig, {"candidate_parents": -2})
    assert from_mapping(SchedulerConfig, {"candidate_parents": "7"}).candidate_parents == 7


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load(SchedulerConfig, write(tmp_path, "listen: [unclosed\n"))


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load(SchedulerConfig, write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(SchedulerConfig, tmp_path / "nope.yaml")


def test_yaml_unsafe_tags_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(SchedulerConfig, write(tmp_path, "log_level: !!python/object/apply:os.getcwd []\n"))


def test_frozen() -> None:
    cfg = SchedulerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen = "0.0.0.0:1"  # type: ignore[misc]


def test_flags_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, SeedConfig)
    args = parser.parse_args(
        ["--upload-rate", "500KiB", "--insecure-registry", "a:5000", "--insecure-registry", "b", "--upload-slots", "2"]
    )
    overrides = flag_overrides(args, SeedConfig)
    assert "config" not in overrides and "listen" not in overrides
    cfg = load(SeedConfig, None, overrides)
    assert cfg.upload_rate_bps == 512000
    assert cfg.insecure_registries == ("a:5000", "b")
    assert cfg.upload_slots == 2


def test_seed_and_peer_are_node_configs_with_their_own_defaults() -> None:
    node_fields = {f.name for f in dataclasses.fields(NodeConfig)}
    assert node_fields <= {f.name for f in dataclasses.fields(SeedConfig)}
    assert node_fields <= {f.name for f in dataclasses.fields(PeerConfig)}
    assert (SeedConfig().listen, SeedConfig().data_dir) == ("127.0.0.1:4010", "/var/lib/p2pdist/seed")
    assert (PeerConfig().listen, PeerConfig().data_dir) == ("127.0.0.1:4000", "/var/lib/p2pdist/peer")
    assert load(PeerConfig, None, {"announce_interval_s": "0.5"}).announce_interval_s == 0.5


def test_a_seed_gets_more_upload_slots_than_a_peer_at_the_same_rate() -> None:
    assert (SeedConfig().effective_upload_slots(), PeerConfig().effective_upload_slots()) == (16, 8)
    rate = 64 << 20
    assert SeedConfig(upload_rate_bps=rate).effective_upload_slots() == 8
    assert PeerConfig(upload_rate_bps=rate).effective_upload_slots() == 5
    # The 16-host rollout's peers keep one slot; a 100 MiB/s link gets eight (issue 17).
    assert PeerConfig(upload_rate_bps=8 << 20).effective_upload_slots() == 1
    assert PeerConfig(upload_rate_bps=100 << 20).effective_upload_slots() == 8
    assert PeerConfig(upload_rate_bps=rate, upload_slots=5).effective_upload_slots() == 5


def test_schedulers_come_as_one_url_a_yaml_list_or_repeated_flags(tmp_path: Path) -> None:
    one = tmp_path / "one.yaml"
    one.write_text("scheduler: http://sched:8002/\n")
    assert load(PeerConfig, one).scheduler == ("http://sched:8002",)  # a config from before still works
    several = tmp_path / "several.yaml"
    several.write_text("scheduler: [http://a:8002, http://b:8002, http://a:8002]\nscheduler_dns_interval_s: 10\n")
    config = load(SeedConfig, several)
    assert config.scheduler == ("http://a:8002", "http://b:8002")
    assert config.scheduler_dns_interval_s == 10.0
    parser = argparse.ArgumentParser()
    add_flags(parser, PeerConfig)
    args = parser.parse_args(["--scheduler", "http://a:8002", "--scheduler", "http://c:8002"])
    assert load(PeerConfig, None, flag_overrides(args, PeerConfig)).scheduler == ("http://a:8002", "http://c:8002")
    assert PeerConfig(scheduler="http://direct:8002").scheduler == ("http://direct:8002",)  # type: ignore[arg-type]
    for bad in ([], "sched:8002", ["http://a:8002", 5], {"a": 1}):
        with pytest.raises(ConfigError, match="scheduler"):
            from_mapping(PeerConfig, {"scheduler": bad})


def test_min_piece_bytes_from_yaml_and_flag(tmp_path: Path) -> None:
    assert SchedulerConfig().min_piece_bytes == 2 * 1024 * 1024
    path = write(tmp_path, "min_piece_bytes: 4MiB\n")  # the rolling upgrade's line
    assert load(SchedulerConfig, path).min_piece_bytes == 4 * 1024 * 1024
    parser = argparse.ArgumentParser()
    add_flags(parser, SchedulerConfig)
    overrides = flag_overrides(parser.parse_args(["--min-piece-bytes", "1MiB"]), SchedulerConfig)
    assert load(SchedulerConfig, path, overrides).min_piece_bytes == 1024 * 1024


@pytest.mark.parametrize("value", ["3MiB", "512KiB", "128MiB", "0", "two"])
def test_min_piece_bytes_must_be_a_piece_size(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="min_piece_bytes"):
        load(SchedulerConfig, write(tmp_path, f"min_piece_bytes: {value}\n"))
