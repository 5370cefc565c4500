"""Featurisation throughput (issue 5), measured in one run on the same model and data.

Prints, at equal K and projection dimension D:

* ``reference / wherefrom`` time for the structured (default) and dense modes, where the
  reference is the D-TRAK recipe (sail-sg/D-TRAK): per timestep, per-example
  ``vmap(grad)`` of the output, summed over the K timesteps, then trak's
  ``BasicProjector`` (goal >= 4x);
* ``featurisation / (K x one training epoch)`` with a real Lightning epoch on the same
  images (goal <= 1.5).

The dense mode projects with the same matrix as the reference, so their features
agree up to the 1/K average; the script checks that too.

    OMP_NUM_THREADS=2 python benchmarks/bench_features.py --ckpt runs/digits/last.ckpt
    python benchmarks/bench_features.py --num-images 64 --timesteps 2      # quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import lightning as L
import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from trak.projectors import BasicProjector, ProjectionType

from wherefrom.checkpoint import load_module
from wherefrom.datamodules import DigitsDataModule
from wherefrom.features import (
    METHOD_OUTPUTS,
    FeatureConfig,
    Projector,
    default_projector,
    featurize,
    projection_seed,
    trainable_parameters,
)
from wherefrom.features.projection import BLOCK_SIZE
from wherefrom.model import DiffusionModel
from wherefrom.store import Entry, Store
from wherefrom.task import Stream, predict


def reference_features(module: DiffusionModel, dm: DigitsDataModule, config: FeatureConfig, batch_size: int) -> torch.Tensor:
    """D-TRAK's recipe: for each batch, sum over timesteps of per-example ``vmap(grad)``, then BasicProjector."""
    unet, task = module.unet.eval(), module.task
    params = {n: p.detach() for n, p in trainable_parameters(unet).items()}
    buffers = dict(unet.named_buffers())
    fn = task.measurement(config.output)
    num_params = sum(p.numel() for p in params.values())
    device = next(unet.parameters()).device
    projector = BasicProjector(num_params, config.proj_dim, projection_seed(config.seed, "model"), ProjectionType.normal, device, BLOCK_SIZE)

    def output(p, x_t, t, time, target):  # one example, one timestep (time: the network's time input)
        pred = predict(lambda x, s: functional_call(unet, {**p, **buffers}, (x, s)), x_t[None], time[None])
        return fn(pred, target[None], t[None], task).sum()

    out = []
    for s in range(0, len(dm.indices), batch_size):
        index = torch.as_tensor(dm.indices[s : s + batch_size])
        x0 = dm.images[index].to(device)
        total = None
        for d, t in config.draws(task):
            x_t, tt, target = task.noisy(x0, index, config.output, d, t, Stream.FEATURES)
            with sdpa_kernel(SDPBackend.MATH):
                g = vmap(grad(output), in_dims=(None, 0, 0, 0, 0))(params, x_t, tt, task.model_time(tt), target)
            flat = torch.cat([g[n].reshape(len(index), -1) for n in params], 1)
            total = flat if total is None else total + flat
        out.append(projector.project(total, model_id=0).cpu())
    return torch.cat(out)


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = now()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.times.append(now() - self.start)


def epoch_time(module: DiffusionModel, dm: DigitsDataModule, epochs: int) -> float:
    """Median time of a real Lightning training epoch (after one warm-up epoch)."""
    timer = EpochTimer()
    L.Trainer(
        max_epochs=epochs + 1, accelerator="gpu" if module.device.type == "cuda" else "cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[timer],
    ).fit(copy.deepcopy(module), dm)
    return statistics.median(timer.times[1:])


def timed_featurize(module: DiffusionModel, dm: DigitsDataModule, config: FeatureConfig, batch_size: int) -> tuple[float, torch.Tensor]:
    with tempfile.TemporaryDirectory() as root:
        store = Store(root, dm.fingerprint)
        start = now()
        featurize(module.unet, "model", module.task, dm, store, config, batch_size)
        elapsed = now() - start
        return elapsed, torch.from_numpy(store.read_array(Entry.features(config.output, "model"))[dm.indices].copy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="a digits checkpoint (default: the default UNet, freshly initialised)")
    p.add_argument("--num-images", type=int, default=256, help="featurise the first NUM_IMAGES digits")
    p.add_argument("--method", choices=sorted(METHOD_OUTPUTS), default="dtrak")
    p.add_argument("--timesteps", type=int, default=FeatureConfig.timesteps)
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64, help="featurisation batch (images)")
    p.add_argument("--train-batch-size", type=int, default=128, help="training batch, as in configs/digits.yaml")
    p.add_argument("--epochs", type=int, default=2, help="timed training epochs (after a warm-up one)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    module = (load_module(a.ckpt) if a.ckpt else DiffusionModel()).eval().to(a.device)
    dm = DigitsDataModule(batch_size=a.train_batch_size, subset=list(range(a.num_images)))
    base = dict(output=METHOD_OUTPUTS[a.method], timesteps=a.timesteps, proj_dim=a.proj_dim)
    # dense: BasicProjector generating where the reference does, so both project with one matrix
    projector = Projector.BASIC if module.device.type == "cpu" else Projector.BASIC_CUDA
    structured = FeatureConfig(**base, projection="structured")
    dense = FeatureConfig(**base, projection="dense", projector=projector.value)
    print(f"{a.num_images} digits, {sum(p.numel() for p in module.unet.parameters())} parameters, "
          f"K={a.timesteps}, D={a.proj_dim}, output {base['output']}, on {a.device} ({torch.get_num_threads()} threads)")

    featurize(module.unet, "model", module.task, dm, Store(tempfile.mkdtemp(), dm.fingerprint), structured, a.batch_size)  # warm-up
    t_epoch = epoch_time(module, dm, a.epochs)
    t_struct, _ = timed_featurize(module, dm, structured, a.batch_size)
    t_dense, f_dense = timed_featurize(module, dm, dense, a.batch_size)
    start = now()
    f_ref = reference_features(module, dm, dense, a.batch_size)
    t_ref = now() - start
    rows = [("reference (D-TRAK recipe)", t_ref), ("wherefrom dense", t_dense), ("wherefrom structured", t_struct)]
    if default_projector(a.device) == Projector.CUDA:  # trak's fast_jl CudaProjector is installed
        rows.append(("wherefrom dense, fast_jl", timed_featurize(module, dm, FeatureConfig(**base, projection="dense", projector="cuda"), a.batch_size)[0]))

    err = ((f_dense * a.timesteps - f_ref).norm() / f_ref.norm()).item()
    print(f"dense features == reference / K: relative error {err:.1e}")
    for name, t in rows:
        print(f"{name:<28} {t:8.2f} s  {1000 * t / a.num_images:8.2f} ms/image")
    print(f"training epoch               {t_epoch:8.2f} s")
    print(f"speed-up vs reference: structured {t_ref / t_struct:.1f}x, dense {t_ref / t_dense:.1f}x (goal >= 4x)")
    print(f"featurisation / (K x epoch): structured {t_struct / (a.timesteps * t_epoch):.2f}, "
          f"dense {t_dense / (a.timesteps * t_epoch):.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
