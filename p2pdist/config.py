"""Typed, frozen configuration for every service, loaded from YAML and overridden by flags.

One dataclass per service. Each field carries its flag name and parser in its metadata, so
the YAML keys, the command-line flags and the defaults come from one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import yaml

from p2pdist.content.pieces import DEFAULT_MIN_PIECE_SIZE, piece_size_problem
from p2pdist.errors import ConfigError as ConfigError  # re-exported
from p2pdist.registry.allowlist import ANY_REGISTRY, DEFAULT_ALLOWED_REGISTRIES, parse_allowed_registries
from p2pdist.site import location_problem, site_problem

# Units are spelled exactly, so that a value means one thing: bytes in SI (kB or KB, MB, GB,
# TB) or binary (KiB, MiB, GiB, TiB) multiples, or a plain number of bytes; a rate may also be
# in bits (Kbit, Mbit, Gbit, or Kbps, Mbps, Gbps, as links are sold). `8M`, `100Mb` or `8mib`
# could mean bytes or bits, SI or binary: they are refused, not guessed.
_BYTE_UNITS = {
    "": 1,
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}
_BIT_UNITS = {
    f"{prefix}{suffix}": 10**power // 8
    for prefix, power in (("k", 3), ("K", 3), ("M", 6), ("G", 9))
    for suffix in ("bit", "bps")
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
SIZE_FORMS = "a number of bytes, or with a unit: 8MiB, 500KiB, 1GiB (binary) or 8MB, 500kB (SI)"
RATE_FORMS = f"bytes/s as {SIZE_FORMS}; or bits/s: 100Mbit or 100Mbps, 1Gbit"


def _number_with_unit(value: object, units: Mapping[str, int], what: str, forms: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"invalid {what} {value!r}: want {forms}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} must not be negative: {value}")
        return value
    text = value.strip()
    if what == "rate" and text.endswith("/s"):
        text = text[:-2]
    m = _SIZE.fullmatch(text)
    if m and m.group(2) in units:
        return int(float(m.group(1)) * units[m.group(2)])
    raise ConfigError(f"invalid {what} {value!r}: want {forms}")


def parse_size(value: object) -> int:
    """`8MiB`, `500KiB`, `1GB`, `1048576` → bytes. Ambiguous units (`8M`, `8mb`) are refused."""
    return _number_with_unit(value, _BYTE_UNITS, "size", SIZE_FORMS)


def _unlimited(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "unlimited", ""))


def parse_rate(value: object) -> int | None:
    """A rate in bytes per second (`8MiB`, `8MiB/s`, `100Mbit` = 12,500,000); 0, `none` or
    `unlimited` mean no cap."""
    if _unlimited(value):
        return None
    return _number_with_unit(value, {**_BYTE_UNITS, **_BIT_UNITS}, "rate", RATE_FORMS) or None


def parse_quota(value: object) -> int | None:
    """A size in bytes; 0, `none` or `unlimited` mean no quota."""
    return None if _unlimited(value) else parse_size(value) or None


def parse_hostport(value: object) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"invalid address {value!r}: want HOST:PORT")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"invalid address {value!r}: want HOST:PORT")
    return host, int(port)


def parse_url(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ConfigError(f"invalid URL {value!r}: want http://HOST:PORT")
    return value.rstrip("/")


def parse_urls(value: object) -> tuple[str, ...]:
    """One URL or a list of them (YAML list, repeated flag); at least one."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not values:
        raise ConfigError(f"expected a URL or a list of URLs, got {value!r}")
    return tuple(dict.fromkeys(parse_url(v) for v in values))


def _opt_url(value: object) -> str | None:
    return None if value in (None, "") else parse_url(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"expected a number, got {value!r}")
    try:
        result = float(value)
    except ValueError:
        raise ConfigError(f"expected a number, got {value!r}") from None
    if result != result or result in (float("inf"), float("-inf")):
        raise ConfigError(f"expected a finite number, got {value!r}")
    if result < 0:
        raise ConfigError(f"expected a non-negative number, got {value!r}")
    return result


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"expected true or false, got {value!r}")


def _at_least_one(value: object) -> int:
    result = _int(value)
    if result < 1:
        raise ConfigError(f"expected an integer of at least 1, got {value!r}")
    return result


def _piece_size(value: object) -> int:
    result = parse_size(value)
    if (problem := piece_size_problem(result)) is not None:
        raise ConfigError(problem)
    return result


def _fraction(value: object) -> float:
    result = _float(value)
    if not 0.0 < result <= 1.0:
        raise ConfigError(f"expected a fraction in (0, 1], got {value!r}")
    return result


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"expected an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"expected an integer, got {value!r}")
    try:
        result: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigError(f"expected an integer, got {value!r}") from None
    if result < 0:
        raise ConfigError(f"expected a non-negative integer, got {value!r}")
    return result


def _strs(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _site(value: object) -> str:
    if (problem := site_problem(value)) is not None:
        raise ConfigError(problem)
    return str(value)


def _location(value: object) -> str:
    if (problem := location_problem(value)) is not None:
        raise ConfigError(problem)
    return str(value)


def _hostport_str(value: object) -> str:
    parse_hostport(value)
    return str(value)


def _site_peers(value: object) -> tuple[str, ...]:
    """HOST:PORT entries (a host name may stand for several addresses); a URL is taken too."""
    entries = []
    for entry in _strs(value):
        text = entry.strip().rstrip("/")
        address = urlsplit(text).netloc if text.startswith(("http://", "https://")) else text
        host, _ = parse_hostport(address)
        if not host or any(c.isspace() or c in "/@?#" for c in host):
            raise ConfigError(f"invalid site peer {entry!r}: want HOST:PORT")
        entries.append(text)  # without a scheme: the scheme of this host's own piece server
    return tuple(dict.fromkeys(entries))


CLUSTER_SECRET_ENV = "P2PDIST_CLUSTER_SECRET"
PREHEAT_TOKEN_ENV = "P2PDIST_PREHEAT_TOKEN"
MIN_SECRET_CHARS = 16


def _opt_secret(value: object) -> str | None:
    """The cluster secret: printable ASCII without spaces (it travels in a header). Errors
    never repeat the value."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.isascii() or not value.isprintable() or " " in value:
        raise ConfigError("must be printable ASCII without spaces (value not shown)")
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(f"must be at least {MIN_SECRET_CHARS} characters (value not shown)")
    return value


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: object) -> str:
    if not isinstance(value, str) or value.strip().lower() not in LOG_LEVELS:
        raise ConfigError(f"invalid log level {value!r}: want one of {', '.join(LOG_LEVELS)}")
    return value.strip().lower()


def _opt_path(value: object) -> str | None:
    return None if value in (None, "") else _str(value)


def opt(
    default: Any,
    parse: Callable[[object], Any],
    help: str,
    *,
    flag: str | None = None,
    repeat: bool = False,
    secret: bool = False,
) -> Any:
    """A config field: default, parser for YAML and flag values, help text, flag name.
    A `secret` field is left out of the config's repr, so logging a config cannot leak it."""
    meta = {"parse": parse, "help": help, "flag": flag, "repeat": repeat}
    if isinstance(default, list | dict):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata=meta, repr=not secret)


def _secret_opt() -> Any:
    return opt(
        None,
        _opt_secret,
        f"shared secret every scheduler and piece request carries as a Bearer "
        f"token (or env {CLUSTER_SECRET_ENV}; prefer the env var or the config file to a flag)",
        secret=True,
    )


def _allowed_registries_opt() -> Any:
    return opt(
        DEFAULT_ALLOWED_REGISTRIES,
        parse_allowed_registries,
        "registries (HOST for any port, or HOST:PORT) whose blobs seeds may be asked to fetch; "
        "'*' for any, only with a cluster secret",
        flag="--allowed-registry",
        repeat=True,
    )


_TLS_CERT_HELP = "PEM certificate chain: serve TLS on this port (with tls_key)"
_TLS_KEY_HELP = "PEM private key of tls_cert"
_TLS_CA_HELP = "PEM CA bundle trusted for https:// scheduler, seed and parent URLs"


@dataclass(frozen=True)
class ServiceConfig:
    """What every service is configured with: logging, the cluster secret, TLS."""

    log_level: str = opt("info", _log_level, "debug, info, warning or error", flag="--log-level")
    cluster_secret: str | None = _secret_opt()
    tls_cert: str | None = opt(None, _opt_path, _TLS_CERT_HELP)
    tls_key: str | None = opt(None, _opt_path, _TLS_KEY_HELP)
    tls_ca: str | None = opt(None, _opt_path, _TLS_CA_HELP)
    drain_timeout_s: float = opt(
        30.0, _float, "on SIGTERM, refuse new requests and give those in flight this long to finish"
    )
    head_timeout_s: float = opt(
        5.0, _float, "a request head (and a TLS handshake) must arrive within this, or the connection is closed"
    )
    max_connections: int = opt(1024, _int, "open connections per port; past it new ones get 503 and a log line")


@dataclass(frozen=True)
class SchedulerConfig(ServiceConfig):
    listen: str = opt("127.0.0.1:8002", _hostport_str, "address of the scheduler API", flag="--listen")
    candidate_parents: int = opt(8, _int, "parents offered to a peer per answer")
    parent_sample: int = opt(40, _int, "peers of a task sampled when choosing parents")
    peer_ttl_s: float = opt(60.0, _float, "forget a peer not heard from for this long")
    bad_parent_ttl_s: float = opt(30.0, _float, "avoid a parent reported bad for this long")
    seed_retry_s: float = opt(5.0, _float, "ask another seed when one has shown no progress for this long")
    startup_grace_s: float = opt(
        5.0, _float, "after a (re)start, wait this long for seeds to announce before sending peers to the origin"
    )
    site_aware: bool = opt(True, _bool, "take parents from the peer's own site; pieces enter a site via few fetchers")
    site_wan_fetchers: int = opt(
        1, _at_least_one, "peers per site and task allowed to fetch from outside the site (over its WAN link)"
    )
    preheat_token: str | None = opt(
        None,
        _opt_secret,
        f"Bearer token the preheat job API (/oapi/v1/jobs) takes besides the cluster secret "
        f"(or env {PREHEAT_TOKEN_ENV})",
        secret=True,
    )
    direct_blob_bytes: int = opt(
        1 << 20,
        parse_size,
        "blobs smaller than this go straight to the origin unless the swarm has them (a preheat) or "
        "sites are in use: P2P's fixed cost (seed wake-up, syncs) is many times their transfer",
    )
    min_piece_bytes: int = opt(
        DEFAULT_MIN_PIECE_SIZE,
        _piece_size,
        "the smallest piece a task is cut into (a power of two, 1MiB to 64MiB), for tasks first asked for by a "
        "host with an upload cap (no cap: 4MiB); set 4MiB while a fleet upgrades from a version whose peers "
        "cut pieces themselves: that is their layout",
    )
    preheat_jobs: int = opt(2, _int, "preheat jobs running at once; later ones wait as PENDING")
    preheat_job_blobs: int = opt(
        4, _int, "blob copies one preheat job fetches at once (its concurrent_count may lower it)"
    )
    preheat_job_timeout_s: float = opt(1800.0, _float, "fail a preheat job that has not finished in this long")
    preheat_job_ttl_s: float = opt(3600.0, _float, "forget a finished preheat job after this long")
    allowed_registries: tuple[str, ...] = _allowed_registries_opt()
    host_registrations_per_s: float = opt(
        20.0, _float, "registrations one host may make per second on average; beyond its burst they get 429"
    )
    host_registration_burst: int = opt(200, _int, "registrations one host may make at once before its rate applies")
    max_waiting_tasks: int = opt(
        2000, _int, "tasks no host holds a piece of yet (new, seeding or failed); registering another gets 429"
    )


def upload_slots_for(rate_bps: int | None, *, per_slot_bps: int, lowest: int, highest: int) -> int:
    """Concurrent uploads for an upload cap: few enough that each piece goes out fast (a
    piece is of use to others only once complete), enough to fill the link. Tuned with
    benchmarks/simulate.py and benchmarks/rollout.py: 16 hosts at 8 MiB/s did best with 1 per
    peer (a 4 MiB piece out in 0.5 s, not two in 1 s; the piece server's queue keeps the link
    busy between pieces) and 4 per seed; 1,000 hosts at 100 MiB/s with 8 per peer (4 left an
    eighth of the swarm's upload idle: benchmarks/README.md, issue 17)."""
    if rate_bps is None:
        return highest
    return max(lowest, min(highest, round(rate_bps / per_slot_bps)))


def _listen_opt(default: str) -> Any:
    return opt(default, _hostport_str, "address of the piece server", flag="--listen")


def _data_dir_opt(default: str) -> Any:
    return opt(default, _str, "where pieces are stored", flag="--data-dir")


@dataclass(frozen=True)
class NodeConfig(ServiceConfig):
    """What every node (a peer, or a peer in seed mode) is configured with. Defaults are a
    peer's; SeedConfig moves the address and data dir."""

    # (bytes/s one upload slot is worth, fewest slots, most slots): see upload_slots_for.
    slot_tuning: ClassVar[tuple[int, int, int]] = (25 << 19, 1, 8)

    listen: str = _listen_opt("127.0.0.1:4000")
    scheduler: tuple[str, ...] = opt(
        ("http://127.0.0.1:8002",),
        parse_urls,
        "scheduler URL; repeat (or a YAML list) for several, or one DNS name with an address per scheduler",
        flag="--scheduler",
        repeat=True,
    )
    scheduler_backoff_s: float = opt(
        10.0, _float, "a scheduler that failed a call gets no task for this long (unless it answers an announce)"
    )
    scheduler_patience_s: float = opt(
        30.0,
        _float,
        "a scheduler call past its timeout waits on while the scheduler answers its liveness probe "
        "(busy, not frozen), up to this long in all; 0: fail over at the timeout",
    )
    scheduler_dns_interval_s: float = opt(
        30.0, _float, "how often scheduler host names are resolved again (each address is one scheduler)"
    )
    data_dir: str = _data_dir_opt("/var/lib/p2pdist/peer")
    advertise: str | None = opt(None, _opt_url, "URL other peers use for this piece server", flag="--advertise")
    upload_rate_bps: int | None = opt(None, parse_rate, "cap on bytes/s served to peers", flag="--upload-rate")
    upload_slots: int = opt(0, _int, "concurrent piece uploads before answering busy; 0: from the upload rate")
    announce_interval_s: float = opt(
        3.0, _float, "how often to tell the scheduler this host is alive and what it holds"
    )
    cache_quota_bytes: int | None = opt(
        None,
        parse_quota,
        "disk quota for cached pieces; past the high watermark the least recently used blobs go",
        flag="--cache-quota",
    )
    cache_high_watermark: float = opt(0.9, _fraction, "fraction of the quota that starts eviction")
    cache_low_watermark: float = opt(0.7, _fraction, "fraction of the quota eviction brings usage down to")
    insecure_registries: tuple[str, ...] = opt(
        (), _strs, "registries reached over plain HTTP", flag="--insecure-registry", repeat=True
    )
    site: str = opt("", _site, "the site (one WAN link: a store, a ship) this host is in; empty: one site for all")
    location: str = opt("", _location, "where this host is, outermost first (eu/fr/paris-3); nearer parents first")

    def __post_init__(self) -> None:
        # Code that builds a config directly (tests, embedders) may still pass one URL.
        if isinstance(self.scheduler, str):
            object.__setattr__(self, "scheduler", (self.scheduler,))

    def effective_upload_slots(self) -> int:
        per_slot_bps, lowest, highest = self.slot_tuning
        return self.upload_slots or upload_slots_for(
            self.upload_rate_bps, per_slot_bps=per_slot_bps, lowest=lowest, highest=highest
        )


@dataclass(frozen=True)
class SeedConfig(NodeConfig):
    # A seed feeds the whole swarm early on: more slots than a peer has.
    slot_tuning: ClassVar[tuple[int, int, int]] = (8 << 20, 4, 16)

    listen: str = _listen_opt("127.0.0.1:4010")
    data_dir: str = _data_dir_opt("/var/lib/p2pdist/seed")
    origin_rate_bps: int | None = opt(None, parse_rate, "cap on bytes/s fetched from origins", flag="--origin-rate")
    origin_timeout_s: float = opt(30.0, _float, "give up on an origin that sends nothing for this long")
    allowed_registries: tuple[str, ...] = _allowed_registries_opt()
    failed_fetch_ttl_s: float = opt(60.0, _float, "forget a failed fetch (its error, its record) after this long")
    # The tiered shape of edge sites: a site's seed pulls through the core cluster's mirror.
    upstream: str | None = opt(
        None,
        _opt_url,
        "a p2pdist mirror (the core cluster's peer proxy) to fetch blobs through instead of the origin",
        flag="--upstream",
    )
    upstream_connect_timeout_s: float = opt(
        2.0, _float, "give up on an upstream that does not accept a connection for this long (WAN down)"
    )
    wan_rate_bps: int | None = opt(
        None,
        parse_rate,
        "cap on bytes/s fetched over the WAN link (through the upstream, else from origins)",
        flag="--wan-rate",
    )
    attest_key: str | None = opt(
        None,
        _opt_path,
        "Ed25519 private key (PEM) the seed signs 'blob sha256 checked' with; peers given its public key "
        "then skip hashing the blob again",
    )


@dataclass(frozen=True)
class PeerConfig(NodeConfig):
    proxy_listen: str = opt("127.0.0.1:4001", _hostport_str, "address local clients pull from", flag="--proxy-listen")
    download_rate_bps: int | None = opt(
        None, parse_rate, "cap on bytes/s fetched from peers and origin", flag="--download-rate"
    )
    concurrent_pieces: int = opt(
        0, _int, "pieces in flight per task; 0: 8, or 1.5 × the upload slots where that is more"
    )
    per_parent_pieces: int = opt(1, _int, "pieces in flight per parent")
    piece_timeout_s: float = opt(4.0, _float, "base time allowed for one piece")
    piece_timeout_per_mib_s: float = opt(2.0, _float, "extra time allowed per MiB of piece")
    schedule_rounds: int = opt(4, _int, "failed scheduling rounds before going back to source")
    scheduler_timeout_s: float = opt(3.0, _float, "time allowed for one scheduler call")
    wait_for_seed_s: float = opt(60.0, _float, "time to wait for the first piece before going back to source")
    # On by default: at fleet scale it is what keeps the scheduler out of the per-piece path
    # (issue 17), and it costs the peers no more CPU than syncing every 0.2 s (a child polls only
    # parents it does not hear on piece answers). Off: the old 0.2 s clock, for comparison.
    peer_news: bool = opt(
        True,
        _bool,
        "learn what parents hold from the parents (a long-poll per parent; a dead parent is noticed at once) "
        "and ask the scheduler only to join, for parents, digests and about 10 times per pull; off: sync every 0.2 s",
    )
    attest_public_key: str | None = opt(
        None,
        _opt_path,
        "the seeds' Ed25519 public key(s), PEM: a blob fetched whole from peers against digests a seed "
        "signed as sha256-checked is not hashed again; unset: every blob is hashed",
    )
    registry_mirror: str | None = opt(
        None, _opt_url, "upstream for requests without ?ns= (docker registry-mirrors)", flag="--registry-mirror"
    )
    # When the WAN link is down (issue 13): see peer/verdicts.py, peer/sitepeers.py, peer/manifests.py.
    site_peers: tuple[str, ...] = opt(
        (),
        _site_peers,
        "hosts of this site asked for a blob when no scheduler answers: HOST:PORT of a piece server "
        "(or its URL), or one DNS NAME:PORT with an address per host",
        flag="--site-peer",
        repeat=True,
    )
    registry_connect_timeout_s: float = opt(
        2.0,
        _float,
        "a registry that does not accept a connection within this is unreachable (WAN down: earlier yeses "
        "and the manifest cache stand in for it at once); raise it for links with a long round trip",
    )
    site_lookup_timeout_s: float = opt(
        1.0, _float, "time allowed for asking the site's hosts who holds a blob (no scheduler answering)"
    )
    offline_grace_s: float = opt(
        86400.0,
        _float,
        "while the registry cannot be reached, reuse its last yes to the same credentials and repository "
        "if no older than this; 0: never",
    )
    serve_stale_tags: bool = opt(
        False, _bool, "while the registry cannot be reached, answer a manifest by tag with its last known digest"
    )


C = TypeVar("C")


def from_mapping(
    cls: type[C], data: Mapping[str, object], *, source: str = "config", from_flags: Collection[str] = ()
) -> C:
    """Build a config from a mapping, parsing each value; unknown keys are errors. An error
    names the flag and the YAML key, the one the user typed first: `--upload-rate
    (upload_rate_bps)` for a key in `from_flags`, `FILE: upload_rate_bps (--upload-rate)` else."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(fields)}")
    flags = flag_names(cls)

    def name(key: str) -> str:
        return f"{flags[key]} ({key})" if key in from_flags else f"{source}: {key} ({flags[key]})"

    values: dict[str, Any] = {}
    for key, value in data.items():
        try:
            values[key] = fields[key].metadata["parse"](value)
        except ConfigError as exc:
            raise ConfigError(f"{name(key)}: {exc}") from None
    config = cls(**values)
    if ANY_REGISTRY in getattr(config, "allowed_registries", ()) and not getattr(config, "cluster_secret", None):
        raise ConfigError(
            f"{source}: allowed_registries '*' needs a cluster_secret: without one, anyone who reaches "
            "the scheduler could make seeds fetch from any host"
        )
    high, low = getattr(config, "cache_high_watermark", 1.0), getattr(config, "cache_low_watermark", 0.0)
    if low > high:
        raise ConfigError(f"{source}: cache_low_watermark ({low}) is above cache_high_watermark ({high})")
    if isinstance(config, NodeConfig):
        _check_advertise(config, name)
    return config


# Addresses that mean "every interface" when listening, and nothing another host can dial.
_ANY_HOSTS = ("0.0.0.0", "::", "")


def _check_advertise(config: NodeConfig, name: Callable[[str], str]) -> None:
    """Other peers dial the advertised URL: it must name this host, not every interface."""
    host, port = parse_hostport(config.listen)
    if config.advertise is not None:
        advertised = urlsplit(config.advertise).hostname or ""
        if advertised in _ANY_HOSTS:
            raise ConfigError(
                f"{name('advertise')}: {config.advertise!r} cannot be dialled by other peers; "
                f"advertise this host's own address, e.g. http://10.0.0.5:{port}"
            )
    elif host in _ANY_HOSTS:
        raise ConfigError(
            f"{name('listen')}: {config.listen!r} listens on every interface and no advertise URL is "
            f"set (--advertise, YAML advertise), so other peers would be told to dial {host or 'nothing'}; "
            f"add --advertise http://HOST:{port} with an address of this host they can reach"
        )


def load(cls: type[C], path: str | Path | None, overrides: Mapping[str, object] = {}) -> C:
    """Read YAML (if given) with yaml.safe_load, then apply flag overrides on top."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        data.update(loaded)
    flagged = {k: v for k, v in overrides.items() if v is not None}
    data.update(flagged)
    for key, env in (("cluster_secret", CLUSTER_SECRET_ENV), ("preheat_token", PREHEAT_TOKEN_ENV)):
        from_env = os.environ.get(env)
        if not data.get(key) and from_env and _has_field(cls, key):
            try:
                data[key] = _opt_secret(from_env)
            except ConfigError as exc:
                raise ConfigError(f"{env}: {exc}") from None
    return from_mapping(cls, data, source=str(path) if path is not None else "flags", from_flags=flagged)


def describe(config: object) -> str:
    """Every field as `key=value` for the start-up log line; secret fields only say whether
    they are set."""
    parts = []
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if not f.repr:
            value = "<set>" if value else "<unset>"
        elif isinstance(value, tuple):
            value = ",".join(value) or "none"
        parts.append(f"{f.name}={value}")
    return " ".join(parts)


def _has_field(cls: type[Any], name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def add_flags(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One flag per field; flags are left as strings (None when absent) and parsed by load()."""
    parser.add_argument("--config", metavar="FILE", help="YAML config file; flags override it")
    for f in dataclasses.fields(cls):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not None else "none"
        if isinstance(default, tuple):
            default = ", ".join(default) or "none"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{f.metadata['help']} (default: {default})"}
        if f.metadata["repeat"]:
            kwargs["action"] = "append"
        parser.add_argument(flag, **kwargs)


def flag_overrides(args: argparse.Namespace, cls: type[Any]) -> dict[str, object]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def flag_names(cls: type[Any]) -> dict[str, str]:
    """Field name → flag, for tests and the deploy checks."""
    return {f.name: f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)}
