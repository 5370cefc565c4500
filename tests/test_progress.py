"""progress.py (issue 38, item 11): in a log that is not a terminal, long work shows plain lines, no escape
codes: the first after the first timed item with the time left it implies, quarters, the total; inner
work inside outer work stays silent, so a log shows one piece of work at a time."""

from __future__ import annotations

import re

from wherefrom.progress import progress_bar


def test_plain_lines_outside_a_terminal(capsys):
    for _ in progress_bar(range(8), desc="outer"):
        for _ in progress_bar(range(3), desc="inner", leave=False):
            pass
    bar = progress_bar(total=10, desc="rows")
    bar.update(4)
    bar.update(6)
    bar.close()
    for _ in progress_bar(range(3), desc="hidden", disable=True):
        pass
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err and "inner" not in err and "hidden" not in err
    lines = err.splitlines()
    assert re.fullmatch(r"outer: 1/8 in \d+\.\d s; about \d+ s left", lines[0])
    assert [line.split(" (")[0] for line in lines[1:4]] == ["outer: 2/8", "outer: 4/8", "outer: 6/8"]
    assert re.fullmatch(r"outer: done, 8/8 in \d+ s", lines[4])
    assert re.fullmatch(r"rows: 4/10 in \d+\.\d s; about \d+ s left", lines[5]) and re.fullmatch(r"rows: done, 10/10 in \d+ s", lines[6])
    assert len(lines) == 7
