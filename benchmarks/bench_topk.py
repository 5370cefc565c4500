"""Database-scale top-k: blockwise merge vs a dense Q x N score matrix, from N memory-mapped features.

    python benchmarks/bench_topk.py [--num 1000000] [--dim 256] [--queries 64] [--k 10]

Each recipe runs in its own process; its peak memory is the largest anonymous resident set
(``RssAnon``, so the memory-mapped file's page cache does not count) sampled every 2 ms.
Prints wall time and peak memory of both and their ratios. The features file (N x D float32)
is written once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import PeakMemory, rss_anon_mib


def run(mode: str, path: Path, queries: int, k: int, block: int) -> dict:
    from wherefrom.attribution.topk import blockwise_topk

    torch.set_num_threads(1)
    features = np.load(path, mmap_mode="r")
    q = torch.from_numpy(np.random.default_rng(1).normal(size=(queries, features.shape[1])).astype(np.float32))
    base = rss_anon_mib()
    monitor = PeakMemory()
    monitor.start()
    start = time.perf_counter()
    if mode == "blockwise":
        idx, _ = blockwise_topk(q, features, k, block)
    else:  # the dense reference: every score in memory, then a partial sort
        scores = q.numpy() @ np.asarray(features).T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        idx = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1), 1)
    seconds = time.perf_counter() - start
    monitor.done.set()
    monitor.join()
    return {"seconds": seconds, "peak_mib": max(monitor.peak, rss_anon_mib()) - base, "top": idx[:, :3].tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--block", type=int, default=65536)
    p.add_argument("--mode", choices=["blockwise", "dense"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run(a.mode, Path(a.path), a.queries, a.k, a.block)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.npy"
        features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(a.num, a.dim))
        rng = np.random.default_rng(0)
        for s in range(0, a.num, 100_000):
            features[s : s + 100_000] = rng.normal(size=(min(100_000, a.num - s), a.dim)).astype(np.float32)
        features.flush()
        del features
        out = {}
        for mode in ("blockwise", "dense"):
            cmd = [sys.executable, __file__, "--mode", mode, "--path", str(path), "--queries", str(a.queries), "--k", str(a.k), "--block", str(a.block)]
            out[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert out["blockwise"]["top"] == out["dense"]["top"], "the two recipes disagree"
    b, d = out["blockwise"], out["dense"]
    print(f"N={a.num} D={a.dim} Q={a.queries} k={a.k}: blockwise {b['seconds']:.2f} s, working memory {b['peak_mib']:.0f} MiB; "
          f"dense {d['seconds']:.2f} s, working memory {d['peak_mib']:.0f} MiB; memory ratio {b['peak_mib'] / d['peak_mib']:.2f}, time ratio {b['seconds'] / d['seconds']:.2f}")


if __name__ == "__main__":
    main()
