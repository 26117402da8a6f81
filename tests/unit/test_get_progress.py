"""What `p2pdist get` shows while it runs and when it ends: a line that fits the terminal
with elapsed time, rate and ETA, a word instead of a blank line before the first byte, and
a summary of where the bytes came from."""

from __future__ import annotations

import pytest

from p2pdist.cli.get import progress_line, summary

MiB = 1 << 20


def test_before_the_first_byte_it_says_what_it_waits_for() -> None:
    assert progress_line(0, 40 * MiB, 1.5, 0.0, 80) == "waiting for the first piece ..."


@pytest.mark.parametrize("width", [20, 40, 60, 80, 200])
def test_the_line_fits_the_terminal_and_keeps_the_figures_first(width: int) -> None:
    line = progress_line(10 * MiB, 40 * MiB, 65.0, 2 * MiB, width)
    assert len(line) <= width
    if width >= 60:
        assert "25.0%" in line and "10.0 MiB/40.0 MiB" in line and "2.0 MiB/s" in line
        assert "1:05" in line and "ETA 0:15" in line  # 30 MiB left at 2 MiB/s
    if width >= 80:
        assert line.startswith("[") and "#" in line  # room for a bar as well


def test_without_a_length_there_is_no_bar_and_no_eta() -> None:
    line = progress_line(3 * MiB, None, 2.0, MiB, 100)
    assert "ETA" not in line and "[" not in line and "3.0 MiB" in line


def test_the_summary_names_bytes_time_and_where_they_came_from() -> None:
    line = summary(40 * MiB, 4.0, "layer.tar", {"peer": 24 * MiB, "seed": 16 * MiB, "origin": 0})
    assert line == (
        "40.0 MiB in 4.0 s (10.0 MiB/s) to layer.tar: 24.0 MiB from peers, 16.0 MiB from the seed, 0 B from the origin"
    )
    assert summary(MiB, 1.0, "x", {"peer": 0, "seed": 0, "origin": 0}).endswith(": the peer held it already")
    assert summary(MiB, 1.0, "x", None) == "1.0 MiB in 1.0 s (1.0 MiB/s) to x"
