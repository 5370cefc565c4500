"""The encoded-ensembles control (Dai, Yew & Gifford, "Where did you learn that?", Fig. 1b-c), with group codes.

Each digit class is one unit of a group-coded ensemble (``groups="labels"``: 5 members, code
weight 2, so C(5, 2) = 10 codes, one per class, each class seen by 2 members). Ablating a
sample's own class (its members dropped, same exogenous noise) must move it much more than
ablating another class; a one-sided Mann-Whitney U test over many samples says how surely.

    python benchmarks/class_ablation.py [--out runs/class_ablation] [--epochs 120] [--samples 128]

Trains the ensemble once (reused from ``--out``), draws ``--samples`` samples, ablates each class
exactly, and compares the L2 change (and LPIPS when its AlexNet backbone file is in the torch hub
cache) between own-class and other-class ablations. A sample's class is the digit classifier's
(:mod:`wherefrom.evaluation.quality`); the test is reported over all samples and over those
the classifier recognises (probability >= 0.7), whose class is certain. Writes ``<out>/class_ablation.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from scipy.stats import mannwhitneyu

from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import EncodedEnsemble
from wherefrom.evaluation.distances import LPIPSDistance, alexnet_weights_path, l2_distance
from wherefrom.evaluation.quality import THRESHOLD, digit_labels, digit_probabilities, recognised


def train(out: Path, a: argparse.Namespace, dm: DigitsDataModule) -> EncodedEnsemble:
    ckpt = out / "ensemble.ckpt"
    if ckpt.is_file():
        return EncodedEnsemble.load_from_checkpoint(ckpt, map_location="cpu").eval()
    module = EncodedEnsemble(n=5, w=2, lr=2e-3, warmup=0.05, seed=a.seed)
    L.seed_everything(a.seed, verbose=False)
    trainer = L.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=True, default_root_dir=out)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(ckpt)
    return module.eval()


def histogram(own: np.ndarray, other: np.ndarray, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.linspace(0, max(own.max(), other.max()), 40)
    ax.hist(other, bins, alpha=0.6, density=True, label=f"another class ablated ({len(other)})")
    ax.hist(own, bins, alpha=0.6, density=True, label=f"own class ablated ({len(own)})")
    ax.set_xlabel(f"{label} between sample and counterfactual")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/class_ablation")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    start = time.perf_counter()
    dm = DigitsDataModule(batch_size=a.batch_size, pool_size=a.num_images, pool_seed=a.seed, groups="labels")
    dm.setup()
    module = train(out, a, dm)
    trained = time.perf_counter() - start
    sampler = module.sampler(seed=a.seed, steps=a.steps, scheduler="ddpm")
    queries = list(range(a.samples))
    with torch.no_grad():
        x0 = sampler.sample(queries)
        labels = digit_labels(x0)
        confident = digit_probabilities(x0).max(1) >= THRESHOLD
        ablated = {}
        for c in range(10):
            one = int(dm.indices[dm.labels[dm.indices] == c][0])  # any image of the class: its code is the class's
            ablated[c] = sampler.sample(queries, sampler.ablation_weights([one]))
    distances = {"L2": np.stack([l2_distance(x0, ablated[c]).double().numpy() for c in range(10)])}  # 10 x S
    if alexnet_weights_path().is_file():
        lpips = LPIPSDistance()
        distances["LPIPS"] = np.stack([lpips(x0, ablated[c]).double().detach().numpy() for c in range(10)])
    own_mask = np.arange(10)[:, None] == labels[None, :]
    lines = [
        "# Class ablation with group codes (encoded-ensembles control, Fig. 1b-c)",
        "",
        f"5 members, code weight 2, one code per digit class; {a.num_images} training digits, {a.epochs} epochs; "
        f"{a.samples} samples (DDPM, {a.steps} steps, seed {a.seed}); {recognised(x0).summary()} recognised as digits. "
        f"Each class ablated exactly (its 2 members dropped, same noise). Trained in {trained:.0f} s.",
        "",
        "| distance | samples | own class: median | other classes: median | ratio | Mann-Whitney U (one-sided) | AUC | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in distances.items():
        for which, keep in (("all", np.ones(a.samples, dtype=bool)), ("recognised", confident)):
            own, other = d[own_mask & keep], d[~own_mask & keep]
            test = mannwhitneyu(own, other, alternative="greater")
            auc = test.statistic / (len(own) * len(other))
            lines.append(f"| {name} | {which} ({int(keep.sum())}) | {np.median(own):.3f} | {np.median(other):.3f} | {np.median(own) / np.median(other):.2f} | "
                         f"{test.statistic:.0f} | {auc:.3f} | {test.pvalue:.2g} |")  # fmt: skip
        histogram(d[own_mask], d[~own_mask], name, out / f"class_ablation_{name.lower()}.png")
    if "LPIPS" not in distances:
        lines.append(f"\nLPIPS skipped: no AlexNet backbone at {alexnet_weights_path()} (no downloads).")
    lines += ["", "![L2](class_ablation_l2.png)", ""]
    (out / "class_ablation.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
