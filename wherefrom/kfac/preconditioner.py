"""Normalised factors, their eigendecomposition, the (EK-)FAC preconditioner with per-layer damping,
and loading it from a store."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from wherefrom.errors import FingerprintMismatchError, WherefromError
from wherefrom.io import weights_hash
from wherefrom.features import trainable_parameters
from wherefrom.kfac.factors import HEURISTIC_DAMPING, LayerEigen, layer_dims
from wherefrom.store import Entry, Store


def eigendecompose(sums: dict[str, Tensor], layers: Iterable[str]) -> dict[str, LayerEigen]:
    """Eigendecomposition in float64 of ``A = A_sum / A_count`` and ``G = G_sum / G_count``
    (tiny negative eigenvalues from round-off are clipped to 0); layers that never ran are left out."""
    out = {}
    for name in layers:
        if float(sums[f"{name}/A_count"]) == 0:  # the layer never ran: no curvature, no factors
            continue
        a = sums[f"{name}/A"].double() / sums[f"{name}/A_count"].double()
        g = sums[f"{name}/G"].double() / sums[f"{name}/G_count"].double()
        la, qa = torch.linalg.eigh(a)
        lg, qg = torch.linalg.eigh(g)
        out[name] = LayerEigen(qa, la.clamp_min(0), qg, lg.clamp_min(0))
    return out


def eigen_tensors(eigen: dict[str, LayerEigen]) -> dict[str, Tensor]:
    return {f"{n}/{k}": getattr(e, k) for n, e in eigen.items() for k in ("qa", "la", "qg", "lg")}


def eigen_from_tensors(tensors: dict[str, Tensor]) -> dict[str, LayerEigen]:
    names = sorted({k.rsplit("/", 1)[0] for k in tensors})
    return {n: LayerEigen(*(tensors[f"{n}/{k}"] for k in ("qa", "la", "qg", "lg"))) for n in names}


class KFACPreconditioner:
    """``v -> (F_l + lambda_l I)^{-1} v`` per layer in the Kronecker eigenbasis:
    ``Q_G [(Q_G^T V Q_A) / (Lambda + lambda_l)] Q_A^T`` with ``Lambda = l_G l_A^T``
    (K-FAC) or the EK-FAC second moments.

    Args:
        eigen: per-layer eigendecompositions.
        corrected: per-layer EK-FAC eigenvalues ``d_out x d_in`` (``None`` = K-FAC).
        damping: absolute ``lambda`` for every layer; ``None``: ``relative`` x each layer's mean eigenvalue.
        relative: the per-layer damping factor used when ``damping`` is ``None``.
    """

    def __init__(
        self, eigen: dict[str, LayerEigen], corrected: dict[str, Tensor] | None = None, damping: float | None = None, relative: float = HEURISTIC_DAMPING
    ) -> None:
        if (damping is not None and damping < 0) or relative < 0:
            raise WherefromError(f"damping must be >= 0, got {damping if damping is not None else relative}")
        self.eigen = eigen
        self.inverse: dict[str, Tensor] = {}
        self.damping: dict[str, float] = {}
        for name, e in eigen.items():
            lam = corrected[name].double() if corrected is not None else torch.outer(e.lg, e.la)
            d = relative * float(lam.mean()) if damping is None else damping
            if d <= 0 and bool((lam <= 0).any()):
                raise WherefromError(f"layer {name!r} has zero curvature eigenvalues; use a damping > 0")
            self.damping[name] = d
            self.inverse[name] = 1.0 / (lam + d)

    def apply(self, name: str, v: Tensor) -> Tensor:
        """Precondition a batch of layer gradients ``B x d_out x d_in`` (float64 math)."""
        e = self.eigen[name]
        vd = v.double()
        rotated = e.qg.T @ vd @ e.qa
        return (e.qg @ (rotated * self.inverse[name]) @ e.qa.T).to(v.dtype)


def correction_tensors(sums: dict[str, Tensor], layers: Iterable[str]) -> dict[str, Tensor]:
    """EK-FAC eigenvalues ``lambda_sum / lambda_count`` per layer."""
    return {n: sums[f"{n}/lambda"].double() / sums[f"{n}/lambda_count"].double() for n in layers}



def eigen_to(e: LayerEigen, device: torch.device) -> LayerEigen:
    return LayerEigen(*(t.to(device) for t in (e.qa, e.la, e.qg, e.lg)))


def load_preconditioner(
    store: Store, model_id: str, net: nn.Module, ekfac: bool, damping: float | None = None, relative: float = HEURISTIC_DAMPING
) -> KFACPreconditioner:
    """The (EK-)FAC preconditioner of ``model_id`` from ``store``, checked against ``net``'s weights."""
    names = Entry.kfac(model_id)
    if not store.has(names["eigen"]):
        raise WherefromError(f"store {str(store.root)!r} has no K-FAC factors for {model_id!r}; fit them into it first (the KFACFactors callback or the factors command)")
    config = store.config(names["eigen"])
    if config["weights"] != weights_hash(net):
        raise FingerprintMismatchError(
            f"the factors of {model_id!r} in {str(store.root)!r} were fit on other weights than this checkpoint's; fit them again, replacing them (overwrite)"
        )
    if ekfac and not store.has(names["ekfac"]):
        raise WherefromError(f"store {str(store.root)!r} has no EK-FAC eigenvalues for {model_id!r}; fit the factors with ekfac (KFACFactors(ekfac=True) or the factors command)")
    device = next(net.parameters()).device
    eigen = {n: eigen_to(e, device) for n, e in eigen_from_tensors(store.load_tensors(names["eigen"])).items()}
    corrected = correction_tensors(store.load_tensors(names["ekfac"]), eigen) if ekfac else None
    return KFACPreconditioner(eigen, {n: c.to(device) for n, c in corrected.items()} if corrected else None, damping, relative)


def precondition(net: nn.Module, grads: Tensor, preconditioner: KFACPreconditioner) -> Tensor:
    """``(F + lambda I)^{-1} g`` for dense gradients ``B x P`` (:func:`trainable_parameters`
    order); parameters outside K-FAC's layers get 0."""
    offsets, start = {}, 0
    for name, p in trainable_parameters(net).items():
        offsets[name] = slice(start, start + p.numel())
        start += p.numel()
    if grads.shape[1] != start:
        raise WherefromError(f"expected B x {start} gradients, got {tuple(grads.shape)}")
    out = torch.zeros_like(grads)
    modules = dict(net.named_modules())
    for name in preconditioner.eigen:
        layer = modules[name]
        w, b = offsets.get(f"{name}.weight"), offsets.get(f"{name}.bias")
        if w is None or (layer.bias is not None and b is None):
            continue  # (partly) frozen layer: not part of the influence
        d_out, _ = layer_dims(layer)
        parts = [grads[:, w].reshape(len(grads), d_out, -1)] + ([grads[:, b].unsqueeze(-1)] if b is not None else [])
        v = preconditioner.apply(name, torch.cat(parts, -1))
        out[:, w] = v[..., : parts[0].shape[-1]].reshape(len(grads), -1)
        if b is not None:
            out[:, b] = v[..., -1]
    return out
