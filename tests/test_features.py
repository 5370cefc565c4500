"""TRAK / D-TRAK featurisation: exact per-sample gradients and projections, invariances,
DDP with 2 ranks, crash-and-resume, and clear errors on mismatched stores."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import torch
from trak.projectors import BasicProjector, CudaProjector, ProjectionType

from tests.helpers import SUBSET, TINY_UNET, check_projected_grads, run_cli
from wherefrom import cli
from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import WherefromError
from wherefrom.features import (
    FeatureConfig,
    Projection,
    default_projector,
    featurize,
    per_sample_grads,
    project_images,
    projection_seed,
)
from wherefrom.features.projection import BLOCK_SIZE
from wherefrom.model import DiffusionModel
from wherefrom.store import Store


def _model64() -> DiffusionModel:
    return DiffusionModel(unet=dict(TINY_UNET), seed=3).double().eval()


@pytest.mark.parametrize("projection", ["dense", "structured"])
@pytest.mark.parametrize("output", ["loss", "square_norm"])
def test_projected_grads_equal_autograd_loop_and_explicit_matrix(projection, output):
    index = torch.tensor([4, 0, 17])
    check_projected_grads(_model64(), DigitsDataModule(subset=SUBSET).images[index].double(), index, projection, output)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_projections_match_cpu_and_trak():
    model = _model64()
    dm = DigitsDataModule(subset=SUBSET)
    index = torch.tensor([4, 0, 17, 9])
    x0 = dm.images[index].double()
    structured = FeatureConfig(timesteps=2, proj_dim=300)
    cpu = Projection(structured, model.unet, "model").projected_grads(model.task, x0, index, "square_norm", structured.draws(model.task))
    gpu = model.unet.float().cuda()
    on_gpu = Projection(structured, gpu, "model").projected_grads(model.task, x0.float().cuda(), index, "square_norm", structured.draws(model.task))
    assert torch.allclose(on_gpu.double().cpu(), cpu, rtol=1e-3, atol=1e-4 * cpu.abs().max())  # the same matrices on both devices
    grads = per_sample_grads(gpu, model.task, x0.float().cuda(), index, "square_norm", structured.draws(model.task))
    num_params, seed = grads.shape[1], projection_seed(0, "model")
    projectors = {"basic-cuda": BasicProjector(num_params, 512, seed, ProjectionType.normal, "cuda", BLOCK_SIZE)}
    if default_projector("cuda") == "cuda":
        projectors["cuda"] = CudaProjector(num_params, 512, seed, ProjectionType.normal, "cuda", 32)
    for name, trak in projectors.items():
        dense = Projection(FeatureConfig(timesteps=2, proj_dim=512, projection="dense", projector=name), gpu, "model")
        expected = trak.project(grads, model_id=0)
        assert torch.allclose(dense.projected_grads(model.task, x0.float().cuda(), index, "square_norm", structured.draws(model.task)), expected, rtol=1e-3, atol=1e-4 * expected.abs().max())


def test_features_invariant_to_batch_size_and_order(tmp_path):
    model = _model64()
    dm = DigitsDataModule(subset=SUBSET[::-1][:20])  # listed in reverse: the split is the same set
    config = FeatureConfig(timesteps=2, strategy="random", proj_dim=64)
    arrays = []
    for batch_size in (3, 16):
        store = Store(tmp_path / f"b{batch_size}", dm.fingerprint)
        featurize(model.unet, "model", model.task, dm, store, config, batch_size)
        arrays.append(store.read_array("features/square_norm/model"))
    a, b = arrays
    assert a.dtype == np.float64 and a.shape == (dm.num_images, Projection(config, model.unet, "model").dim)
    assert np.abs(a[dm.indices]).min(axis=1).max() > 0 and not a[np.setdiff1d(np.arange(dm.num_images), dm.indices)].any()
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    # each example's features do not depend on its batch mates or position
    perm = torch.tensor([9, 22, 14, 4, 5])
    proj = Projection(config, model.unet, "model")
    got = project_images(proj, model.task, dm.images[perm], perm, config).numpy()
    np.testing.assert_allclose(got, a[perm.numpy()], rtol=1e-10, atol=1e-13)


@pytest.fixture
def runs(ddp_runs):
    """The shared tiny run in this process and with 2 DDP processes (``conftest.ddp_runs``); its TRAK
    features are in ``store``, made after epoch 1 and after training."""
    return ddp_runs


def test_callback_with_two_ddp_ranks_equals_one_process(runs):
    stores = [Store.open(runs[d] / "store") for d in (1, 2)]
    names = {"features/square_norm/model", "features/square_norm/model@epoch1"}
    assert set(stores[0].entries("array")) == set(stores[1].entries("array")) == names
    assert stores[0].has("weights/model@epoch1")
    for name in names:
        one, two = (s.read_array(name) for s in stores)
        assert one.dtype == np.float64 and one.shape[1] == stores[0].config(name)["dim"]
        assert np.array_equal(one, two) and np.abs(one[SUBSET]).sum(1).min() > 0
        assert stores[0].config(name) == stores[1].config(name)
    # the epoch-1 weights are kept for featurising queries later (lr = 0: they are the final ones)
    final = torch.load(runs[1] / "run" / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in stores[0].load_tensors("weights/model@epoch1").items():
        assert torch.equal(value, final[f"unet.{key}"])


def test_sigkill_mid_run_then_resume_is_byte_identical(runs, tmp_path):
    ckpt = runs[1] / "run" / "last.ckpt"
    args = ("featurize", "--ckpt", str(ckpt), "--projection", "dense", "--proj-dim", "1024", "--timesteps", "4", "--batch-size", "1")
    proc = run_cli(*args, "--store", str(tmp_path / "killed"), cwd=tmp_path, background=True)
    done = tmp_path / "killed" / "features" / "square_norm" / "model.done.npy"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.is_file() and np.load(done, mmap_mode="r")[SUBSET].sum() >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= np.load(done)[SUBSET].sum() < len(SUBSET), "the kill must land mid-run"

    cli.main([*args, "--store", str(tmp_path / "killed")])  # resume
    cli.main([*args, "--store", str(tmp_path / "clean")])  # an uninterrupted run
    for suffix in (".npy", ".done.npy"):
        clean = (tmp_path / "clean" / "features" / "square_norm" / f"model{suffix}").read_bytes()
        assert clean == (tmp_path / "killed" / "features" / "square_norm" / f"model{suffix}").read_bytes()
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("clean", "killed")]
    assert manifests[0] == manifests[1]


def _cli_error(capsys, *args: str) -> str:
    """Run the CLI in this process; it must exit with status 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_mismatched_store_and_bad_input_fail_clearly(runs, tmp_path, capsys):
    ckpt, store = str(runs[1] / "run" / "last.ckpt"), str(tmp_path / "store")
    args = ("featurize", "--ckpt", ckpt, "--store", store, "--timesteps", "1", "--batch-size", "8")
    cli.main([*args, "--proj-dim", "64"])
    before = Store.open(store).read_array("features/square_norm/model").copy()
    err = _cli_error(capsys, *args, "--proj-dim", "32")
    assert "config.proj_dim 64 (stored) vs 32" in err and "--overwrite" in err
    # same config: nothing to recompute, the stored bytes are kept
    cli.main([*args, "--proj-dim", "64"])
    assert np.array_equal(Store.open(store).read_array("features/square_norm/model"), before)
    # the callback's store holds features of other weights (fp64): the scorer refuses them
    np.save(tmp_path / "queries.npy", DigitsDataModule().images[:2].numpy())
    err = _cli_error(capsys, "attribute", "--ckpt", ckpt, "--method", "dtrak", "--store", str(runs[1] / "store"),
                     "--queries", str(tmp_path / "queries.npy"), "--out", str(tmp_path / "att"))
    assert "other weights" in err
    assert "timesteps K must be >= 1" in _cli_error(capsys, *args, "--timesteps", "0")
    with pytest.raises(WherefromError, match="structured projection needs groups=1"):
        Projection(FeatureConfig(), torch.nn.Conv2d(4, 4, 3, groups=2), "model")


@pytest.mark.parametrize("allocation", ["uniform", "proportional"])
def test_structured_projection_at_full_dimensions_preserves_inner_products_exactly(allocation):
    """With every layer at full dimensions (k = n) the scaled orthonormal factors are
    rotations: feature inner products equal the unprojected gradients' inner products
    over the covered (Linear/Conv2d) parameters, whatever the allocation."""
    model = _model64()
    config = FeatureConfig(output="square_norm", timesteps=2, strategy="random", proj_dim=10**7, allocation=allocation)
    proj = Projection(config, model.unet, "model")
    assert all(layer.p_in.shape[0] == layer.p_in.shape[1] and layer.p_out.shape[0] == layer.p_out.shape[1] for layer in proj.layers)
    index = torch.tensor([4, 0, 17])
    x0 = DigitsDataModule(subset=SUBSET).images[index].double()
    draws = config.draws(model.task)
    grads = per_sample_grads(model.unet, model.task, x0, index, config.output, draws)
    covered = torch.zeros(proj.num_params, dtype=torch.bool)
    for layer in proj.layers:
        covered[layer.weight] = True
        covered[layer.bias] = True
    assert 0 < int((~covered).sum())  # GroupNorm affines are outside the projection
    exact = grads[:, covered] @ grads[:, covered].T
    feats = proj.projected_grads(model.task, x0, index, config.output, draws)
    torch.testing.assert_close(feats @ feats.T, exact, rtol=1e-10, atol=1e-12 * float(exact.abs().max()))


def test_structured_allocation_follows_the_budget():
    """uniform: D / L per layer; proportional: each layer's share of the parameters; never above D."""
    unet = _model64().unet
    for allocation in ("uniform", "proportional"):
        proj = Projection(FeatureConfig(proj_dim=400, allocation=allocation), unet, "model")
        dims = [layer.dim for layer in proj.layers]
        assert proj.dim == sum(dims) <= 400
        if allocation == "uniform":
            assert max(dims) <= 400 // len(dims)
        else:
            sizes = [layer.p_in.shape[0] * layer.p_out.shape[0] for layer in proj.layers]
            assert dims[int(np.argmax(sizes))] == max(dims)
    with pytest.raises(WherefromError, match="allocation must be one of"):
        FeatureConfig(allocation="bogus")
    with pytest.raises(WherefromError, match="older wherefrom"):
        FeatureConfig.from_dict({k: v for k, v in FeatureConfig().to_dict().items() if k != "allocation"})
