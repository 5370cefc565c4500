"""``wherefrom featurize``: TRAK / D-TRAK features of a finished run into a store."""

from __future__ import annotations

from wherefrom.cli.options import (
    add_batch_size,
    add_config,
    add_device,
    add_memory,
    add_run,
    add_store,
    check_batch_size,
    config_from,
    open_runs,
    open_store,
    set_memory,
)
from wherefrom.cli.parser import ConfigArgumentParser
from wherefrom.features import (
    METHOD_OUTPUTS,
    FeatureConfig,
    default_projector,
    featurize,
)
from wherefrom.store import Entry


def parser() -> ConfigArgumentParser:
    p = ConfigArgumentParser(prog="wherefrom featurize", description="Projected per-sample gradients of every training image (TRAK / D-TRAK).")
    add_run(p, several=True)
    add_store(p, "store folder (created, or resumed if it holds the same config; shared with `wherefrom factors`; several --ckpt: one sub-store per model's weights)")
    p.add_argument("--method", choices=sorted(METHOD_OUTPUTS), default="dtrak", help="trak: output = loss; dtrak: output = square_norm")
    p.add_argument("--output", default=None, help="override the output function (any measurement, e.g. l2_norm)")
    add_config(p, FeatureConfig, skip=("output", "projector"))
    add_batch_size(p)
    add_memory(p)
    add_device(p)
    return p


def featurize_main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    check_batch_size(a)
    set_memory(a)
    config = config_from(a, FeatureConfig, skip=("output", "projector"), output=a.output or METHOD_OUTPUTS[a.method], projector=default_projector(a.device))
    modules, data, _ = open_runs(a, "wherefrom featurize", a.device)
    stores = [open_store(a, data, module, several=len(modules) > 1) for module in modules]  # every store checked before any work
    print(f"featurising {len(data.indices)} training images x {config.timesteps} draws ({config.output}, D <= {config.proj_dim}) of {len(modules)} model(s); "
          "the first batch's time gives the time left")  # fmt: skip  (stdout: a refusal that follows stays stderr's one line)
    for module, store in zip(modules, stores):
        for model_id, net in module.denoisers().items():
            featurize(net, model_id, module.task, data, store, config, a.batch_size, progress=True)
        print(f"wrote {', '.join(Entry.features(config.output, m) for m in module.denoisers())} ({config.projection}, K={config.timesteps}) to {store.root}")
