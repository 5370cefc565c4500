"""The protocol every attribution method follows, and what it returns.

Every method is an *attributor*: a typed dataclass with
``attribute(module, data, queries) -> Attribution`` (:class:`Attributor`), registered in
:data:`wherefrom.attribution.ATTRIBUTORS` with what it needs (:class:`Needs`).
:func:`topk_table` is an :class:`Attribution`'s top-k as ``topk.json`` holds it.
"""

from __future__ import annotations

import enum
import dataclasses
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from wherefrom.attribution.html import summary_html
from wherefrom.errors import WherefromError


class Needs(str, enum.Enum):
    """What an attributor reads besides the module, its data and the queries."""

    NOTHING = "nothing"
    FEATURES = "features"  # a store of TRAK features (`wherefrom featurize` or the TRAKFeatures callback)
    FACTORS = "factors"  # a store of K-FAC factors (`wherefrom factors` or the KFACFactors callback)
    ENSEMBLE = "ensemble"  # an encoded ensemble with its codes (the module itself)


SAVED = "attribution.json"  # the manifest of a saved Attribution (Attribution.save)


@dataclass(repr=False)
class Attribution:
    """Scores of Q queries against all N training indices (larger = more influential).

    ``split``: the global indices the model trained on; only these are ranked by
    :meth:`topk` (``None``: all N). ``extra``: method-specific per-query results that go
    into ``topk.json`` (e.g. exact-ablation distances), one dict per query.
    ``artifacts``: named per-query image rows (``Q x R x C x H x W``), written as
    ``<name>.npy`` and ``<name>.png`` (each query, then its R images).
    ``info``: how the scores were made (e.g. K-FAC's ``grads`` mode), written into ``topk.json``.
    ``unit``: what a score measures and its sign (the method's :attr:`Attributor.unit`).
    ``removal_scale``: for influence scores, the factor that turns a score into the predicted
    change of the query's measurement if the image were removed (``1 / N``); ``None`` otherwise.
    ``names``: each training index's identity (file, caption, class or index; :func:`wherefrom.target.image_names`).
    ``conditions``: each query's condition as text (its class or caption), for reports.
    ``by_model``: for scores averaged over M models (:func:`~wherefrom.attribution.average.attribute_models`),
    each model's own (``M x Q x N``); the models are in ``info["models"]``.
    """

    scores: np.ndarray
    queries: Tensor
    method: str
    split: np.ndarray | None = None
    extra: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    unit: str = ""
    removal_scale: float | None = None
    names: list[str] | None = None
    conditions: list[str] | None = None
    by_model: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32)
        if self.scores.ndim != 2 or self.scores.shape[0] != len(self.queries):
            raise WherefromError(f"scores must be Q x N with Q = {len(self.queries)} queries, got {self.scores.shape}")
        if self.split is not None:
            self.split = np.sort(np.asarray(self.split, dtype=np.int64))
        for name, rows in self.artifacts.items():
            if rows.dim() != 5 or len(rows) != len(self.queries):
                raise WherefromError(f"artifact {name!r} must be Q x R x C x H x W with Q = {len(self.queries)}, got {tuple(rows.shape)}")
        if self.by_model is not None and (self.by_model.ndim != 3 or self.by_model.shape[1:] != self.scores.shape):
            raise WherefromError(f"by_model must be M x Q x N with Q x N = {self.scores.shape}, got {self.by_model.shape}")
        if self.conditions is not None and len(self.conditions) != len(self.queries):
            raise WherefromError(f"conditions must give one per query ({len(self.queries)}), got {len(self.conditions)}")
        if self.names is not None and len(self.names) != self.scores.shape[1]:
            raise WherefromError(f"names must give one name per training index ({self.scores.shape[1]}), got {len(self.names)}")

    def __repr__(self) -> str:
        """One line: the method, the sizes, the unit (never the score array)."""
        ranked = len(self.columns)
        return (f"Attribution(method={self.method!r}, queries={len(self.queries)}, training images={ranked}"
                f"{'' if ranked == self.scores.shape[1] else f' of {self.scores.shape[1]} indices'}, unit={self.unit!r})")  # fmt: skip

    def records(self, k: int | None = None) -> list[dict[str, Any]]:
        """The top ``k`` (default: every ranked image) of each query as rows ``{query, rank (1 = top), index, name, score,
        predicted_change}`` (``predicted_change``: the measurement's change if the image were removed, for
        influence methods; else ``None``)."""
        idx, top = self.topk(len(self.columns) if k is None else k)
        scale = self.removal_scale
        return [
            {"query": q, "rank": r + 1, "index": int(i), "name": None if self.names is None else self.names[i], "score": float(s),
             "predicted_change": None if scale is None else float(s) * scale}  # fmt: skip
            for q in range(len(idx))
            for r, (i, s) in enumerate(zip(idx[q], top[q]))
        ]

    def to_pandas(self, k: int | None = None) -> Any:
        """:meth:`records` as a ``pandas.DataFrame`` (one row per query and ranked image)."""
        try:
            import pandas as pd
        except ImportError:
            raise WherefromError("to_pandas needs pandas; pip install pandas (or use records(), the same rows as dicts)") from None
        return pd.DataFrame.from_records(self.records(k), columns=["query", "rank", "index", "name", "score", "predicted_change"])

    def plot(self, images: Tensor, k: int = 5, queries: Sequence[int] | None = None) -> Any:
        """A matplotlib figure: each query (a row) beside its top ``k``, titled with names and scores.
        ``images``: the training images over the whole index space (``data.images``)."""
        import matplotlib.pyplot as plt

        if len(images) != self.scores.shape[1]:
            raise WherefromError(f"plot needs the training images of all {self.scores.shape[1]} indices (data.images), got {len(images)}")
        rows = list(range(len(self.queries))) if queries is None else list(queries)
        idx, top = self.topk(k)
        fig, axes = plt.subplots(len(rows), idx.shape[1] + 1, figsize=(1.6 * (idx.shape[1] + 1), 1.8 * len(rows)), squeeze=False)
        show = lambda x: ((x.float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).numpy()  # noqa: E731
        for r, q in enumerate(rows):
            panels = [(self.queries[q], f"query {q}")] + [
                (images[i], f"{self.names[i] if self.names else i}\n{s:.3g}") for i, s in zip(idx[q], top[q])
            ]
            for ax, (img, title) in zip(axes[r], panels):
                ax.imshow(show(img), cmap="gray", vmin=0, vmax=1)
                ax.set_title(title, fontsize=7)
                ax.axis("off")
        fig.suptitle(f"{self.method}: {self.unit}", fontsize=8)
        fig.tight_layout()
        return fig

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the whole result to folder ``path`` (``attribution.json`` with every field but the arrays, which
        go to ``.npy`` files it lists with their shapes); :meth:`load` reads it back equal. The folder is written
        beside it and swapped in whole, so a crash leaves the old or the new; an existing non-empty folder is
        replaced only with ``overwrite=True``."""
        import os
        import shutil
        import tempfile

        from wherefrom.io import fsync_path, write_json, write_npy

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise WherefromError(f"{str(path)!r} is a file; pass a folder path")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise WherefromError(f"{str(path)!r} exists and is not empty; pass another folder or overwrite=True")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        arrays = {"scores": self.scores, "queries": self.queries.detach().cpu().numpy()}
        if self.split is not None:
            arrays["split"] = self.split
        if self.by_model is not None:
            arrays["scores_by_model"] = self.by_model
        arrays |= {f"artifact_{name}": rows.detach().cpu().numpy() for name, rows in self.artifacts.items()}
        for name, array in arrays.items():
            write_npy(tmp / f"{name}.npy", array)
        fields = {"method": self.method, "unit": self.unit, "info": self.info, "extra": self.extra, "removal_scale": self.removal_scale,
                  "names": self.names, "conditions": self.conditions}  # fmt: skip
        write_json(tmp / SAVED, {**fields, "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()}})
        if path.exists():
            shutil.rmtree(path)  # empty, or overwrite=True
        os.replace(tmp, path)
        fsync_path(path.parent)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """A result written by :meth:`save`, its arrays checked against the manifest's shapes and dtypes."""
        import json

        from wherefrom.io import load_array

        path = Path(path)
        if not (path / SAVED).is_file():
            raise WherefromError(f"{str(path)!r} holds no saved attribution ({SAVED}); pass a folder written by Attribution.save")
        try:
            meta = json.loads((path / SAVED).read_text())
            listed = meta.pop("arrays")
            if "scores" not in listed or "queries" not in listed or set(meta) - {f.name for f in dataclasses.fields(cls)}:
                raise KeyError("arrays")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WherefromError(f"{str(path / SAVED)!r} is damaged; save the attribution again") from None
        arrays = {}
        for name, spec in listed.items():
            array = load_array(path / f"{name}.npy", f"saved attribution {name}")
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise WherefromError(f"saved attribution {name}.npy is {array.shape} {array.dtype}, not {tuple(spec['shape'])} {spec['dtype']} as {SAVED} lists; save it again")
            arrays[name] = array
        artifacts = {name[len("artifact_"):]: torch.from_numpy(a) for name, a in arrays.items() if name.startswith("artifact_")}
        return cls(arrays["scores"], torch.from_numpy(arrays["queries"]), split=arrays.get("split"), artifacts=artifacts, by_model=arrays.get("scores_by_model"), **meta)

    def _repr_html_(self) -> str:
        """A notebook's view: each query beside its top 5 (names, scores, predicted changes)."""
        return summary_html(topk_table(self, 5), self.queries.float().cpu())

    @property
    def columns(self) -> np.ndarray:
        """The global indices that are ranked: the training split (all N when unknown)."""
        return np.arange(self.scores.shape[1]) if self.split is None else self.split

    def topk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global indices (Q x k) and scores of the k most influential training images per query."""
        cols = self.columns
        k = min(k, len(cols))
        order = np.argsort(-self.scores[:, cols], axis=1, kind="stable")[:, :k]
        idx = cols[order]
        return idx, np.take_along_axis(self.scores, idx, axis=1)

    def by_group(self, group_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores per group (class, artist, source): the groups (sorted) and ``Q x G`` sums of the
        scores of each group's training images. For linear scores (TRAK, K-FAC, LDS's datamodels)
        the sum is the group's predicted effect; ``group_ids`` covers the full index space."""
        group_ids = np.asarray(group_ids)
        if group_ids.shape != (self.scores.shape[1],):
            raise WherefromError(f"group ids must give one group per training index ({self.scores.shape[1]}), got shape {group_ids.shape}")
        cols = self.columns
        groups, inverse = np.unique(group_ids[cols], return_inverse=True)
        sums = np.zeros((len(self.scores), len(groups)))
        np.add.at(sums.T, inverse, self.scores[:, cols].astype(np.float64).T)
        return groups, sums


@runtime_checkable
class Attributor(Protocol):
    """One attribution method: its options are the dataclass fields, ``name`` its CLI name.

    ``attribute`` scores every training image for each query; ``cond`` holds the queries'
    conditions for a conditional model (class labels or text embeddings, one per query)."""

    name: ClassVar[str]
    needs: ClassVar[Needs]
    unit: ClassVar[str]  # what a score measures and its sign, as the command line's help, topk.json and reports state it

    def attribute(self, module: Any, data: Any, queries: Tensor, cond: Tensor | None = None) -> Attribution: ...



def topk_table(result: Attribution, top_k: int, group_ids: np.ndarray | None = None) -> dict[str, Any]:
    """What ``topk.json`` holds: per query the top-k indices, scores, names and (influence methods)
    predicted changes, with the method, its unit and ``info``; with ``group_ids`` (one per training
    index) also the ``top_k`` groups of largest summed score (:meth:`Attribution.by_group`)."""
    if top_k < 1:
        raise WherefromError(f"top_k must be >= 1, got {top_k}")
    idx, top = result.topk(top_k)
    groups, sums = result.by_group(group_ids) if group_ids is not None else (None, None)
    rows = []
    for q in range(len(idx)):
        row = {"query": q, "indices": idx[q].tolist(), "scores": top[q].tolist()}
        if result.names is not None:
            row["names"] = [result.names[i] for i in idx[q]]
        if result.conditions is not None:
            row["condition"] = result.conditions[q]
        if result.removal_scale is not None:  # the measurement's predicted change if the image were removed
            row["predicted_change"] = (top[q].astype(np.float64) * result.removal_scale).tolist()
        if groups is not None:
            best = np.argsort(-sums[q], kind="stable")[:top_k]
            row["groups"] = [{"group": str(groups[g]), "total": float(sums[q, g])} for g in best]
        if result.extra:
            row.update(result.extra[q])
        rows.append(row)
    meta = {"method": result.method, "unit": result.unit, **({"removal_scale": result.removal_scale} if result.removal_scale is not None else {})}
    return {**meta, **result.info, "top_k": int(idx.shape[1]), "queries": rows}


__all__ = ["Attribution", "Attributor", "Needs", "topk_table"]
