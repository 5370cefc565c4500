"""``wherefrom featurize``: TRAK / D-TRAK features of a finished run into a store."""

from __future__ import annotations

from wherefrom.features import METHOD_OUTPUTS, Allocation, default_projector, FeatureConfig, featurize, ProjectionKind
from wherefrom.store import Entry
from wherefrom.cli.options import add_batch_size, add_device, add_run, add_store, check_batch_size, open_run, open_store
from wherefrom.cli.parser import ConfigArgumentParser
from wherefrom.task import TimestepStrategy


def parser() -> ConfigArgumentParser:
    p = ConfigArgumentParser(prog="wherefrom featurize", description="Projected per-sample gradients of every training image (TRAK / D-TRAK).")
    add_run(p)
    add_store(p, "store folder (created, or resumed if it holds the same config; shared with `wherefrom factors`)")
    p.add_argument("--method", choices=sorted(METHOD_OUTPUTS), default="dtrak", help="trak: output = loss; dtrak: output = square_norm")
    p.add_argument("--output", default=None, help="override the output function (any measurement, e.g. l2_norm)")
    p.add_argument("--proj-dim", type=int, default=FeatureConfig.proj_dim)
    p.add_argument("--timesteps", type=int, default=FeatureConfig.timesteps, help="K draws averaged per image")
    p.add_argument("--strategy", choices=[s.value for s in TimestepStrategy], default=FeatureConfig.strategy)
    p.add_argument("--projection", choices=[k.value for k in ProjectionKind], default=FeatureConfig.projection)
    p.add_argument("--allocation", choices=[k.value for k in Allocation], default=FeatureConfig.allocation, help="structured: how D is split over layers")
    p.add_argument("--seed", type=int, default=0, help="projection seed")
    add_batch_size(p)
    add_device(p)
    return p


def featurize_main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    check_batch_size(a)
    config = FeatureConfig(
        output=a.output or METHOD_OUTPUTS[a.method],
        timesteps=a.timesteps,
        strategy=a.strategy,
        proj_dim=a.proj_dim,
        projection=a.projection,
        projector=default_projector(a.device),
        allocation=a.allocation,
        seed=a.seed,
    )
    module, data = open_run(a, "wherefrom featurize", a.device)
    store = open_store(a, data, module)
    for model_id, net in module.denoisers().items():
        featurize(net, model_id, module.task, data, store, config, a.batch_size, progress=True)
    print(f"wrote {', '.join(Entry.features(config.output, m) for m in module.denoisers())} ({config.projection}, K={config.timesteps}) to {a.store}")
