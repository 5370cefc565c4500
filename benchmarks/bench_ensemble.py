"""Joint-training throughput of an encoded ensemble (issue 3).

Every image is trained on by ``w`` members, so an ensemble epoch does the work
of ``w`` single-model epochs; the ratio ``ensemble epoch / (w x single-model
epoch)`` on the same data (both measured in this run, real Lightning Trainers)
is the routing overhead, goal <= 1.15. Two baselines are printed:

- *routing overhead* (the goal): the single model trains with the batch size a
  member actually gets, ``B w / n`` rows, so both sides do the same work in
  the same-sized forward/backward passes and the same optimizer updates per
  image; what remains is the cost of routing (splitting batches, running the
  members one after another, one optimizer over all of them). 1.0 means joint
  training costs exactly as much as training the members separately.
- *same batch size*: the single model trains with batch ``B`` itself. This adds
  the hardware's small-batch inefficiency (large on CPUs for 8x8 images) and
  the optimizer's ``n / w`` times larger share, both independent of routing.

Runs alternate (ensemble, single, single, ensemble, ...) so that load from other
processes hits all alike; each run's first epoch is a warm-up and is dropped.

    OMP_NUM_THREADS=2 python benchmarks/bench_ensemble.py             # configs/digits_ensemble.yaml settings
    python benchmarks/bench_ensemble.py --subset 512 --epochs 1 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import EncodedEnsemble
from wherefrom.model import DiffusionModel

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_ensemble.yaml"


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.times.append(time.perf_counter() - self.start)


def epoch_times(module: L.LightningModule, batch_size: int, args: argparse.Namespace) -> list[float]:
    """Epoch times after the first (warm-up) epoch."""
    timer = EpochTimer()
    dm = DigitsDataModule(batch_size=batch_size, subset=list(range(args.subset)) if args.subset else None)
    L.Trainer(
        max_epochs=args.epochs + 1, accelerator=args.accelerator, devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[timer],
    ).fit(module, dm)
    return timer.times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="take n, w, unet, lr, batch size from this config")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--w", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--unet", type=json.loads, default=None, help="UNet config as JSON (default: the config's)")
    p.add_argument("--subset", type=int, default=0, help="train on the first SUBSET digits (0: all 1797)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run (after one warm-up epoch)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of one run of each kind, in alternating order")
    p.add_argument("--accelerator", default="cpu")
    a = p.parse_args()
    with open(a.config) as f:
        cfg = yaml.safe_load(f)
    model = cfg["model"]["init_args"]
    a.n = a.n or model["n"]
    a.w = a.w or model.get("w") or a.n // 2
    a.batch_size = a.batch_size or cfg["data"]["init_args"]["batch_size"]
    unet = a.unet if a.unet is not None else model.get("unet")
    shared = dict(unet=unet, lr=model.get("lr", 1e-4), seed=0)

    member_batch = max(1, round(a.batch_size * a.w / a.n))
    times: dict[str, list[float]] = {"ensemble": [], "member_batch": [], "same_batch": []}
    for r in range(a.rounds):
        order = ["ensemble", "member_batch", "same_batch"] if r % 2 == 0 else ["same_batch", "member_batch", "ensemble"]
        for key in order:
            if key == "ensemble":
                times[key] += epoch_times(EncodedEnsemble(n=a.n, w=a.w, **shared), a.batch_size, a)
            else:
                times[key] += epoch_times(DiffusionModel(**shared), member_batch if key == "member_batch" else a.batch_size, a)
    med = {k: statistics.median(v) for k, v in times.items()}

    def show(label: str, key: str) -> None:
        print(f"{label:<44} {med[key]:6.2f} s  (median of {', '.join(f'{t:.2f}' for t in times[key])})")

    print(f"data: {a.subset or 1797} digits; ensemble n={a.n}, w={a.w}, batch {a.batch_size}; torch threads {torch.get_num_threads()}")
    show("ensemble epoch", "ensemble")
    show(f"single-model epoch, batch {member_batch} (= B w / n)", "member_batch")
    show(f"single-model epoch, batch {a.batch_size}", "same_batch")
    print(f"routing overhead: ensemble / (w x single at batch {member_batch}) = {med['ensemble'] / (a.w * med['member_batch']):.3f}  (goal <= 1.15)")
    print(f"same batch size:  ensemble / (w x single at batch {a.batch_size}) = {med['ensemble'] / (a.w * med['same_batch']):.3f}")


if __name__ == "__main__":
    main()
