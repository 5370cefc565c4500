"""Featurisation throughput and peak memory vs N on 32 x 32 RGB images, up to N = 50,000.

    python benchmarks/bench_scale.py [--sizes 1000 10000 50000] [--out runs/bench_scale] [--fit-config configs/cifar32.yaml]

For each N, in a fresh single-threaded process: ``featurize`` (D-TRAK, structured projection,
K = 1, D = 256) of N random 3 x 32 x 32 images from an ``.npy`` into a store, D-TRAK scores of
16 queries from the memory-mapped features (blockwise), one K-FAC factor pass, the stored
influence featurisation (default ``dim``, K = 1) and K-FAC scores of the 16 queries from it. Peak memory
is the largest anonymous resident set (``RssAnon``: the memory-mapped features' page cache does
not count) sampled every 2 ms, less the process's footprint before the data was loaded.

``--fit-config`` takes the UNet of a fit config instead of the small default (e.g. the 35.7M-parameter
CIFAR-10 UNet of ``configs/cifar32.yaml``). The reference is the same recipe at the smallest N, measured in the same run: throughput ratios
near 1 mean cost linear in N; memory is printed beside the data's own float32 size (the
datamodule holds the images) and the dense N x D feature matrix that memory-mapping avoids.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml
from common import rss_anon_mib, timed_peak

from wherefrom.model import build_unet
from wherefrom.store import Entry

UNET = dict(
    sample_size=32, in_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)  # fmt: skip
DIM, QUERIES, BATCH = 256, 16, 64


def child(n: int, root: Path, unet: dict) -> dict:
    import torch

    from wherefrom.attribution.influence import influence_scores
    from wherefrom.attribution.trak import query_features, trak_scores
    from wherefrom.datamodules import ArrayDataModule
    from wherefrom.features import FeatureConfig, featurize
    from wherefrom.kfac import FactorConfig, fit_factors
    from wherefrom.kfac.stored import InfluenceConfig, featurize_influence
    from wherefrom.store import Store
    from wherefrom.task import DiffusionTask

    torch.set_num_threads(1)
    shutil.rmtree(root / f"store{n}", ignore_errors=True)  # a fresh store: featurize must not resume
    base = rss_anon_mib()
    data = ArrayDataModule(str(root / f"images{n}.npy"))
    data.setup()
    net, task = build_unet(unet, 0).eval(), DiffusionTask()
    config = FeatureConfig(output="square_norm", timesteps=1, proj_dim=DIM)
    store = Store(root / f"store{n}", data.fingerprint, overwrite=True)
    feat_s, feat_peak = timed_peak(lambda: featurize(net, "model", task, data, store, config, BATCH))
    queries = data.images[:QUERIES] * -1
    phi = store.read_array(Entry.features(config.output, "model"))

    run = SimpleNamespace(task=task)  # what query_features reads of a module
    score_s, score_peak = timed_peak(lambda: trak_scores([phi], [query_features(net, run, "model", config, queries)], 0.1))
    fac_s, fac_peak = timed_peak(lambda: fit_factors(net, "model", task, data, data.indices, store, FactorConfig(passes=1), BATCH))
    config = InfluenceConfig(timesteps=1)
    inf_s, inf_peak = timed_peak(lambda: featurize_influence(net, "model", task, data, data.indices, store, config, BATCH))
    run = SimpleNamespace(task=task, denoisers=lambda: {"model": net})  # what influence_scores reads of a module
    stored_s, stored_peak = timed_peak(lambda: influence_scores(run, data, queries, store, "loss", grads="stored", batch_size=QUERIES))
    return {
        "n": n, "data_mib": data.images.numel() * 4 / 2**20, "dense_features_mib": n * DIM * 4 / 2**20,
        "featurize_s": feat_s, "featurize_peak_mib": feat_peak - base,
        "score_s": score_s, "score_peak_mib": score_peak - base,
        "factors_s": fac_s, "factors_peak_mib": fac_peak - base,
        "influence_s": inf_s, "influence_peak_mib": inf_peak - base, "influence_dim": store.config(Entry.influence("model"))["row_dim"],
        "influence_row_bytes": store.config(Entry.influence("model"))["row_dim"] * (2 if config.dtype == "bfloat16" else np.dtype(config.dtype).itemsize),
        "stored_score_s": stored_s, "stored_score_peak_mib": stored_peak - base,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--out", default="runs/bench_scale")
    p.add_argument("--fit-config", default=None, help="take the UNet of this fit config (its model.init_args.unet)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    root = Path(a.out)
    unet = UNET if a.fit_config is None else yaml.safe_load(Path(a.fit_config).read_text())["model"]["init_args"]["unet"]
    if a.child is not None:
        print(json.dumps(child(a.child, root, unet)))
        return
    root.mkdir(parents=True, exist_ok=True)
    for n in a.sizes:  # one file per N: the datamodule holds all of its file's images
        if not (root / f"images{n}.npy").is_file():
            np.save(root / f"images{n}.npy", np.random.default_rng(n).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
    rows = []
    for n in sorted(a.sizes):
        done = root / f"result{n}.json"  # a rerun resumes: sizes already measured are read back
        if not done.is_file():
            fit = [] if a.fit_config is None else ["--fit-config", a.fit_config]
            r = subprocess.run([sys.executable, __file__, "--out", str(root), "--child", str(n), *fit], capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            done.write_text(r.stdout.strip().splitlines()[-1])
        rows.append(json.loads(done.read_text()))
        print(f"N={n} done: featurize {rows[-1]['featurize_s']:.0f} s", file=sys.stderr, flush=True)
    ref = rows[0]
    params = sum(p.numel() for p in build_unet(unet, 0).parameters())
    print(f"32x32 RGB, UNet {tuple(unet['block_out_channels'])} ({params / 1e6:.2f}M parameters), K=1, D={DIM}, batch {BATCH}, 1 thread; reference: N={ref['n']}\n")
    print("| N | featurize img/s | vs ref | featurize peak MiB | score peak MiB | factors img/s | vs ref | factors peak MiB | images MiB (float32) | dense N x D MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, k = r["n"] / r["featurize_s"], r["n"] / r["factors_s"]
        f0, k0 = ref["n"] / ref["featurize_s"], ref["n"] / ref["factors_s"]
        print(f"| {r['n']:,} | {f:.0f} | {f / f0:.2f} | {r['featurize_peak_mib']:.0f} | {r['score_peak_mib']:.0f} | {k:.0f} | {k / k0:.2f} | "
              f"{r['factors_peak_mib']:.0f} | {r['data_mib']:.0f} | {r['dense_features_mib']:.0f} |")  # fmt: skip
    print(f"\nStored influence (K-FAC eigenbasis rows, {ref['influence_dim']} coordinates per image in bfloat16, K=1), {QUERIES} K-FAC queries scored from the store:\n")
    print("| N | influence featurisation img/s | vs ref | peak MiB | stored scoring s | s per 1,000 images | vs ref | scoring peak MiB | rows on disk MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, f0 = r["n"] / r["influence_s"], ref["n"] / ref["influence_s"]
        per, per0 = 1000 * r["stored_score_s"] / r["n"], 1000 * ref["stored_score_s"] / ref["n"]
        print(f"| {r['n']:,} | {f:.0f} | {f / f0:.2f} | {r['influence_peak_mib']:.0f} | {r['stored_score_s']:.1f} | {per:.3f} | {per / per0:.2f} | "
              f"{r['stored_score_peak_mib']:.0f} | {r['n'] * r['influence_row_bytes'] / 2**20:.0f} |")  # fmt: skip
    (root / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
