"""The evaluation benchmark's config file and its training recipe.

One YAML (or JSON) file describes a benchmark: the ``fit`` config every
retrained model uses (a LightningCLI config file, plus dotted overrides), the
LDS subsets, the ground-truth measurement, the bootstrap and the
counterfactual-retraining settings. See ``configs/lds_digits.yaml``.

Every retrained model goes through the normal fit path (:mod:`wherefrom.fitting`, as
``wherefrom fit`` does): the recipe writes a complete fit config into the model's folder
(its data split, seed and checkpoint location filled in), then runs LightningCLI on it, so
any model can be retrained by hand or on a cluster from ``<folder>/fit.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml

from wherefrom.checkpoint import import_class, init_args
from wherefrom.errors import WherefromError
from wherefrom.evaluation.stats import BootstrapConfig
from wherefrom.fitting import fit_file
from wherefrom.io import atomic_path, write_json, write_npy
from wherefrom.sampling import EpsFn, SchedulerType

CHECKPOINT = "checkpoints/last.ckpt"  # inside a retrained model's folder
DONE = "done.json"  # written after fit returns: a folder without it is retrained


# Lower is better for these, so the LDS target is the negated measurement.
LOSS_LIKE = {"loss", "elbo", "loss_at_time"}


def _section(cls: type, values: dict[str, Any] | None, where: str):
    """Build a config dataclass from a dict, rejecting unknown keys by name."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise WherefromError(f"unknown key(s) {unknown} in {where}; known keys are {sorted(known)}")
    return cls(**values)


@dataclass
class SubsetConfig:
    """M random subsets of fraction ``alpha`` of the training split (Park et al. 2023)."""

    num: int = 64
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num < 2:
            raise WherefromError(f"subsets.num must be >= 2 (a correlation over subsets), got {self.num}")
        if not 0 < self.alpha < 1:
            raise WherefromError(f"subsets.alpha is the fraction of training images per subset, in (0, 1); got {self.alpha}")


@dataclass
class MeasureConfig:
    """Ground truth: a loss-like measurement of each query, averaged over ``draws``
    seeded ``(t, eps)`` draws that are the same for every retrained model."""

    measurement: str = "loss"
    draws: int = 16
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.measurement not in LOSS_LIKE:
            raise WherefromError(f"measure.measurement must be a loss-like measurement {sorted(LOSS_LIKE)}, got {self.measurement!r}")
        if self.draws < 1 or self.batch_size < 1:
            raise WherefromError(f"measure.draws and measure.batch_size must be >= 1, got {self.draws} and {self.batch_size}")


@dataclass
class SamplingConfig:
    """How the queries were generated, to regenerate them from the same noise."""

    seed: int = 0
    steps: int = 100
    scheduler: str = "auto"

    def __post_init__(self) -> None:
        if self.scheduler not in {s.value for s in SchedulerType}:
            raise WherefromError(f"sampling.scheduler must be one of {[s.value for s in SchedulerType]}, got {self.scheduler!r}")


@dataclass
class CounterfactualConfig:
    """Retraining without each query's top-k (``top_k`` images or ``percent`` of the split)."""

    top_k: int | None = 10
    percent: float | None = None
    seed: int = 0
    distances: list[str] = field(default_factory=lambda: ["l2", "lpips"])

    def __post_init__(self) -> None:
        if (self.top_k is None) == (self.percent is None):
            raise WherefromError("counterfactual needs exactly one of top_k (a count) or percent (of the training split)")
        if self.top_k is not None and self.top_k < 1:
            raise WherefromError(f"counterfactual.top_k must be >= 1, got {self.top_k}")
        if self.percent is not None and not 0 < self.percent < 100:
            raise WherefromError(f"counterfactual.percent must be in (0, 100), got {self.percent}")

    def count(self, n_train: int) -> int:
        """k for a training split of ``n_train`` images."""
        k = self.top_k if self.top_k is not None else max(1, round(self.percent / 100 * n_train))
        if k >= n_train:
            raise WherefromError(f"removing {k} of {n_train} training images leaves nothing to train on; lower top_k/percent")
        return k


@dataclass
class NoiseCeilingConfig:
    """Retrain the first ``num`` subsets with another training ``seed``: the LDS of one
    seed's measurements against the other's bounds what any attribution can reach."""

    seed: int = 1
    num: int = 0

    def __post_init__(self) -> None:
        if self.num != 0 and self.num < 2:
            raise WherefromError(f"noise_ceiling.num must be 0 (off) or >= 2 subsets, got {self.num}")


@dataclass
class QueriesConfig:
    """How many held-out real and generated queries to report on, and to tune on.

    Real queries are drawn (from ``seed``) among the images outside the training
    pool; generated ones are the attributed model's samples with ``sampling.seed``
    (reporting) and ``sampling.seed + 1`` (tuning)."""

    real: int = 64
    generated: int = 32
    tuning_real: int = 64
    tuning_generated: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        counts = [self.real, self.generated, self.tuning_real, self.tuning_generated]
        if min(counts) < 0 or sum(counts) == 0:
            raise WherefromError(f"queries counts must be >= 0 and not all 0, got {counts}")


@dataclass
class Benchmark:
    """A benchmark config file, parsed and validated.

    Args:
        out: folder for subsets, retrained models, measurements and results.
        fit: the LightningCLI fit config (a dict: trainer, model, data).
        model_seeds: retrain every subset once per seed (``seed_everything`` and
            the model's ``seed``); measurements are averaged over seeds.
    """

    out: Path
    fit: dict[str, Any]
    subsets: SubsetConfig = field(default_factory=SubsetConfig)
    model_seeds: list[int] = field(default_factory=lambda: [0])
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)
    noise_ceiling: NoiseCeilingConfig = field(default_factory=NoiseCeilingConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)

    def __post_init__(self) -> None:
        if self.noise_ceiling.num and self.noise_ceiling.seed in self.model_seeds:
            raise WherefromError(f"noise_ceiling.seed {self.noise_ceiling.seed} is one of model_seeds {self.model_seeds}; pick another seed")
        if self.noise_ceiling.num > self.subsets.num:
            raise WherefromError(f"noise_ceiling.num ({self.noise_ceiling.num}) exceeds subsets.num ({self.subsets.num})")
        if not self.model_seeds or len(set(self.model_seeds)) != len(self.model_seeds):
            raise WherefromError(f"model_seeds must be a non-empty list of distinct seeds, got {self.model_seeds}")
        for key in ("model", "data"):
            spec = self.fit.get(key)
            if not isinstance(spec, dict) or "class_path" not in spec:
                raise WherefromError(f"the fit config needs a `{key}:` section with class_path and init_args (as configs/digits.yaml)")
        model, data = (self.fit[k].get("init_args") or {} for k in ("model", "data"))
        if model.get("num_classes") is not None or (model.get("unet") or {}).get("cross_attention_dim") is not None or data.get("conditional") or data.get("captions"):
            raise WherefromError("the lds and counterfactual benchmarks evaluate unconditional models; drop the fit config's class or text conditioning")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], base: Path = Path(".")) -> Benchmark:
        """Parse a benchmark dict; a string ``fit`` is a YAML file relative to ``base``."""
        cfg = dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)} | {"fit_overrides"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise WherefromError(f"unknown key(s) {unknown} in the benchmark config; known keys are {sorted(known)}")
        if "fit" not in cfg:
            raise WherefromError("the benchmark config needs `fit:` (a fit config file, e.g. digits.yaml, or the config itself)")
        fit = cfg["fit"]
        if isinstance(fit, str):
            fit = load_config(base / fit)
        fit = copy.deepcopy(fit)
        for key, value in (cfg.pop("fit_overrides", None) or {}).items():
            set_dotted(fit, key, value)
        return cls(
            out=Path(cfg.get("out", "runs/benchmark")),
            fit=fit,
            subsets=_section(SubsetConfig, cfg.get("subsets"), "subsets"),
            model_seeds=list(cfg.get("model_seeds", [0])),
            measure=_section(MeasureConfig, cfg.get("measure"), "measure"),
            bootstrap=_section(BootstrapConfig, cfg.get("bootstrap"), "bootstrap"),
            sampling=_section(SamplingConfig, cfg.get("sampling"), "sampling"),
            counterfactual=_section(CounterfactualConfig, cfg.get("counterfactual"), "counterfactual"),
            noise_ceiling=_section(NoiseCeilingConfig, cfg.get("noise_ceiling"), "noise_ceiling"),
            queries=_section(QueriesConfig, cfg.get("queries"), "queries"),
        )

    @classmethod
    def from_file(cls, path: str | Path, out: str | Path | None = None) -> Benchmark:
        path = Path(path)
        bench = cls.from_dict(load_config(path), base=path.parent)
        if out is not None:
            bench.out = Path(out)
        return bench

    def datamodule(self, **overrides: Any) -> L.LightningDataModule:
        """The fit config's datamodule (``overrides`` replace init args)."""
        spec = self.fit["data"]
        return import_class(spec["class_path"])(**{**init_args(spec.get("init_args") or {}), **overrides})

    def fit_config(self, root: Path, seed: int, **data_overrides: Any) -> dict[str, Any]:
        """The fit config of one retrained model: checkpoint ``root/checkpoints/last.ckpt``,
        logs under ``root``, model seed ``seed``, data init args overridden."""
        cfg = copy.deepcopy(self.fit)
        cfg["seed_everything"] = seed
        cfg["model"].setdefault("init_args", {})["seed"] = seed
        cfg["data"].setdefault("init_args", {}).update(data_overrides)
        trainer = cfg.setdefault("trainer", {})
        trainer["default_root_dir"] = str(root)
        callbacks = [c for c in trainer.get("callbacks") or [] if not str(c.get("class_path", "")).endswith("ModelCheckpoint")]
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str((root / CHECKPOINT).parent), "filename": Path(CHECKPOINT).stem, "enable_version_counter": False},
            }
        )
        trainer["callbacks"] = callbacks
        return cfg


def load_config(path: Path) -> dict[str, Any]:
    """A YAML or JSON file as a dict."""
    if not path.is_file():
        raise WherefromError(f"config file {str(path)!r} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise WherefromError(f"config file {str(path)!r} is not valid YAML/JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise WherefromError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return cfg


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(cfg, "trainer.max_epochs", 5)`` sets ``cfg["trainer"]["max_epochs"]``."""
    *parents, last = key.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise WherefromError(f"fit_overrides key {key!r}: {p!r} is not a section of the fit config")
    node[last] = value


def eps_fn(module: L.LightningModule) -> EpsFn:
    """A module's denoiser ``(x_t, t) -> eps``: a single model's UNet, or an
    encoded ensemble's uniformly weighted members (unconditional models only)."""
    check_unconditional(module)
    return module.sampler().eps_fn() if hasattr(module, "sampler") else module.eps_fn()


def check_unconditional(module: L.LightningModule) -> None:
    """Refuse a conditional model: the LDS, counterfactual and leave-one-out ground truths measure and
    sample queries without conditions."""
    if getattr(module, "is_conditional", False):
        raise WherefromError("the lds, counterfactual and loo benchmarks evaluate unconditional models; this one is class- or text-conditional")


def checkpoint(root: Path) -> Path:
    """The checkpoint of the model retrained in ``root``."""
    return root / CHECKPOINT


def is_trained(root: Path) -> bool:
    return (root / DONE).is_file() and checkpoint(root).is_file()


def train(bench: Benchmark, root: Path, seed: int, **data_overrides: Any) -> Path:
    """Train one model (:func:`wherefrom.fitting.fit_file` of ``root/fit.yaml``) unless ``root``
    already holds a finished one; returns its checkpoint. Index lists in ``data_overrides`` are
    written as ``.npy`` files beside the config."""
    ckpt = checkpoint(root)
    if is_trained(root):
        return ckpt
    root.mkdir(parents=True, exist_ok=True)
    for key, value in list(data_overrides.items()):
        if isinstance(value, np.ndarray):
            write_npy(root / f"{key}.npy", value.astype(np.int64))
            data_overrides[key] = str((root / f"{key}.npy").resolve())
    cfg = bench.fit_config(root.resolve(), seed, **data_overrides)
    with atomic_path(root / "fit.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.perf_counter()
    fit_file(root / "fit.yaml")
    if not ckpt.is_file():
        raise WherefromError(f"fit finished without writing {ckpt}; check trainer.max_epochs/limit_train_batches in the fit config")
    write_json(root / DONE, {"seconds": time.perf_counter() - start, "seed": seed})
    return ckpt


__all__ = [
    "Benchmark",
    "CounterfactualConfig",
    "MeasureConfig",
    "NoiseCeilingConfig",
    "QueriesConfig",
    "SamplingConfig",
    "SubsetConfig",
    "checkpoint",
    "check_unconditional",
    "eps_fn",
    "is_trained",
    "load_config",
    "train",
]
