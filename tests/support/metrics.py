"""Reading Prometheus text the way the tests assert on it: a metric summed over matching
samples (fetched from a service), or one sample's value out of a page already fetched."""

from __future__ import annotations

import httpx


def metric(service_url: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus metric's samples whose name and label text match."""
    text = httpx.get(f"{service_url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if (key == name or key.startswith(name + "{")) and labels in key:
            total += float(value)
    return total


def sample(metrics_text: str, key: str) -> float:
    """One sample's value from Prometheus text, 0 when absent."""
    for line in metrics_text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == key:
            return float(value)
    return 0.0
