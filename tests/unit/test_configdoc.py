"""The README's configuration table is the config classes' own: it must equal what
`p2pdist.cli.configdoc` makes from them, and every flag in it must be one the real CLI takes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from p2pdist.cli import configdoc
from p2pdist.cli.main import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_table() -> str:
    text = README.read_text()
    return text[text.index(configdoc.BEGIN) + len(configdoc.BEGIN) : text.index(configdoc.END)].strip() + "\n"


def test_the_readme_table_is_the_one_the_config_classes_make() -> None:
    assert readme_table() == configdoc.table(), (
        "README.md's config table is stale: run `.venv/bin/python -m p2pdist.cli.configdoc --write README.md`"
    )


def test_every_flag_in_the_table_is_taken_by_the_cli_of_each_service_that_has_it() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for line in readme_table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        flag = re.fullmatch(r"`(--[a-z-]+)`(?: \(repeat\))?", cells[1])
        assert flag, line
        for (service, _), default in zip(configdoc.SERVICES, cells[2:5], strict=True):
            options = subparsers.choices[service]._option_string_actions
            assert (flag.group(1) in options) == (default != "—"), (service, line)


def test_the_disagreements_the_walk_through_found_are_gone() -> None:
    rows = {line.split("|")[1].strip(): line for line in readme_table().splitlines()[2:]}
    assert "| `8` | — | — |" in rows["`candidate_parents`"]  # the README said 4
    assert (
        "| — | `0` | `0` | concurrent piece uploads before answering busy; 0: from the upload rate"
        in rows["`upload_slots`"]
    )  # it said 16 and 32
    assert "| — | — | `1` |" in rows["`per_parent_pieces`"]  # it said 3
    for key in ("`advertise`", "`scheduler_timeout_s`", "`announce_interval_s`", "`drain_timeout_s`"):
        assert key in rows
