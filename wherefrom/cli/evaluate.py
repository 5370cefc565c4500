"""``wherefrom lds subsets|train|measure|score``, ``wherefrom counterfactual`` and ``wherefrom loo``.

``lds`` and ``counterfactual`` read the benchmark config file (``--config configs/lds_digits.yaml``:
the models, subsets and measurement it defines); ``--out`` replaces its output folder.
``loo`` takes a ``--config`` of its own options, as the flat commands do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wherefrom.cli.options import add_sampling
from wherefrom.cli.parser import ConfigArgumentParser
from wherefrom.errors import WherefromError
from wherefrom.evaluation.benchmark import (
    Benchmark,
    check_unconditional,
    is_trained,
    train,
)
from wherefrom.io import check_out_dir, load_array, write_json, write_npy


def benchmark_parser(prog: str, **kwargs) -> ConfigArgumentParser:
    """A parser whose ``--config`` is the benchmark file."""
    p = ConfigArgumentParser(prog=prog, config_file=False, **kwargs)
    p.add_argument("--config", required=True, help="benchmark config file (YAML/JSON), e.g. configs/lds_digits.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`)")
    return p


def method_name(scores_path: Path) -> str:
    """The method recorded in the ``topk.json`` beside ``scores.npy``, else the folder's name."""
    topk = scores_path.parent / "topk.json"
    if topk.is_file():
        return json.loads(topk.read_text()).get("method", scores_path.parent.name)
    return scores_path.parent.name


def load_scores(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise WherefromError(f"scores file {str(path)!r} does not exist; pass the scores.npy written by `wherefrom attribute`")
    scores = load_array(path, "scores")
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.number):
        raise WherefromError(f"{str(path)!r} must be a numeric Q x N array of scores, got shape {scores.shape} ({scores.dtype})")
    if not np.isfinite(scores).all():
        raise WherefromError(f"{str(path)!r} holds {int((~np.isfinite(scores)).sum())} non-finite scores (NaN/inf); recompute them, e.g. with a larger damping")
    return scores


def lds_parser() -> ConfigArgumentParser:
    p = ConfigArgumentParser(prog="wherefrom lds", description="Linear datamodelling score (Park et al. 2023).", config_file=False)
    sub = p.add_subcommands(dest="step", required=True)
    sub.add_subcommand("subsets", benchmark_parser("wherefrom lds subsets"), help="draw the random subsets and write them as index files")
    t = benchmark_parser("wherefrom lds train")
    t.add_argument("--subset-id", type=int, nargs="+", default=None, help="only these subsets (one job per subset)")
    t.add_argument("--workers", type=int, default=1, help="parallel training processes on this machine (one thread each)")
    sub.add_subcommand("train", t, help="train the model(s) of every subset (or of --subset-id J) through `wherefrom fit`")
    m = benchmark_parser("wherefrom lds measure")
    m.add_argument("--queries", required=True, help="samples.npy (the attributed queries) or 'val'")
    sub.add_subcommand("measure", m, help="measure every subset model on the queries (ground truth)")
    s = benchmark_parser("wherefrom lds score")
    s.add_argument("--scores", nargs="+", required=True, help="scores.npy files from `wherefrom attribute`")
    sub.add_subcommand("score", s, help="LDS of one or more methods' scores.npy")
    return p


def lds_main(argv: list[str]) -> None:
    from wherefrom.cli.options import load_queries
    from wherefrom.evaluation import lds

    parsed = lds_parser().parse_args(argv)
    step, a = parsed.step, parsed[parsed.step]
    bench = Benchmark.from_file(a.config, a.out)
    if step == "subsets":
        subsets = lds.write_subsets(bench)
        print(f"wrote {len(subsets)} subsets of {subsets.shape[1]} images to {lds.subsets_dir(bench)}")
    elif step == "train":
        if a.workers < 1:
            raise WherefromError(f"--workers must be >= 1, got {a.workers}")
        if a.subset_id is None:
            print(f"[lds] attributed model: {'done' if is_trained(lds.full_model_dir(bench)) else 'training'} ({lds.full_model_dir(bench)})", flush=True)
            train(bench, lds.full_model_dir(bench), bench.model_seeds[0])
        ckpts = lds.train_subsets(bench, a.subset_id, a.workers)
        print(f"{len(ckpts)} subset models ready under {bench.out / 'models'}")
    elif step == "measure":
        queries = load_queries(a.queries, bench.datamodule())
        values = lds.measure(bench, queries)
        print(f"wrote {bench.out / 'measurements.npy'} ({values.shape[0]} subsets x {values.shape[1]} seeds x {values.shape[2]} queries)")
    else:
        path = bench.out / "lds.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        for f in a.scores:
            name = method_name(Path(f))
            res = lds.score(bench, load_scores(f))
            results[name] = {**res.__dict__, "scores": str(f)}
            print(f"{name:<12} LDS {res.summary()}")
        write_json(path, results)
        print(f"wrote {path}")


def counterfactual_main(argv: list[str]) -> None:
    from wherefrom.evaluation import counterfactual

    p = benchmark_parser(
        "wherefrom counterfactual",
        description="Retrain without each query's top-k training images (and k random ones), regenerate from the same noise, compare.",
    )
    p.add_argument("--ckpt", required=True, help="the attributed model (its data split is the one retrained without the top-k)")
    p.add_argument("--scores", required=True, help="scores.npy of the queries generated from --ckpt with the config's sampling seed/steps")
    p.add_argument("--top-k", type=int, default=None, help="remove this many images per query (default: the config's)")
    p.add_argument("--percent", type=float, default=None, help="remove this percentage of the training split per query (instead of --top-k)")
    p.add_argument("--queries", default=None, help="comma-separated query ids to evaluate (default: all rows of the scores)")
    p.add_argument("--distances", default=None, help="comma-separated distances, l2 and/or lpips (default: the config's)")
    a = p.parse_args(argv)
    if a.top_k is not None and a.percent is not None:
        raise WherefromError("pass --top-k or --percent, not both; see `wherefrom counterfactual --help`")
    bench = Benchmark.from_file(a.config, a.out)
    cf = bench.counterfactual
    if a.top_k is not None or a.percent is not None:
        cf = type(cf)(top_k=a.top_k, percent=a.percent, seed=cf.seed, distances=cf.distances)
    if a.distances:
        cf.distances = a.distances.split(",")
    bench.counterfactual = cf
    queries = [int(q) for q in a.queries.split(",")] if a.queries else None
    result = counterfactual.run(bench, a.ckpt, load_scores(a.scores), queries, method=method_name(Path(a.scores)))
    print(counterfactual.summary(result))
    print(f"wrote {bench.out / 'counterfactual'}")


def loo_main(argv: list[str]) -> None:
    from wherefrom.checkpoint import load_datamodule, load_module
    from wherefrom.evaluation.loo import leave_one_out, sample_indices

    p = ConfigArgumentParser(
        prog="wherefrom loo",
        description="Grade attribution methods against an encoded ensemble's exact leave-one-out (no retraining).",
    )
    p.add_argument("--ckpt", required=True, help="the encoded-ensemble checkpoint the scores were computed on")
    p.add_argument("--scores", nargs="+", required=True, help="scores.npy files of the queries generated with --seed/--steps/--scheduler")
    p.add_argument("--out", required=True, help="folder for loo.json and distances.npy")
    p.add_argument("--num-indices", type=int, default=64, help="training indices to ablate exactly (one sampling run each)")
    p.add_argument("--index-seed", type=int, default=0, help="seed of the sample of training indices")
    add_sampling(p, "the queries", conditions=False)
    p.add_argument("--distance", choices=["l2", "lpips"], default="l2")
    a = p.parse_args(argv)
    if a.num_indices < 2:
        raise WherefromError(f"--num-indices must be >= 2 (a correlation over indices), got {a.num_indices}")
    check_out_dir(a.out, "--out")
    scores = {method_name(Path(f)): load_scores(f) for f in a.scores}
    module, dm = load_module(a.ckpt), load_datamodule(a.ckpt)
    check_unconditional(module)
    dm.setup()
    num_queries = next(iter(scores.values())).shape[0]
    indices = sample_indices(dm.indices, a.num_indices, a.index_seed)
    loo = leave_one_out(module, indices, num_queries, a.seed, a.steps, a.scheduler, a.distance, progress=True)
    out = Path(a.out)
    results = {}
    for name, s in scores.items():
        res = loo.correlation(s)
        results[name] = res.__dict__
        print(f"{name:<12} leave-one-out Spearman {res.summary()}")
    write_npy(out / "distances.npy", loo.distances)
    write_json(out / "loo.json", {"indices": loo.indices.tolist(), "distance": a.distance, "methods": results})
    print(f"wrote {out / 'loo.json'}")
