"""The Grafana dashboard in deploy/ names only metrics the services export: every name in its
queries is checked against the metric families of the real registries."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from p2pdist.node.metrics import DaemonMetrics
from p2pdist.storage.quota import CacheQuota
from p2pdist.storage.store import Store
from peer.proxy import MirrorMetrics
from scheduler.service import Metrics as SchedulerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "p2pdist.json"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}


def exported_names(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def every_exported_name(tmp_path: Path) -> set[str]:
    names: set[str] = set()
    for role in ("peer", "seed"):
        metrics = DaemonMetrics(role)
        CacheQuota(Store(tmp_path / role), None, 0.9, 0.7, registry=metrics.registry, role=role)
        if role == "peer":
            MirrorMetrics(SimpleNamespace(metrics=metrics, kind=role))  # type: ignore[arg-type]
        names |= exported_names(metrics.registry)
    return names | exported_names(SchedulerMetrics().registry)


def test_every_metric_the_dashboard_queries_is_exported(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\b(?:p2pdist|process)_[a-z0-9_]+\b", expr)}
    assert len(queried) >= 25
    missing = queried - every_exported_name(tmp_path)
    assert not missing, f"the dashboard queries metrics no service exports: {sorted(missing)}"


def test_the_dashboard_covers_the_figures_an_operator_asks_for() -> None:
    text = DASHBOARD.read_text()
    for name in (
        'p2pdist_peer_download_bytes_total{source="origin"}',
        "p2pdist_peer_back_to_source_total",
        "p2pdist_peer_mirror_requests_total",
        "p2pdist_peer_cache_quota_bytes",
        "p2pdist_peer_upload_slots",
        "p2pdist_build_info",
    ):
        assert name.replace('"', '\\"') in text or name in text, name
