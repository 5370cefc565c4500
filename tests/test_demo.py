"""A tiny end-to-end demo run writes every file its report shows, for every registered attributor,
and a bad option touches nothing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.helpers import cli
from wherefrom.attribution.api import ATTRIBUTORS
from wherefrom.cli.options import flag
from wherefrom.datamodules import DigitsDataModule
from wherefrom.demo import DemoConfig
from wherefrom.errors import WherefromError


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_demo_writes_the_whole_report(tmp_path, capsys):
    out = tmp_path / "demo"
    code, err = cli(capsys, "demo", "--out", str(out), "--tiny")
    assert code == 0, err
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())

    # every image the report links exists and is a PNG
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"counterfactuals.png", "evaluation.png"} <= set(links)
    for link in links:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link

    pool = DigitsDataModule(pool_size=20, pool_seed=0)
    pool.setup()
    pool = set(pool.indices.tolist())
    # every registered attributor ran on both query sets (synthetic ablation: on the ensemble's own samples only)
    expected = {f"{m}/{s}": "ok" for m in ATTRIBUTORS for s in ("generated", "real") if (m, s) != ("ablation", "real")}
    assert {k: v for k, v in results["status"].items() if k != "ablation/real"} == expected
    for qset in ("generated", "real"):
        assert set(results["methods"][qset]) == {m for m in ATTRIBUTORS if (m, qset) != ("ablation", "real")}
        for m, r in results["methods"][qset].items():
            assert f"methods/{qset}/{m}/topk.png" in links
            assert np.load(out / "methods" / qset / m / "scores.npy").shape == (3, 1797)
            row = next(line for line in report.splitlines() if line.startswith(f"| {m} |") and "[" in line)
            assert row.count("[") >= 3  # loss rise, (distance,) LDS and the class fraction, each with an interval
            assert len(r["loss_rise_per_query"]) == 3 and -1 <= r["lds"]["mean"] <= 1
            assert set(np.ravel(r["removed"])) <= pool  # top-k ranks the training images only
    assert results["winner"]["generated"] in ATTRIBUTORS and "won." in report
    # the browsable report of each query set, linked from report.md, holds every method's run
    for qset in ("generated", "real"):
        assert f"(report/{qset}/index.html)" in report
        page = (out / "report" / qset / "index.html").read_text()
        assert all(f'"method": "{m}"' in page for m in results["methods"][qset])
        assert '"figures": ["images/figure_0.png", "images/figure_1.png"]' in page and (out / "report" / qset / "images" / "figure_1.png").is_file()
    assert {"ensemble samples", "real held-out digits"} <= set(results["quality"])
    # the subset models behind the LDS and the fit's LightningCLI config
    assert np.load(out / "lds" / "measurements.npy").shape == (3, 1, 6)
    assert (out / "ensemble" / "fit.yaml").is_file() and results["total_seconds"] > 0 and "| **total** |" in report

    # a rerun into the demo's own folder replaces its outputs; an invalid option leaves it byte-identical
    before = snapshot(out)
    code, err = cli(capsys, "demo", "--out", str(out), "--tiny", "--code-weight", "9")
    assert code == 2 and err.count("\n") == 1 and snapshot(out) == before


def test_tiny_demo_under_flow_matching_runs_every_method(tmp_path, capsys):
    """The whole demo (ensemble fit with the capture callbacks, Euler sampling, every attributor, synthetic
    ablation through the Euler chain, the LDS subset models) on a rectified-flow objective."""
    out = tmp_path / "demo"
    code, err = cli(capsys, "demo", "--out", str(out), "--tiny", "--objective", "flow_matching")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in results["status"].items() if k != "ablation/real"} == {
        f"{m}/{s}": "ok" for m in ATTRIBUTORS for s in ("generated", "real") if (m, s) != ("ablation", "real")
    }
    assert "objective: flow_matching" in (out / "ensemble" / "fit.yaml").read_text()
    assert np.isfinite(np.load(out / "methods" / "generated" / "ekfac" / "scores.npy")).all()


def test_a_bad_option_never_touches_a_users_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "store").mkdir(parents=True)
    (out / "store" / "keep.txt").write_text("user data")
    for bad in (["--removal-k", "0"], ["--batch-size", "7", "--devices", "2"], ["--real-queries", "5000"]):
        code, err = cli(capsys, "demo", "--out", str(out), "--tiny", *bad)
        assert code == 2 and "Traceback" not in err
    code, err = cli(capsys, "demo", "--out", str(out), "--tiny")
    assert code == 2 and "--overwrite" in err
    assert snapshot(out) == {"store/keep.txt": b"user data"}


def test_bad_sizes_are_clear_errors():
    # the Python API names its keyword arguments; the command line (spell=flag) its flags
    with pytest.raises(WherefromError, match=r"^num_images must be in \[2, 1797\)"):
        DemoConfig(num_images=5000)
    with pytest.raises(WherefromError, match="^--num-images must be in"):
        DemoConfig(num_images=5000, spell=flag)
    with pytest.raises(WherefromError, match="lds_subsets"):
        DemoConfig(lds_subsets=1)
    with pytest.raises(WherefromError, match="scheduler"):
        DemoConfig(scheduler="lms")
    with pytest.raises(WherefromError, match=r"^objective: unknown objective 'x1'"):
        DemoConfig(objective="x1")
    with pytest.raises(WherefromError, match=r"^FlowMatching samples with \['euler'\], not 'ddim'"):
        DemoConfig(objective="flow_matching", scheduler="ddim")
