"""Helpers the benchmark scripts share: the LDS benchmark's queries, measurements and attribution
methods (``lds_benchmark.py`` reports them, ``tune_defaults.py`` tunes their defaults), and peak
memory measurement (``bench_topk.py``, ``bench_scale.py``). Scripts run from this folder, which
Python puts first on ``sys.path``, so they import it as ``common``."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wherefrom.attribution.baseline import pixel_scores, random_scores
from wherefrom.attribution.influence import (
    EKFAC,
    influence_scores,
    query_gradients,
)
from wherefrom.attribution.trak import kernel_scores, query_features, trak_scores
from wherefrom.checkpoint import load_module
from wherefrom.errors import WherefromError
from wherefrom.evaluation import lds, stats
from wherefrom.evaluation.benchmark import Benchmark, checkpoint, is_trained, train
from wherefrom.features import FeatureConfig, featurize, per_sample_grads
from wherefrom.io import save_grid, write_json, write_npy
from wherefrom.kfac import (
    HEURISTIC_DAMPING,
    FactorConfig,
    fit_factors,
    load_preconditioner,
    precondition,
    training_split,
)
from wherefrom.kfac.stored import (
    InfluenceConfig,
    StoredInfluence,
    featurize_influence,
    load_eigen,
)
from wherefrom.store import Entry, Store
from wherefrom.task import Stream

ENSEMBLE = {"n": 12, "w": 6}  # C(12, 6) = 924 codes >= 500 images; each member trains on a random half, like a subset model



SETS = ("report_real", "report_generated", "tuning_real", "tuning_generated")


def make_queries(bench: Benchmark) -> dict[str, np.ndarray]:
    """The four query sets (cached in ``out/queries``)."""
    folder = bench.out / "queries"
    if all((folder / f"{s}.npy").is_file() for s in SETS):
        return {s: np.load(folder / f"{s}.npy") for s in SETS}
    q = bench.queries
    dm = bench.datamodule()
    dm.setup()
    held_out = np.random.default_rng(q.seed).permutation(dm.held_out)
    if len(held_out) < q.real + q.tuning_real:
        raise WherefromError(f"{len(held_out)} held-out images cannot give {q.real} + {q.tuning_real} real queries; lower pool_size or the counts")
    module = load_module(checkpoint(lds.full_model_dir(bench)))
    s = bench.sampling
    out = {
        "report_real": dm.images[held_out[: q.real]].numpy(),
        "tuning_real": dm.images[held_out[q.real : q.real + q.tuning_real]].numpy(),
        "report_generated": module.generate(q.generated, seed=s.seed, steps=s.steps, scheduler=s.scheduler, progress=True).numpy(),
        "tuning_generated": module.generate(q.tuning_generated, seed=s.seed + 1, steps=s.steps, scheduler=s.scheduler, progress=True).numpy(),
    }
    for name, images in out.items():
        write_npy(folder / f"{name}.npy", images.astype(np.float32))
        save_grid(torch.from_numpy(images), folder / f"{name}.png")
    write_json(folder / "queries.json", {"held_out": held_out[: q.real + q.tuning_real].tolist(), "sampling": vars(s)})
    return out


def all_queries(bench: Benchmark) -> tuple[torch.Tensor, dict[str, slice]]:
    """Every query set stacked (one attribution per method) and each set's rows."""
    sets = make_queries(bench)
    rows, start = {}, 0
    for name in SETS:
        rows[name] = slice(start, start + len(sets[name]))
        start += len(sets[name])
    return torch.from_numpy(np.concatenate([sets[s] for s in SETS])), rows


def measure_all(bench: Benchmark) -> tuple[np.ndarray, np.ndarray | None]:
    """Measurements ``M x Q`` (mean over model seeds) and the ceiling seed's ``C x Q``."""
    queries, _ = all_queries(bench)
    subsets, _ = lds.read_subsets(bench)
    cache = bench.out / "measurements"

    def one(j: int, seed: int) -> np.ndarray:
        path = cache / f"subset_{j:03d}_seed_{seed}.npy"
        if not path.is_file():
            root = lds.model_dir(bench, j, seed)
            if not is_trained(root):
                raise WherefromError(f"subset model {root} is not trained yet; run the `train` stage first")
            write_npy(path, lds.measure_queries(load_module(checkpoint(root)), queries, bench.measure))
        return np.load(path)

    values = []
    for j in range(len(subsets)):
        values.append(np.mean([one(j, s) for s in bench.model_seeds], axis=0))
        print(f"[measure] subset {j + 1}/{len(subsets)}", end="\r", flush=True)
    print()
    ceiling = np.stack([one(j, bench.noise_ceiling.seed) for j in range(bench.noise_ceiling.num)]) if bench.noise_ceiling.num else None
    return np.stack(values), ceiling


class Context:
    """The attributed model, its data and the stacked queries, with cached dense gradients."""

    def __init__(self, bench: Benchmark) -> None:
        self.bench = bench
        self.module = load_module(checkpoint(lds.full_model_dir(bench)))
        self.dm = bench.datamodule()
        self.dm.setup()
        self.queries, self.rows = all_queries(bench)
        self.net = self.module.unet
        self.split = self.dm.indices
        self.n = self.dm.num_images
        self._grads: dict[tuple, tuple] = {}  # dense gradients and their Gram matrices, per (output, K)
        self._quadratics: dict[tuple[int, int], tuple] = {}  # ensembles' samplers and quadratic forms, per (n, w)

    def store(self, name: str) -> Store:
        return Store(self.bench.out / "stores" / name, self.dm.fingerprint)

    def features(self, config: FeatureConfig, query_timesteps: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """Stored training features (split rows) and query features of ``config`` (queries with
        ``query_timesteps`` draws when given)."""
        key = f"{config.output}_{config.projection}_{config.allocation}_{config.proj_dim}_k{config.timesteps}_s{config.seed}"
        store = self.store(key)
        featurize(self.net, "model", self.module.task, self.dm, store, config, batch_size=64, progress=True)
        cached = store.root / ("queries.npy" if query_timesteps is None else f"queries_k{query_timesteps}.npy")
        if not cached.is_file():
            q_config = dataclasses.replace(config, timesteps=query_timesteps or config.timesteps)
            write_npy(cached, query_features(self.net, self.module, "model", q_config, self.queries).double().numpy())
        return store.read_array(Entry.features(config.output, "model"))[self.split].astype(np.float64), torch.from_numpy(np.load(cached))

    def factors(self, passes: int) -> Store:
        """The store of the attributed model's factors (``passes`` passes, with EK-FAC), fit once."""
        store = self.store(f"factors_p{passes}")
        fit_factors(self.net, "model", self.module.task, self.dm, self.split, store, FactorConfig(passes=passes, ekfac=True), progress=True)
        return store

    def query_grads(self, output: str, timesteps: int) -> torch.Tensor:
        """Unprojected gradients of ``output`` for every query (the library's :func:`query_gradients`:
        index ``-(q + 1)``, the draws of K uniform timesteps), cached."""
        key = ("query", output, timesteps)
        if key not in self._grads:
            self._grads[key] = query_gradients(self.net, self.module.task, self.queries, output, FeatureConfig(timesteps=timesteps), 32)
        return self._grads[key]

    def dense_grads(self, output: str, timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unprojected per-sample gradients (training split, queries) of ``output`` (float32)."""
        key = ("dense", output, timesteps)
        if key not in self._grads:
            draws = FeatureConfig(timesteps=timesteps).draws(self.module.task)
            images, index = self.dm.images[self.split], torch.from_numpy(self.split)
            train_g = torch.cat(
                [per_sample_grads(self.net, self.module.task, images[s : s + 32], index[s : s + 32], output, draws, Stream.FEATURES) for s in range(0, len(images), 32)]
            )
            self._grads[key] = (train_g, self.query_grads(output, timesteps))
        return self._grads[key]

    def grams(self, output: str, timesteps: int) -> tuple[np.ndarray, np.ndarray]:
        """``g_q G^T`` (Q x split) and ``G G^T`` (split x split) of unprojected gradients (float64)."""
        key = ("gram", output, timesteps)
        if key not in self._grads:
            g, g_q = (x.double() for x in self.dense_grads(output, timesteps))
            self._grads[key] = ((g_q @ g.T).numpy(), (g @ g.T).numpy())
        return self._grads[key]

    def ensemble_quadratic(self, n: int, w: int) -> tuple:
        """The ``(n, w)`` ensemble's sampler and its quadratic loss form over every query (128 draws of
        another seed than the ground truth's), trained and computed once."""
        if (n, w) not in self._quadratics:
            from wherefrom.ensemble.synthetic import quadratic_measurement

            sampler = load_module(ensemble_checkpoint(self.bench, n, w)).sampler()
            self._quadratics[n, w] = (sampler, quadratic_measurement(sampler, self.queries, "loss", draws=128, seed=self.bench.measure.seed + 1))
        return self._quadratics[n, w]

    def full(self, split_scores: np.ndarray) -> np.ndarray:
        """Q x N scores from Q x split scores (zero outside the training split)."""
        out = np.zeros((len(split_scores), self.n))
        out[:, self.split] = split_scores
        return out


def trak_method(output: str, damping: float, normalize: bool = False, query_timesteps: int | None = None, **feature: object) -> Callable[[Context], np.ndarray]:
    def run(ctx: Context) -> np.ndarray:
        phi, phi_q = ctx.features(FeatureConfig(output=output, **feature), query_timesteps)
        return ctx.full(trak_scores([phi], [phi_q], damping, normalize=normalize))

    return run


def unprojected_method(output: str, damping: float, timesteps: int = 10, normalize: bool = False) -> Callable[[Context], np.ndarray]:
    """TRAK on unprojected gradients via the N x N Gram matrix (push-through identity)."""

    def run(ctx: Context) -> np.ndarray:
        cross, gram = ctx.grams(output, timesteps)
        if normalize:
            norms = np.sqrt(np.diag(gram))
            cross, gram = cross / norms, gram / np.outer(norms, norms)
        return ctx.full(kernel_scores(cross, gram, damping))

    return run


def kfac_method(
    ekfac: bool, measurement: str, damping: float | None, passes: int, timesteps: int = 10, relative: float = HEURISTIC_DAMPING,
    query_timesteps: int | None = None,
) -> Callable[[Context], np.ndarray]:
    """(EK-)FAC influence with exact training gradients (the library's exact mode), the
    dense training gradients cached across damping values; queries with ``query_timesteps`` draws."""

    def run(ctx: Context) -> np.ndarray:
        pre_cond = load_preconditioner(ctx.factors(passes), "model", ctx.net, ekfac, damping, relative)
        g_q = ctx.query_grads(measurement, query_timesteps or timesteps)
        train_g, _ = ctx.dense_grads("loss", timesteps)
        return ctx.full((precondition(ctx.net, g_q, pre_cond).double() @ train_g.double().T).numpy())

    return run


def stored_method(ekfac: bool, dim: int, residual_dim: int = 0, query_timesteps: int | None = None, dtype: str = "float32") -> Callable[[Context], np.ndarray]:
    """(EK-)FAC influence from stored rows (default factors and draws) at budget ``dim`` (+ a sketch of
    ``residual_dim``) kept in ``dtype``, reduced from the cached dense training gradients: the numbers
    the stored featurisation's hooks give (``tests/test_influence.py``), for a whole curve of dimensions at once."""

    def run(ctx: Context) -> np.ndarray:
        k = FeatureConfig.timesteps
        store = ctx.factors(FactorConfig.passes)
        stored = StoredInfluence(ctx.net, load_eigen(store, "model")[0], InfluenceConfig(dim=dim, residual_dim=residual_dim, timesteps=k), "model")
        train_g, _ = ctx.dense_grads("loss", k)
        rows = torch.cat([stored.rows(train_g[s : s + 64]).to(getattr(torch, dtype)).double() for s in range(0, len(train_g), 64)])
        queries = stored.rows(ctx.query_grads("loss", query_timesteps or k), load_preconditioner(store, "model", ctx.net, ekfac))
        return ctx.full((queries.double() @ rows.T).numpy())

    return run


def stored_library_method(ekfac: bool) -> Callable[[Context], np.ndarray]:
    """The library's own path at its defaults: ``featurize_influence`` into the factors' store (hooks,
    no dense gradient), then ``influence_scores(grads="stored")``."""

    def run(ctx: Context) -> np.ndarray:
        store = ctx.factors(FactorConfig.passes)
        start = time.perf_counter()
        featurize_influence(ctx.net, "model", ctx.module.task, ctx.dm, ctx.split, store, InfluenceConfig(), progress=True)
        print(f"[attribute] stored influence featurisation: {time.perf_counter() - start:.1f} s", flush=True)
        return influence_scores(ctx.module, ctx.dm, ctx.queries, store, "loss", ekfac=ekfac, grads="stored", batch_size=32)

    return run


def ensemble_checkpoint(bench: Benchmark, n: int = ENSEMBLE["n"], w: int = ENSEMBLE["w"]) -> Path:
    """An encoded ensemble with codes ``(n, w)`` on the attributed model's split with the same recipe
    (trained once; the benchmark's own design in ``models/ensemble``, others in ``models/ensemble_n{n}w{w}``)."""
    root = bench.out / "models" / ("ensemble" if (n, w) == (ENSEMBLE["n"], ENSEMBLE["w"]) else f"ensemble_n{n}w{w}")
    if not is_trained(root):
        fit = {**bench.fit, "model": {"class_path": "wherefrom.EncodedEnsemble", "init_args": {**bench.fit["model"].get("init_args", {}), "n": n, "w": w}}}
        train(dataclasses.replace(bench, fit=fit), root, bench.model_seeds[0])
    return checkpoint(root)


def ensemble_loss_method(control: bool, n: int = ENSEMBLE["n"], w: int = ENSEMBLE["w"]) -> Callable[[Context], np.ndarray]:
    """Signed ensemble scores of the ``(n, w)`` ensemble: the exact rise of each query's loss when an
    image's members are dropped, over 128 draws of another seed than the ground truth's; with
    ``control``, minus the member effect fitted on the unused codes (:mod:`wherefrom.ensemble.controls`).
    Raw and controlled scores of one design share one quadratic form (:meth:`Context.ensemble_quadratic`)."""

    def run(ctx: Context) -> np.ndarray:
        from wherefrom.ensemble.controls import control_codes
        from wherefrom.ensemble.synthetic import measurement_scores

        sampler, quad = ctx.ensemble_quadratic(n, w)
        return measurement_scores(quad, sampler.uniform_weights(), sampler.codes, ctx.n, control_codes(sampler.codes, control))

    return run


def ensemble_influence_name(n: int = ENSEMBLE["n"], w: int = ENSEMBLE["w"]) -> str:
    """The cached scores' name of :func:`ensemble_influence_method` (shared by the LDS table and ``ensemble_designs.py``)."""
    return f"ekfac (encoded ensemble n={n}, w={w})"


def ensemble_influence_method(n: int = ENSEMBLE["n"], w: int = ENSEMBLE["w"]) -> Callable[[Context], np.ndarray]:
    """EK-FAC on the ``(n, w)`` ensemble's members at the library's defaults: what ``wherefrom factors
    --ekfac`` and then ``wherefrom attribute --method ekfac`` give for its checkpoint (each member's
    factors on its own code split; exact training gradients)."""

    def run(ctx: Context) -> np.ndarray:
        module = load_module(ensemble_checkpoint(ctx.bench, n, w))
        store = Store(ctx.bench.out / "stores" / f"ensemble_n{n}w{w}_factors", ctx.dm.fingerprint, module.codes_fingerprint)
        for model_id, net in module.denoisers().items():
            fit_factors(net, model_id, module.task, ctx.dm, training_split(module, model_id, ctx.split), store, FactorConfig(ekfac=True), progress=True)
        return EKFAC(store=str(store.root)).attribute(module, ctx.dm, ctx.queries).scores

    return run


def pixel_method(ctx: Context) -> np.ndarray:
    """-||x_q - x_i||^2: the pixel-similarity baseline."""
    return pixel_scores(ctx.queries, ctx.dm.images, ctx.split)


def random_method(ctx: Context) -> np.ndarray:
    return random_scores(len(ctx.queries), ctx.n, seed=0).astype(np.float64)


def tuned(variant: str) -> Callable[[Context], np.ndarray]:
    """Scores of a tuning-curve variant (``tune`` scores every query set, report rows included,
    so a default that is also a curve point is not computed twice)."""

    def run(ctx: Context) -> np.ndarray:
        path = ctx.bench.out / "tuning_scores" / f"{variant}.npy"
        if not path.is_file():
            raise WherefromError(f"{path} is missing; run the `tune` stage first")
        return np.load(path)

    return run


_CONTEXTS: dict[Path, Context] = {}  # one per benchmark folder: dense gradients are computed once per run


def attribute_all(bench: Benchmark, methods: dict[str, Callable[[Context], np.ndarray]], folder: str = "scores") -> dict[str, np.ndarray]:
    """Scores (all queries x N) of every method, cached as ``out/<folder>/<name>.npy``."""
    out = {}
    for name, fn in methods.items():
        path = bench.out / folder / f"{name.replace('/', '_')}.npy"
        if not path.is_file():
            if bench.out not in _CONTEXTS:
                _CONTEXTS[bench.out] = Context(bench)
            ctx = _CONTEXTS[bench.out]
            start = time.perf_counter()
            write_npy(path, fn(ctx))
            print(f"[attribute] {name}: {time.perf_counter() - start:.1f} s", flush=True)
        out[name] = np.load(path)
    return out


def header(first: str, columns: list[str]) -> list[str]:
    """The two header lines of a markdown table."""
    return ["| " + " | ".join([first, *columns]) + " |", "|---" * (len(columns) + 1) + "|"]


def grade(bench: Benchmark, scores: dict[str, np.ndarray], targets: np.ndarray, sets: list[str]) -> dict[str, dict[str, stats.Correlation]]:
    """LDS of each method on each query set (targets: M x all queries, larger = better)."""
    _, rows = all_queries(bench)
    subsets, n = lds.read_subsets(bench)
    masks = lds.subset_masks(subsets, n)
    return {m: {s: lds.lds(sc[rows[s]], masks, targets[:, rows[s]], bench.bootstrap) for s in sets} for m, sc in scores.items()}


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakMemory(threading.Thread):
    """Samples ``RssAnon`` until stopped; ``peak`` is the largest value seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = rss_anon_mib(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, rss_anon_mib())


def timed_peak(fn: Callable[[], object]) -> tuple[float, float]:
    """``(seconds, peak RssAnon MiB)`` of ``fn()``."""
    monitor = PeakMemory()
    monitor.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    monitor.done.set()
    monitor.join()
    return seconds, monitor.peak
