"""``wherefrom factors``: K-FAC / EK-FAC factors of a finished run into a store."""

from __future__ import annotations

import torch

from wherefrom.attribution.kfac.factors import Curvature, KFACApprox
from wherefrom.attribution.kfac.fit import FactorConfig, fit_factors, training_split
from wherefrom.attribution.kfac.preconditioner import entry_names
from wherefrom.attribution.store import Store
from wherefrom.errors import ConfigArgumentParser, WherefromError


def factors_main(argv: list[str]) -> None:
    """``wherefrom factors``: K-FAC factors of a finished run into a store."""
    from wherefrom.checkpoint import load_datamodule, load_module

    p = ConfigArgumentParser(prog="wherefrom factors", description="Kronecker factors (K-FAC / EK-FAC) of a run's training loss.")
    p.add_argument("--ckpt", required=True, help="checkpoint from `wherefrom fit` (single model or ensemble)")
    p.add_argument("--store", required=True, help="store folder (shared with `wherefrom featurize`)")
    p.add_argument("--curvature", choices=[c.value for c in Curvature], default=FactorConfig.curvature)
    p.add_argument("--kfac", choices=[k.value for k in KFACApprox], default=FactorConfig.kfac)
    p.add_argument("--ekfac", action="store_true", help="also measure EK-FAC eigenvalues (extra passes)")
    p.add_argument("--passes", type=int, default=FactorConfig.passes, help="passes over the data, fresh (t, eps) each")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace a store or entries made for other data, config or weights")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise WherefromError(f"--batch-size must be >= 1, got {a.batch_size}")
    config = FactorConfig(a.curvature, a.kfac, a.passes, a.ekfac)
    module = load_module(a.ckpt).to(a.device)
    datamodule = load_datamodule(a.ckpt)
    store = Store(a.store, datamodule.fingerprint, module.codes_fingerprint, overwrite=a.overwrite)
    for model_id, net in module.denoisers().items():
        split = training_split(module, model_id, datamodule.indices)
        fit_factors(net, model_id, module.task, datamodule, split, store, config, a.batch_size, progress=True)
    done = ", ".join(n for m in module.denoisers() for k, n in entry_names(m).items() if k != "ekfac" or a.ekfac)
    print(f"wrote {done} to {a.store}")


__all__ = ["factors_main"]
