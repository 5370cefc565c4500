"""The demo's options (:class:`DemoConfig`, validated on construction) and what they make: the
ensemble's fit config with the capture callbacks, the LDS benchmark config, the attributors."""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

import yaml

from wherefrom.attribution.api import ATTRIBUTORS, attributor
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble.codes import validate_codes
from wherefrom.errors import Spell, WherefromError
from wherefrom.evaluation.benchmark import SamplingConfig
from wherefrom.objective import build_objective

DIGITS = 1797
# the order of the report; attributors registered later are appended
METHOD_ORDER = ("ablation", "ablation-loss", "trak", "dtrak", "kfac", "ekfac", "pixel", "random")
BASELINES = ("pixel", "random")
QUERY_SETS = ("generated", "real")


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: under 10 minutes on 2 idle CPU cores).

    ``num_images`` training digits are drawn at random (``seed``); C(members, code_weight) must
    cover them with distinct codes. ``batch_size`` is the global batch (split over ``devices``).
    ``timesteps`` are the seeded draws per TRAK gradient, ``measure_draws`` those of every
    loss in the evaluation (a different seed than the attributors'). ``objective``: what every model
    trains on (:mod:`wherefrom.objective`: ``epsilon``, ``v_prediction``, ``sample``, ``flow_matching``, ``edm``).
    """

    num_images: int = 70
    members: int = 8
    code_weight: int = 4
    channels: tuple[int, int] = (32, 64)
    epochs: int = 500
    batch_size: int = 70
    lr: float = 2e-3
    num_samples: int = 32
    real_queries: int = 32
    steps: int = 50
    scheduler: str = "auto"
    objective: str = "epsilon"
    top_k: int = 8
    removal_k: int = 1
    timesteps: int = 32
    proj_dim: int = 256
    measure_draws: int = 64
    lds_subsets: int = 0
    seed: int = 0
    devices: int = 2
    progress: bool = True
    spell: InitVar[Spell | None] = None  # how messages write an option (default: its field name; the CLI: its flag)

    def __post_init__(self, spell: Spell | None) -> None:
        o = spell or str
        if not 2 <= self.num_images < DIGITS:
            raise WherefromError(f"{o('num_images')} must be in [2, {DIGITS}), got {self.num_images}")
        for name in ("epochs", "batch_size", "num_samples", "steps", "top_k", "removal_k", "timesteps", "proj_dim", "measure_draws", "devices"):
            if getattr(self, name) < 1:
                raise WherefromError(f"{o(name)} must be >= 1, got {getattr(self, name)}")
        if self.real_queries < 0 or self.real_queries > DIGITS - self.num_images:
            raise WherefromError(f"{o('real_queries')} must be in [0, {DIGITS - self.num_images}] (the held-out digits), got {self.real_queries}")
        if self.removal_k > self.num_images:
            raise WherefromError(f"{o('removal_k')} must be <= {o('num_images')} ({self.num_images}), got {self.removal_k}")
        if self.lds_subsets == 1 or self.lds_subsets < 0:
            raise WherefromError(f"{o('lds_subsets')} must be 0 (no LDS) or >= 2 (correlations need two points)")
        if self.batch_size % self.devices:
            raise WherefromError(f"{o('batch_size')} ({self.batch_size}) must be a multiple of {o('devices')} ({self.devices}): each process takes an equal share")
        if min(self.channels) < 1:
            raise WherefromError(f"{o('channels')} must be positive, got {self.channels}")
        SamplingConfig(self.seed, self.steps, self.scheduler)  # validates the scheduler
        try:
            objective = build_objective(self.objective)
        except WherefromError as e:
            raise WherefromError(f"{o('objective')}: {e}") from None
        objective.sampler(self.scheduler)  # one the objective samples with
        validate_codes(self.num_images, self.members, self.code_weight)  # C(n, w) distinct codes for the images

    @property
    def unet(self) -> dict[str, Any]:
        c = list(self.channels)
        return dict(block_out_channels=c, norm_num_groups=min(8, c[0]), attention_head_dim=8)

    @property
    def member_batch_size(self) -> int:
        """Rows a member gets per ensemble batch: the LDS models' batch size (the members' recipe)."""
        return max(1, round(self.batch_size * self.code_weight / self.members))


TINY = dict(
    num_images=20, members=6, code_weight=3, channels=(8, 16), epochs=2, batch_size=10, num_samples=3, real_queries=3,
    steps=3, top_k=3, timesteps=2, proj_dim=16, measure_draws=2, lds_subsets=3, devices=1, progress=False,
)


def datamodule(cfg: DemoConfig) -> DigitsDataModule:
    return DigitsDataModule(batch_size=cfg.batch_size, pool_size=cfg.num_images, pool_seed=cfg.seed)


def fit_config(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """The LightningCLI config of the ensemble's fit, with the capture callbacks (the K-FAC factors
    go into TRAK's store, beside the loss-gradient features its projected mode can reuse)."""
    features = dict(timesteps=cfg.timesteps, proj_dim=cfg.proj_dim, seed=cfg.seed)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "ensemble" / "checkpoints"), "filename": "last", "enable_version_counter": False, "every_n_epochs": cfg.epochs}},
        {"class_path": "wherefrom.callbacks.TRAKFeatures", "init_args": {"store": str(out / "store" / "trak"), "method": "trak", **features}},
        {"class_path": "wherefrom.callbacks.TRAKFeatures", "init_args": {"store": str(out / "store" / "dtrak"), "method": "dtrak", **features}},
        {"class_path": "wherefrom.callbacks.KFACFactors", "init_args": {"store": str(out / "store" / "trak"), "ekfac": True}},
    ]  # fmt: skip
    return {
        "seed_everything": cfg.seed,
        "trainer": {"max_epochs": cfg.epochs, "accelerator": "cpu", "devices": cfg.devices, "strategy": "ddp" if cfg.devices > 1 else "auto",
                    "logger": False, "enable_progress_bar": cfg.progress, "enable_model_summary": False,
                    "default_root_dir": str(out / "ensemble"), "callbacks": callbacks},
        "model": {"class_path": "wherefrom.EncodedEnsemble",
                  "init_args": {"n": cfg.members, "w": cfg.code_weight, "unet": cfg.unet, "lr": cfg.lr, "warmup": 0.05, "seed": cfg.seed,
                                "objective": cfg.objective}},
        "data": {"class_path": "wherefrom.DigitsDataModule",
                 "init_args": {"batch_size": cfg.batch_size // cfg.devices, "pool_size": cfg.num_images, "pool_seed": cfg.seed}},
    }  # fmt: skip


def lds_benchmark(cfg: DemoConfig, out: Path) -> Path:
    """The LDS benchmark config: subset models are single DiffusionModels with the members'
    recipe (UNet, lr, epochs, rows per step), as TRAK's ensembles are models trained on random halves."""
    fit = {
        "seed_everything": cfg.seed,
        "trainer": {"max_epochs": cfg.epochs, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"unet": cfg.unet, "lr": cfg.lr, "warmup": 0.05, "objective": cfg.objective}},
        "data": {"class_path": "wherefrom.DigitsDataModule",
                 "init_args": {"batch_size": cfg.member_batch_size, "pool_size": cfg.num_images, "pool_seed": cfg.seed}},
    }  # fmt: skip
    bench = {
        "out": str(out / "lds"), "fit": fit, "model_seeds": [cfg.seed],
        "subsets": {"num": cfg.lds_subsets, "alpha": 0.5, "seed": cfg.seed},
        "measure": {"draws": cfg.measure_draws, "seed": cfg.seed + 1},
        "sampling": {"seed": cfg.seed, "steps": cfg.steps, "scheduler": cfg.scheduler},
    }  # fmt: skip
    path = out / "lds" / "benchmark.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(bench, sort_keys=False))
    return path


def demo_attributors(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Every registered attributor, configured for the demo's stores and chain; others get their defaults."""
    # exact training gradients: in the demo they beat the projected mode (TRAK's D = 256 loss features) by
    # +0.0083 vs +0.0053 loss rise on the generated queries, for 22 s instead of 13 s
    kfac = dict(store=str(out / "store" / "trak"), grads="exact", timesteps=cfg.timesteps)
    options: dict[str, dict[str, Any]] = {
        "random": dict(seed=cfg.seed),
        "ablation": dict(seed=cfg.seed, steps=cfg.steps, scheduler=cfg.scheduler, top_k=cfg.top_k),
        "ablation-loss": dict(timesteps=cfg.measure_draws, seed=cfg.seed),
        "trak": dict(store=str(out / "store" / "trak")),
        "dtrak": dict(store=str(out / "store" / "dtrak")),
        "kfac": kfac,
        "ekfac": kfac,
    }
    names = [m for m in METHOD_ORDER if m in ATTRIBUTORS] + sorted(set(ATTRIBUTORS) - set(METHOD_ORDER))
    return {name: attributor(name, **options.get(name, {})) for name in names}
