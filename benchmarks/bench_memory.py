"""Peak memory against draws K, queries Q and the model (issue 34): memory set by the budget, not by batch x K.

    python benchmarks/bench_memory.py [--parts digits cifar] [--draws 10 100 400] [--queries 8 64 256] [--memory 1GiB]

Every measurement runs in a fresh single-threaded process (results are cached in ``--out``, so a rerun
resumes) and reports the peak anonymous resident set (``RssAnon``, sampled every 2 ms; memory-mapped
stores do not count) of the whole process, and its working set: the peak less the footprint after
imports, data and model. The passes, at ``--batch-size`` 64 throughout:

* ``featurize``: D-TRAK features (structured projection) of ``--train`` training digits at K draws;
* ``influence rows``: the stored EK-FAC rows of the same images at K draws;
* ``stored`` / ``exact``: EK-FAC scores of Q held-out digits (stored: the queries at K draws, from rows
  written beforehand at one draw, which sets their values, not the scoring's memory; exact: both sides at K draws).

``--parts cifar`` measures the 35.7M-parameter UNet of ``configs/cifar32.yaml`` on N = 16 random
32 x 32 images at K = 100: featurisation, and stored scoring of 8 queries (its factors and rows are
fitted first, unmeasured). The reference is the smallest setting of each pass, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from common import rss_anon_mib, timed_peak

BATCH = 64


def child(spec: dict, root: Path) -> dict:
    import torch

    from wherefrom import memory
    from wherefrom.attribution.influence import influence_scores
    from wherefrom.datamodules import ArrayDataModule, DigitsDataModule
    from wherefrom.features import FeatureConfig, featurize
    from wherefrom.kfac import FactorConfig, fit_factors
    from wherefrom.kfac.stored import InfluenceConfig, featurize_influence
    from wherefrom.model import DiffusionModel
    from wherefrom.store import Store

    torch.set_num_threads(1)
    memory.set_budget(spec["memory"])
    if spec["model"] == "digits":
        module = DiffusionModel(seed=0).eval()
        data = DigitsDataModule(subset=list(range(spec["train"])))
        data.setup()
        queries = DigitsDataModule().images[1000 : 1000 + spec["queries"]]
    else:
        unet = yaml.safe_load(Path(spec["fit_config"]).read_text())["model"]["init_args"]["unet"]
        module = DiffusionModel(unet=unet, seed=0).eval()
        data = ArrayDataModule(str(root / "cifar_images.npy"))
        data.setup()
        queries = -data.images[: spec["queries"]]
    net, task, k = module.unet, module.task, spec["draws"]
    fitted = root / f"{spec['model']}-fitted"  # factors and default-K rows, written once by a "fit" child

    shutil.rmtree(root / "scratch", ignore_errors=True)  # a fresh store: a pass must not resume
    scratch = Store(root / "scratch", data.fingerprint)
    if spec["pass"] == "influence rows":  # its factors, unmeasured
        fit_factors(net, "model", task, data, data.indices, scratch, FactorConfig(passes=1, ekfac=True), BATCH)

    def run() -> None:
        if spec["pass"] == "fit":
            store = Store(fitted, data.fingerprint, overwrite=True)
            fit_factors(net, "model", task, data, data.indices, store, FactorConfig(passes=1, ekfac=True), BATCH)
            featurize_influence(net, "model", task, data, data.indices, store, InfluenceConfig(timesteps=1), BATCH)
        elif spec["pass"] == "featurize":
            featurize(net, "model", task, data, scratch, FeatureConfig(output="square_norm", timesteps=k), BATCH)
        elif spec["pass"] == "influence rows":
            featurize_influence(net, "model", task, data, data.indices, scratch, InfluenceConfig(timesteps=k), BATCH)
        elif spec["pass"] == "stored":
            influence_scores(module, data, queries, Store.open(fitted), "loss", ekfac=True, grads="stored", batch_size=BATCH, query_timesteps=k)
        else:
            influence_scores(module, data, queries, Store.open(fitted), "loss", ekfac=True, grads="exact", config=FeatureConfig(output="loss", timesteps=k), batch_size=BATCH)

    base = rss_anon_mib()
    seconds, peak = timed_peak(run)
    return {**spec, "seconds": seconds, "base_mib": base, "peak_mib": peak, "params": sum(p.numel() for p in net.parameters())}


def measured(spec: dict, root: Path) -> dict:
    """``child(spec)`` in a fresh process, or its cached result."""
    name = "-".join(str(spec[k]) for k in ("model", "pass", "draws", "queries", "memory")).replace(" ", "_")
    done = root / f"{name}.json"
    if not done.is_file():
        print(f"[bench_memory] {name} ...", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, __file__, "--out", str(root), "--child", json.dumps(spec)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        done.write_text(r.stdout.strip().splitlines()[-1])
    return json.loads(done.read_text())


def table(rows: list[dict]) -> None:
    ref = rows[0]
    print("| pass | K | Q | peak MiB | working set MiB | peak vs ref | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["queries"] if r["pass"] in ("stored", "exact") else "-"
        print(f"| {r['pass']} | {r['draws']} | {q} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f} | {r['seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=["digits", "cifar"], default=["digits", "cifar"])
    p.add_argument("--draws", type=int, nargs="+", default=[10, 100, 400])
    p.add_argument("--queries", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--train", type=int, default=64, help="training digits featurised and scored")
    p.add_argument("--memory", default=None, help="the budget (default: the library's, 1GiB on the CPU)")
    p.add_argument("--fit-config", default="configs/cifar32.yaml")
    p.add_argument("--out", default="runs/bench_memory")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    root = Path(a.out)
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child), root)))
        return
    root.mkdir(parents=True, exist_ok=True)
    common = {"memory": a.memory, "train": a.train, "fit_config": a.fit_config}
    print(f"Budget: {a.memory or 'the library default (1 GiB on the CPU)'}; batch size {BATCH}; one thread per process.\n")
    if "digits" in a.parts:
        digits = {**common, "model": "digits", "queries": min(a.queries)}
        measured({**digits, "pass": "fit", "draws": 1}, root)
        for kind in ("featurize", "influence rows"):
            rows = [measured({**digits, "pass": kind, "draws": k}, root) for k in a.draws]
            if kind == "featurize":
                print(f"Digits UNet ({rows[0]['params'] / 1e6:.2f}M parameters), N = {a.train} training digits\n")
            table(rows)
            # the reference recipe: the same pass unchunked (a budget nothing reaches), as before budgets
            ref = measured({**digits, "pass": kind, "draws": max(a.draws), "memory": "1TiB", "queries": 0}, root)
            print(f"\nunchunked reference (K = {ref['draws']}): peak {ref['peak_mib']:.0f} MiB, {ref['seconds']:.0f} s; "
                  f"budgeted / unchunked: memory {rows[-1]['peak_mib'] / ref['peak_mib']:.2f}, time {rows[-1]['seconds'] / ref['seconds']:.2f}\n")
        for kind in ("stored", "exact"):
            table([measured({**digits, "pass": kind, "draws": k, "queries": q}, root) for k in a.draws for q in a.queries])
            print()
    if "cifar" in a.parts:
        if not (root / "cifar_images.npy").is_file():
            np.save(root / "cifar_images.npy", np.random.default_rng(0).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8))
        cifar = {**common, "model": "cifar32", "queries": 8, "draws": 100}
        measured({**cifar, "pass": "fit", "draws": 1}, root)
        rows = [measured({**cifar, "pass": kind}, root) for kind in ("featurize", "stored")]
        print(f"cifar32 UNet ({rows[0]['params'] / 1e6:.1f}M parameters), N = 16, K = 100, 8 queries (goal: under 8 GB)\n")
        table(rows)


if __name__ == "__main__":
    main()
