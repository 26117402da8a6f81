"""Sites and locations of hosts: what a valid name is, and how near two locations are.

A site is a group of hosts behind one WAN link (a store, a ship, a branch office); the empty
site is the one site every host is in until sites are configured. A location is an optional
`/`-separated hierarchy (`eu/fr/paris-3`): the longer the prefix two hosts share, the nearer.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MAX_LOCATION_PARTS = 8


def site_problem(value: object) -> str | None:
    """Why `value` is not a site name (letters, digits, `.`, `_`, `-`; at most 63), or None."""
    if not isinstance(value, str):
        return "expected a string"
    if value and not _NAME.fullmatch(value):
        return "want up to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def location_problem(value: object) -> str | None:
    """Why `value` is not a location (site-like names joined by `/`, at most 8), or None."""
    if not isinstance(value, str):
        return "expected a string"
    if not value:
        return None
    parts = value.split("/")
    if len(parts) > MAX_LOCATION_PARTS or not all(_NAME.fullmatch(p) for p in parts):
        return f"want up to {MAX_LOCATION_PARTS} names joined by '/', like eu/fr/paris-3"
    return None


def nearness(a: str, b: str) -> int:
    """How many leading parts two locations share: 0 when either is unknown."""
    if not a or not b:
        return 0
    shared = 0
    for x, y in zip(a.split("/"), b.split("/"), strict=False):
        if x != y:
            break
        shared += 1
    return shared
