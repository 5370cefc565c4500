"""``wherefrom factors``: K-FAC / EK-FAC factors of a finished run into a store."""

from __future__ import annotations

import argparse
import sys

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
from wherefrom.kfac.fidelity import QUERIES, THRESHOLD, TRAIN, record_fidelity
from wherefrom.kfac.fit import FactorConfig, fit_factors, training_split
from wherefrom.kfac.stored import InfluenceConfig, featurize_influence
from wherefrom.store import Entry

# the stored influence's options beside the factors' own: its seed, strategy and dtype under their own names
INFLUENCE_FLAGS = {"seed": "features_seed", "strategy": "features_strategy", "dtype": "features_dtype"}


def factors_main(argv: list[str]) -> None:
    p = ConfigArgumentParser(prog="wherefrom factors", description="Kronecker factors (K-FAC / EK-FAC) of a run's training loss.")
    add_run(p, several=True)
    add_store(p, "store folder (created, or resumed; shared with `wherefrom featurize`; several --ckpt: one sub-store per model's weights)")
    add_config(p, FactorConfig, skip=("mode",))
    g = p.add_argument_group("stored influence", "every training gradient written once in the factors' eigenbasis, so K-FAC/EK-FAC queries do not recompute them")
    g.add_argument("--features", action="store_true", help="also write influence/<id> after the factors (read by attribute --method kfac|ekfac)")
    g.add_argument(
        "--fidelity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"after --features: stored against exact influence on {QUERIES} x {TRAIN} training images, recorded in the store (a warning below Pearson r {THRESHOLD})",
    )
    add_config(g, InfluenceConfig, names=INFLUENCE_FLAGS)
    add_batch_size(p)
    add_memory(p)
    add_device(p)
    a = p.parse_args(argv)
    check_batch_size(a)
    set_memory(a)
    config = config_from(a, FactorConfig, skip=("mode",))
    features = config_from(a, InfluenceConfig, names=INFLUENCE_FLAGS) if a.features else None
    modules, data, _ = open_runs(a, "wherefrom factors", a.device)
    stores = [open_store(a, data, module, several=len(modules) > 1) for module in modules]  # every store checked before any work
    ekfac = f" and {config.passes} EK-FAC passes" if config.ekfac else ""
    stored = "" if features is None else f", then stored-influence rows of {features.timesteps} draws per image"
    print(f"{config.passes} factor passes{ekfac} over {len(data.indices)} training images (one seeded draw per image per pass){stored}, "
          f"for {len(modules)} model(s); the first batch's time gives the time left")  # fmt: skip  (stdout: a refusal that follows stays stderr's one line)
    for module, store in zip(modules, stores):
        for model_id, net in module.denoisers().items():
            split = training_split(module, model_id, data.indices)
            fit_factors(net, model_id, module.task, data, split, store, config, a.batch_size, progress=True)
            if features is not None:
                featurize_influence(net, model_id, module.task, data, split, store, features, a.batch_size, progress=True)
                if a.fidelity:
                    found = record_fidelity(net, model_id, module.task, data, split, store, a.batch_size)
                    print(f"{model_id}: {found.line('--dim')}", file=sys.stdout if found.ok else sys.stderr)
        done = ", ".join(n for m in module.denoisers() for n in config.entries(m))
        done += "".join(f", {Entry.influence(m)}" for m in module.denoisers() if features is not None)
        print(f"wrote {done} to {store.root}")
