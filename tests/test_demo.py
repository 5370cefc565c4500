"""A tiny end-to-end demo run writes every file its report shows, for every method that ran."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from wherefrom.attribution.cli import METHODS
from wherefrom.cli import main as cli_main
from wherefrom.demo import DemoConfig
from wherefrom.errors import WherefromError


def test_tiny_demo_writes_the_whole_report(tmp_path):
    out = tmp_path / "demo"
    cli_main(["demo", "--out", str(out), "--tiny"])
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())

    # every image the report links exists and is a PNG
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"samples.png", "ablated.png", "evaluation.png"} <= set(links)
    for link in links:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link

    # every registered method ran (its capture callback exists), with a top-k grid, a table row and both scores
    assert results["status"] == {m: "ok" for m in METHODS}
    ran = list(results["status"])
    assert "random" in ran and set(ran) == set(results["methods"])
    for m in ran:
        assert f"methods/{m}/topk.png" in links
        assert np.load(out / "methods" / m / "scores.npy").shape == (2, 20)
        row = next(line for line in report.splitlines() if line.startswith(f"| {m} |"))
        assert row.count("[") == 2
        for key in ("lds", "loo"):
            assert -1 <= results["methods"][m][key]["mean"] <= 1
    # the subset models and the leave-one-out distances behind the numbers
    assert np.load(out / "lds" / "measurements.npy").shape == (3, 1, 2)
    assert np.load(out / "loo" / "distances.npy").shape == (2, 3)
    assert results["total_seconds"] > 0 and "| **total** |" in report


def test_bad_sizes_are_clear_errors():
    with pytest.raises(WherefromError, match="num-images"):
        DemoConfig(num_images=5000)
    with pytest.raises(WherefromError, match="lds-subsets"):
        DemoConfig(lds_subsets=1)
    with pytest.raises(WherefromError, match="scheduler"):
        DemoConfig(scheduler="euler")
