"""Test and benchmark lab: real origin registry, generated images, relays, service processes.

Shared by the tests, `benchmarks/demo.py` and later benchmarks. Nothing here is used by the
services themselves. Submodules are imported explicitly (`from lab.registry import Origin`).
"""

from __future__ import annotations

from typing import Self


class LabError(Exception):
    """A piece of lab infrastructure could not be started, used or verified."""


class Stoppable:
    """Something the lab started and must stop: `with` it, and `stop()` runs on the way out."""

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
