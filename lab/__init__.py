"""Test and benchmark lab: real origin registry, generated images, relays, service processes.

Shared by the tests, `benchmarks/demo.py` and later benchmarks. Nothing here is used by the
services themselves. Submodules are imported explicitly (`from lab.registry import Origin`).
"""


class LabError(Exception):
    """A piece of lab infrastructure could not be started, used or verified."""
