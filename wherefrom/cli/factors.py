"""``wherefrom factors``: K-FAC / EK-FAC factors of a finished run into a store."""

from __future__ import annotations

from wherefrom.kfac.factors import Curvature, KFACApprox
from wherefrom.kfac.fit import FactorConfig, fit_factors, training_split
from wherefrom.kfac.stored import DTYPES, InfluenceConfig, featurize_influence
from wherefrom.store import Entry
from wherefrom.cli.options import add_batch_size, add_device, add_run, add_store, check_batch_size, open_run, open_store
from wherefrom.cli.parser import ConfigArgumentParser


def factors_main(argv: list[str]) -> None:
    p = ConfigArgumentParser(prog="wherefrom factors", description="Kronecker factors (K-FAC / EK-FAC) of a run's training loss.")
    add_run(p)
    add_store(p, "store folder (created, or resumed; shared with `wherefrom featurize`)")
    p.add_argument("--curvature", choices=[c.value for c in Curvature], default=FactorConfig.curvature)
    p.add_argument("--kfac", choices=[k.value for k in KFACApprox], default=FactorConfig.kfac)
    p.add_argument("--ekfac", action="store_true", help="also measure EK-FAC eigenvalues (extra passes)")
    p.add_argument("--passes", type=int, default=FactorConfig.passes, help="passes over the data, fresh (t, eps) each")
    g = p.add_argument_group("stored influence", "every training gradient written once in the factors' eigenbasis, so K-FAC/EK-FAC queries do not recompute them")
    g.add_argument("--features", action="store_true", help="also write influence/<id> after the factors (read by attribute --method kfac|ekfac)")
    g.add_argument("--dim", type=int, default=InfluenceConfig.dim, help="eigenbasis coordinates kept per image (--features-dtype bytes each: bfloat16 2, float32 4)")
    g.add_argument("--residual-dim", type=int, default=InfluenceConfig.residual_dim, help="random sketch of the other coordinates (0: none)")
    g.add_argument("--timesteps", type=int, default=InfluenceConfig.timesteps, help="K draws averaged per training gradient")
    g.add_argument("--features-dtype", choices=DTYPES, default=InfluenceConfig.dtype, help="precision of the stored rows (bfloat16: LDS unchanged at half float32's bytes)")
    add_batch_size(p)
    add_device(p)
    a = p.parse_args(argv)
    check_batch_size(a)
    config = FactorConfig(a.curvature, a.kfac, a.passes, a.ekfac)
    features = InfluenceConfig(dim=a.dim, residual_dim=a.residual_dim, timesteps=a.timesteps, dtype=a.features_dtype) if a.features else None
    module, data = open_run(a, "wherefrom factors", a.device)
    store = open_store(a, data, module)
    for model_id, net in module.denoisers().items():
        split = training_split(module, model_id, data.indices)
        fit_factors(net, model_id, module.task, data, split, store, config, a.batch_size, progress=True)
        if features is not None:
            featurize_influence(net, model_id, module.task, data, split, store, features, a.batch_size, progress=True)
    done = ", ".join(n for m in module.denoisers() for n in config.entries(m))
    done += "".join(f", {Entry.influence(m)}" for m in module.denoisers() if features is not None)
    print(f"wrote {done} to {a.store}")
