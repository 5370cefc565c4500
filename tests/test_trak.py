"""TRAK / D-TRAK scoring: the closed form, blockwise and over model ids, and the attribute command."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import torch
import pytest

from tests.helpers import SUBSET, tiny_checkpoint
from wherefrom import cli
from wherefrom.attribution.trak import (
    DAMPING,
    DTRAK,
    TRAK,
    kernel_scores,
    query_features,
    trak_scores,
)
from wherefrom.errors import WherefromError
from wherefrom.features import FeatureConfig, featurize
from wherefrom.store import Store


def _closed_form(phi: np.ndarray, phi_q: np.ndarray, lam: float) -> np.ndarray:
    return phi_q @ np.linalg.inv(phi.T @ phi + lam * np.eye(phi.shape[1])) @ phi.T


def test_scores_equal_closed_form_blockwise_and_averaged():
    rng = np.random.default_rng(0)
    phis = [rng.normal(size=(23, 6)) * s for s in (1.0, 30.0)]
    queries = [rng.normal(size=(4, 6)) for _ in phis]
    # one model id, explicit damping, blocks smaller than N
    np.testing.assert_allclose(trak_scores(phis[:1], queries[:1], damping=0.5, block=5), _closed_form(phis[0], queries[0], 0.5 * np.trace(phis[0].T @ phis[0]) / 6), rtol=1e-10)
    # default damping is relative to the kernel's mean eigenvalue; scores average over model ids
    expected = np.mean([_closed_form(p, q, DAMPING["dtrak"] * np.trace(p.T @ p) / 6) for p, q in zip(phis, queries)], axis=0)
    np.testing.assert_allclose(trak_scores(phis, queries, block=7), expected, rtol=1e-10)
    # D > N: solved on the N x N Gram matrix (push-through identity); lambda is relative to the mean
    # nonzero eigenvalue, tr / min(N, D); all-zero rows (outside the split) score 0
    wide, q = rng.normal(size=(5, 9)), rng.normal(size=(2, 9))
    padded = np.concatenate([wide[:2], np.zeros((3, 9)), wide[2:]])
    expected = _closed_form(wide, q, 1e-3 * np.trace(wide.T @ wide) / 5)
    got = trak_scores([padded], [q], damping=1e-3, block=4)
    np.testing.assert_allclose(got[:, [0, 1, 5, 6, 7]], expected, rtol=1e-8)
    assert not got[:, 2:5].any()
    np.testing.assert_allclose(kernel_scores(q @ wide.T, wide @ wide.T, 1e-3), expected, rtol=1e-8)
    with pytest.raises(WherefromError, match="singular"):
        trak_scores([np.zeros((3, 2))], [np.ones((1, 2))])


@pytest.fixture(scope="module")
def featurised(tmp_path_factory):
    """A tiny model (trained a few steps) saved as a checkpoint, its D-TRAK store, and queries."""
    root = tmp_path_factory.mktemp("trak")
    model, dm = tiny_checkpoint(root)
    config = FeatureConfig(timesteps=2, proj_dim=128)
    store = Store(root / "store", dm.fingerprint)
    featurize(model.unet, "model", model.task, dm, store, config, batch_size=16)
    queries = dm.images[[30, 3]]
    np.save(root / "queries.npy", queries.numpy())
    return root, model.eval(), dm, config, queries


def test_attribute_scores_stored_features_against_fresh_query_features(featurised):
    root, model, dm, config, queries = featurised
    result = DTRAK(store=str(root / "store"), batch_size=1).attribute(model, dm, queries)
    assert result.scores.shape == (2, dm.num_images) and result.method == "dtrak"
    phi = Store.open(root / "store").read_array("features/square_norm/model")
    phi_q = query_features(model.unet, model, "model", config, queries, batch_size=1)  # the same batches as attribute's
    # the same computation, then stored as float32 scores: equal to float32 rounding (eps = 2^-23)
    np.testing.assert_allclose(result.scores, trak_scores([phi], [phi_q]), rtol=2**-23, atol=1e-12 * np.abs(result.scores).max())
    outside = np.setdiff1d(np.arange(dm.num_images), SUBSET)
    assert not result.scores[:, outside].any() and np.abs(result.scores[:, SUBSET]).min() > 0
    # queries may take more draws than the training features: their features alone change
    more = DTRAK(store=str(root / "store"), batch_size=1, query_timesteps=5).attribute(model, dm, queries)
    phi_q5 = query_features(model.unet, model, "model", dataclasses.replace(config, timesteps=5), queries, batch_size=1)
    np.testing.assert_allclose(more.scores, trak_scores([phi], [phi_q5]), rtol=2**-23, atol=1e-12 * np.abs(more.scores).max())
    assert not np.allclose(more.scores, result.scores)
    # query noise is seeded by -(q + 1): a query's features do not depend on its batch (float64: exact up to rounding;
    # float32 kernels differ with the batch shape, on some CPUs by 1e-4 relative)
    net64 = copy.deepcopy(model.unet).double()
    one, two = (query_features(net64, model, "model", config, queries.double(), batch_size=b) for b in (1, 2))
    np.testing.assert_allclose(one, two, rtol=1e-10, atol=1e-12 * float(one.abs().max()))
    with pytest.raises(WherefromError, match=r"no features of output 'loss' \(it has features of \['square_norm'\]\)"):
        TRAK(store=str(root / "store"), batch_size=4).attribute(model, dm, queries)
    with pytest.raises(WherefromError, match="needs a store"):
        DTRAK(batch_size=4).attribute(model, dm, queries)


def test_attribute_command_writes_the_common_outputs(featurised, capsys):
    root = featurised[0]
    cli.main(["attribute", "--ckpt", str(root / "model.ckpt"), "--method", "dtrak", "--store", str(root / "store"),
              "--queries", str(root / "queries.npy"), "--top-k", "3", "--out", str(root / "out")])
    scores = np.load(root / "out" / "scores.npy")
    assert scores.shape == (2, 1797) and (root / "out" / "topk.png").is_file() and (root / "out" / "topk.json").is_file()
    assert set(np.argsort(-scores, axis=1)[:, :3].ravel()) <= set(SUBSET)
    # the Python API gives the very same scores as the command
    _, model, dm, _, queries = featurised
    assert np.array_equal(DTRAK(store=str(root / "store")).attribute(model, dm, queries).scores, scores)


def test_normalised_scores_equal_the_closed_form_on_unit_rows():
    """ReTrac-style renormalisation: the closed form on unit-norm training rows, in both solve paths."""
    rng = np.random.default_rng(1)
    for n, d in ((23, 6), (5, 9)):  # D x D kernel and N x N Gram paths
        phi, q = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=(n, 1)), rng.normal(size=(3, d))
        unit = phi / np.linalg.norm(phi, axis=1, keepdims=True)
        lam = 0.1 * np.trace(unit.T @ unit) / min(n, d)
        np.testing.assert_allclose(trak_scores([phi], [q], 0.1, block=4, normalize=True), _closed_form(unit, q, lam), rtol=1e-8)


def test_attribute_reads_a_config_file_and_prints_its_config(featurised, capsys, tmp_path):
    """Every flat command takes ``--config file.yaml`` (flags after it override) and ``--print_config``, as ``fit`` does."""
    root = featurised[0]
    config = tmp_path / "attribute.yaml"
    config.write_text(f"ckpt: {root / 'model.ckpt'}\nmethod: dtrak\nstore: {root / 'store'}\nqueries: {root / 'queries.npy'}\ntop_k: 5\n")
    cli.main(["attribute", "--config", str(config), "--top-k", "3", "--out", str(tmp_path / "from_config")])
    cli.main(["attribute", "--ckpt", str(root / "model.ckpt"), "--method", "dtrak", "--store", str(root / "store"),
              "--queries", str(root / "queries.npy"), "--top-k", "3", "--out", str(tmp_path / "from_flags")])
    assert np.array_equal(np.load(tmp_path / "from_config" / "scores.npy"), np.load(tmp_path / "from_flags" / "scores.npy"))
    assert json.loads((tmp_path / "from_config" / "topk.json").read_text())["top_k"] == 3  # the flag overrode the file
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli.main(["attribute", "--config", str(config), "--damping", "0.3", "--out", "x", "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "method: dtrak" in printed and "damping: 0.3" in printed and "top_k: 5" in printed


def test_a_result_users_can_keep(featurised, tmp_path):
    """Issue 38, item 10: a one-line repr, save / load back equal (arrays checked against the manifest), rows as
    records and a DataFrame, a figure, names of labelled dict data, and D-TRAK's info (entry, K, D, damping)."""
    import matplotlib

    matplotlib.use("Agg")
    from torch.utils.data import Dataset

    from wherefrom.attribution.protocol import Attribution
    from wherefrom.target import as_data

    root, model, dm, config, queries = featurised
    result = DTRAK(store=str(root / "store"), batch_size=2, query_timesteps=3).attribute(model, dm, queries)
    assert repr(result) == f"Attribution(method='dtrak', queries=2, training images={len(SUBSET)} of {dm.num_images} indices, unit={result.unit!r})"
    assert {k: result.info[k] for k in ("entries", "draws", "query_draws", "dim", "damping")} == {
        "entries": ["features/square_norm/model"], "draws": 2, "query_draws": 3, "dim": Store.open(root / "store").config("features/square_norm/model")["dim"], "damping": DTRAK.damping}
    saved = result.save(tmp_path / "kept")
    again = Attribution.load(saved)
    np.testing.assert_array_equal(again.scores, result.scores)
    torch.testing.assert_close(again.queries, result.queries, rtol=0, atol=0)
    assert (again.method, again.unit, again.names, again.info, again.split.tolist()) == (result.method, result.unit, result.names, result.info, result.split.tolist())
    np.save(saved / "scores.npy", result.scores[:1])  # a damaged array is refused against the manifest
    with pytest.raises(WherefromError, match=r"saved attribution scores.npy is \(1, 1797\) float32, not \(2, 1797\) float32 as attribution.json lists; save it again$"):
        Attribution.load(saved)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(WherefromError, match=r"exists and is not empty; pass another folder or overwrite=True$"):
        result.save(tmp_path / "mine")
    with pytest.raises(WherefromError, match=r"exists and is not empty"):  # nor another saved result, unless overwrite=True
        result.save(saved)
    Attribution.load(result.save(saved, overwrite=True))
    rows = result.records(k=3)
    idx, top = result.topk(3)
    assert len(rows) == 6 and rows[4] == {"query": 1, "rank": 2, "index": int(idx[1, 1]), "name": result.names[idx[1, 1]], "score": float(top[1, 1]), "predicted_change": None}
    frame = result.to_pandas()
    assert list(frame.columns) == ["query", "rank", "index", "name", "score", "predicted_change"] and len(frame) == 2 * len(SUBSET)
    fig = result.plot(dm.images, k=4)
    assert len(fig.axes) == 2 * 5 and fig.axes[0].get_title() == "query 0" and fig.axes[1].get_title().startswith(result.names[idx[0, 0]])

    class Labelled(Dataset):  # a user's dict items with class labels: the names are the classes
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"index": i, "image": torch.zeros(1, 8, 8), "label": 7 - i}

    assert as_data(Labelled(), "test").image_names() == ["class 7", "class 6", "class 5"]
