"""`p2pdist get` parses its flags with a parser of its own (the full one costs a tenth of a
second of start-up): it must take exactly the flags the full parser lists for `get`."""

from __future__ import annotations

import argparse

import pytest

from p2pdist.cli.main import build_parser, get_parser, main

URL = "http://registry.test/v2/a/blobs/sha256:" + "0" * 64


def test_the_get_parser_takes_the_same_flags_and_defaults_as_the_full_one() -> None:
    full = build_parser()
    subparsers = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    listed = subparsers.choices["get"]
    argv = [URL, "-o", "out", "--peer", "http://127.0.0.1:9", "--user", "u:p", "--timeout", "7", "-q"]
    assert vars(get_parser().parse_args(argv)) == {**vars(listed.parse_args(argv)), "command": "get"}
    assert vars(get_parser().parse_args([URL, "-o", "out"])) == {
        **vars(listed.parse_args([URL, "-o", "out"])),
        "command": "get",
    }
    assert set(get_parser()._option_string_actions) == set(listed._option_string_actions)


def test_a_get_usage_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["get", URL])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "p2pdist get: error: the following arguments are required: -o/--output (see p2pdist get --help)\n"
    )
