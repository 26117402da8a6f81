"""A tiered site's seed fetches the origin's blobs through the core cluster's mirror: the URL
it asks there, and the config that puts it there."""

from __future__ import annotations

import pytest

from p2pdist.config import ConfigError, SeedConfig, from_mapping
from seed.fetch import upstream_url

BLOB = "http://10.213.0.1:5000/v2/edge/app/blobs/sha256:" + "ab" * 32


def test_without_an_upstream_the_seed_fetches_the_origins_url() -> None:
    assert upstream_url(BLOB, None) == (BLOB, None)


def test_through_an_upstream_the_seed_asks_the_mirror_as_containerd_does() -> None:
    url, scheme = upstream_url(BLOB, "http://10.213.0.1:4001/")
    assert url == "http://10.213.0.1:4001/v2/edge/app/blobs/sha256:" + "ab" * 32 + "?ns=10.213.0.1%3A5000"
    assert scheme == "http"


def test_an_https_origin_keeps_its_scheme_through_the_mirror() -> None:
    url, scheme = upstream_url("https://registry.example:443/v2/a/b/blobs/sha256:" + "0" * 64, "http://core:4001")
    assert url.startswith("http://core:4001/v2/a/b/blobs/sha256:")
    assert scheme == "https"


def test_upstream_and_wan_rate_are_read_from_yaml() -> None:
    config = from_mapping(SeedConfig, {"upstream": "http://core-mirror:4001", "wan_rate_bps": "4MiB"})
    assert config.upstream == "http://core-mirror:4001"
    assert config.wan_rate_bps == 4 << 20


def test_an_upstream_that_is_no_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="upstream"):
        from_mapping(SeedConfig, {"upstream": "core-mirror"})
