"""A site's seed in the tiered shape, on loopback with real processes: it fetches through the
core cluster's mirror (a core peer's proxy port) instead of the origin, so the origin sends
the blob once for the core and every site; a WAN cut mid-body resumes by Range from the last
verified piece; and `--wan-rate` caps what it takes over the WAN link."""

from __future__ import annotations

import time
from pathlib import Path

from lab import procs
from lab.faultrelay import FaultPlan, FaultRelayProcess
from tests.e2e.test_faults import PIECE, resumed_at
from tests.support.cluster import ClusterFactory, MiB, sha256_file
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

WAN_RATE_BPS = 12 * MiB


def test_site_seed_pulls_through_the_core_mirror_resumes_after_a_wan_cut_and_keeps_to_its_wan_rate(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    image = push_to_origin((24 * MiB,), 61, "tiered/app")
    layer = image.layers[0]
    core = cluster_factory()
    (core_peer,) = core.add_peers(1)
    assert core_peer.proxy_url is not None
    cut = 2 * PIECE + 12345
    # The site's WAN link: the first blob GET across it is cut part-way into piece 2.
    wan = FaultRelayProcess(
        tmp_path, core_peer.proxy_url.removeprefix("http://"), FaultPlan(resets=1, reset_after_bytes=cut), name="wan"
    )
    site: list[procs.Service] = []
    try:
        site.append(procs.start_scheduler(tmp_path, name="site-scheduler"))
        upstream = ["--upstream", wan.url, "--wan-rate", str(WAN_RATE_BPS), "--site", "store-1"]
        site.append(procs.start_seed(tmp_path, site[0].url, "site-seed", extra_args=upstream))
        site += [procs.start_peer(tmp_path, site[0].url, f"site-peer{i}", ["--site", "store-1"]) for i in range(2)]

        started = time.monotonic()
        outs = core.pull_all(site[2:], core.blob_url("tiered/app", layer.digest), "site")
        elapsed = time.monotonic() - started

        assert [sha256_file(out) for out in outs] == [layer.digest] * 2
        stats = wan.stats()
        assert stats["resets"] == 1
        # The first GET asked for the whole blob, the retry for the rest from a verified piece.
        assert stats["ranges"][0] == ""
        first = resumed_at(stats["ranges"][1], at_most=cut)
        assert len(stats["ranges"]) == 2, f"the site's seed fetched more than once: {stats['ranges']}"
        # Across the WAN: the blob once, plus what followed the last verified piece before the cut.
        assert stats["blob_body_bytes"] <= layer.size + (cut - first)
        # The origin sent the blob once, to the core's seed; the site's peers took it from theirs.
        assert core.relay.stats(fresh=True)["downstream_bytes"] < layer.size * 1.05
        assert metric(core.seeds[0].url, "p2pdist_seed_download_bytes_total", 'source="origin"') == layer.size
        for peer in site[2:]:
            assert metric(peer.url, "p2pdist_peer_back_to_source_total") == 0
        # The WAN cap: the blob and the resent part cannot cross faster than --wan-rate.
        assert elapsed >= 0.9 * (layer.size + cut - first - (1 << 20)) / WAN_RATE_BPS, f"{elapsed:.1f} s"
    finally:
        for service in reversed(site):
            service.stop()
        wan.stop()
