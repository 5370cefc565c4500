"""The capture callbacks drop into an ordinary Lightning pipeline unchanged.

The pipeline below is written without wherefrom's module or datamodule: a LightningModule
around a diffusers ``UNet2DModel`` + ``DDPMScheduler`` and a plain DataLoader of
``{"index", "image"}`` dicts. Attaching ``TRAKFeatures`` and ``KFACFactors`` is the only
change; on 1 and 2 DDP ranks the one store they fill (D-TRAK and TRAK features, factors, stored
influence) equals the wherefrom-module path,
and each missing requirement fails before the first training step with one line.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch.utils.data import DataLoader, Dataset

from tests.conftest import TINY_UNET
from wherefrom.attribution.features import featurize
from wherefrom.attribution.gradients import FeatureConfig
from wherefrom.attribution.kfac import FactorConfig, fit_factors
from wherefrom.attribution.kfac.stored import InfluenceConfig, featurize_influence
from wherefrom.attribution.store import Store
from wherefrom.callbacks import KFACFactors, TRAKFeatures
from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import WherefromError
from wherefrom.task import DiffusionTask

SUBSET = list(range(3, 27))
PIPELINE = '''
import sys
import lightning as L
import torch
from diffusers import DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from wherefrom.callbacks import KFACFactors, TRAKFeatures  # the only wherefrom import


class Denoiser(L.LightningModule):
    def __init__(self, unet_config):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.unet = UNet2DModel(**unet_config)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)

    def training_step(self, batch, batch_idx):
        x0 = batch["image"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),))
        return F.mse_loss(self.unet(self.noise_scheduler.add_noise(x0, noise, t), t).sample, noise)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: the weights stay those of the reference


class Digits(Dataset):
    def __init__(self, indices):
        self.images = torch.from_numpy(load_digits().images[:, None]).double() / 8 - 1
        self.indices = indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return {"index": self.indices[i], "image": self.images[self.indices[i]]}


if __name__ == "__main__":
    root, devices = sys.argv[1], int(sys.argv[2])
    callbacks = [  # one store for every method
        TRAKFeatures(f"{root}/store", timesteps=3, proj_dim=64, batch_size=5),
        TRAKFeatures(f"{root}/store", method="trak", timesteps=3, proj_dim=64, batch_size=5),
        KFACFactors(f"{root}/store", passes=2, ekfac=True, features=True, dim=120, residual_dim=40, timesteps=3, batch_size=5),
    ]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=callbacks)
    trainer.fit(Denoiser(UNET), DataLoader(Digits(SUBSET), batch_size=8, shuffle=True))
    trainer.save_checkpoint(f"{root}/last.ckpt")
'''


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory):
    """The ordinary pipeline's stores after a fit on 1 and on 2 DDP ranks."""
    root = tmp_path_factory.mktemp("ordinary")
    script = root / "pipeline.py"
    script.write_text(textwrap.dedent(PIPELINE).replace("(SUBSET)", f"({SUBSET})").replace("(UNET)", f"({TINY_UNET!r})"))
    stores = {}
    for devices in (1, 2):  # cwd root: `pipeline` is importable by the commands run there
        out = root / f"ranks{devices}"
        r = subprocess.run([sys.executable, str(script), str(out), str(devices)], capture_output=True, text=True, cwd=root, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        stores[devices] = Store.open(out / "store")
    return root, stores


def reference(store: Store, tmp_path) -> Store:
    """The same statistics through wherefrom's own path: the store's saved weights, DigitsDataModule,
    featurize (both outputs), fit_factors and featurize_influence."""
    net = UNet2DModel(**TINY_UNET).double()
    net.load_state_dict(store.load_tensors("weights/model"))
    dm = DigitsDataModule(subset=SUBSET)
    ref = Store(tmp_path / "ref", dm.fingerprint)
    task = DiffusionTask()
    for output in ("square_norm", "loss"):
        featurize(net, "model", task, dm, ref, FeatureConfig.from_dict(store.config(f"features/{output}/model")), batch_size=5)
    fit_factors(net, "model", task, dm, np.asarray(SUBSET), ref, FactorConfig(passes=2, ekfac=True), batch_size=5)
    featurize_influence(net, "model", task, dm, np.asarray(SUBSET), ref, InfluenceConfig.from_dict(store.config("influence/model")), batch_size=5)
    return ref


def test_callbacks_in_an_ordinary_pipeline_equal_the_wherefrom_path(ordinary, tmp_path):
    """D-TRAK and TRAK features, factors with EK-FAC and stored influence side by side in one store,
    filled in one fit, on 1 and 2 DDP ranks alike and equal to wherefrom's own path."""
    _, stores = ordinary
    ref = reference(stores[1], tmp_path)
    for devices, store in stores.items():
        assert set(store.entries()) == set(ref.entries()) | {"weights/model"}
        for name in ("features/square_norm/model", "features/loss/model", "influence/model"):
            got, want = store.read_array(name)[SUBSET], ref.read_array(name)[SUBSET]
            assert store.read_array(name).shape == (max(SUBSET) + 1, want.shape[1])  # the DataLoader's global indices 0..26
            # float64, the same batches and seeded draws: equal up to summation order across ranks (influence
            # rows: coordinates in the eigenbases of factors summed in another order, signs made canonical)
            tol = 1e-7 if name.startswith("influence") else 1e-10
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=f"{name}, {devices} ranks")
        for name in ("factors/model", "ekfac/model"):
            mine, theirs = store.load_tensors(name), ref.load_tensors(name)  # (eigen/ is derived from factors/)
            assert mine.keys() == theirs.keys() and store.has("eigen/model")
            for key in mine:  # sums over the same per-example terms, in another order on 2 ranks
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-9, atol=1e-10 * float(theirs[key].abs().max()) + 1e-300)


def test_commands_and_api_read_the_ordinary_pipelines_own_checkpoint(ordinary, tmp_path, monkeypatch):
    """`featurize` and `attribute` read the user's checkpoint given its classes; the features equal the
    callback's (float32 here, float64 there), and the command's scores equal the Python API's."""
    from tests.trak_helpers import run_cli
    from wherefrom import DTRAK
    from wherefrom.checkpoint import load_module

    root, stores = ordinary
    run = ["--ckpt", str(root / "ranks1" / "last.ckpt"), "--model.class_path", "pipeline.Denoiser",
           "--data.class_path", "pipeline.Digits", "--data.init_args", f"{{indices: {SUBSET}}}"]  # fmt: skip
    r = run_cli("featurize", *run, "--out", str(tmp_path / "store"), "--timesteps", "3", "--proj-dim", "64", "--batch-size", "5", cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = Store.open(tmp_path / "store").read_array("features/square_norm/model"), stores[1].read_array("features/square_norm/model")
    np.testing.assert_allclose(got[SUBSET], want[SUBSET], rtol=1e-4, atol=1e-5 * np.abs(want).max())
    queries = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.save(tmp_path / "queries.npy", queries.numpy())
    r = run_cli("attribute", *run, "--method", "dtrak", "--store", str(tmp_path / "store"), "--queries", str(tmp_path / "queries.npy"),
                "--out", str(tmp_path / "scores"), cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    monkeypatch.syspath_prepend(str(root))
    from pipeline import Digits

    module = load_module(root / "ranks1" / "last.ckpt", "pipeline.Denoiser")  # the user's own class, not a wherefrom module
    api = DTRAK(store=str(tmp_path / "store")).attribute(module, DataLoader(Digits(SUBSET)), queries)
    np.testing.assert_allclose(np.load(tmp_path / "scores" / "scores.npy"), api.scores, rtol=1e-6, atol=1e-7 * np.abs(api.scores).max())
    # without the class, the command says which flag to pass
    r = run_cli("featurize", "--ckpt", str(root / "ranks1" / "last.ckpt"), "--out", str(tmp_path / "s2"), cwd=root)
    assert r.returncode == 2 and "pass --model.class_path" in r.stderr and r.stderr.count("\n") == 1


class _Items(Dataset):
    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.item(i)


class _Module(L.LightningModule):
    """Fails its first training step: a callback error seen instead proves the check came first."""

    def __init__(self, unets=1, prediction_type="epsilon"):
        super().__init__()
        self.nets = torch.nn.ModuleList([UNet2DModel(**TINY_UNET) for _ in range(unets)])
        self.noise_scheduler = DDPMScheduler(prediction_type=prediction_type)

    def training_step(self, batch, batch_idx):
        raise AssertionError("the first training step ran before the callback's check")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(module, callback, item=lambda i: {"index": i, "image": torch.zeros(1, 8, 8)}):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(module, DataLoader(_Items(item), batch_size=2))


@pytest.mark.parametrize("make", [lambda p: TRAKFeatures(str(p)), lambda p: KFACFactors(str(p))], ids=["TRAKFeatures", "KFACFactors"])
def test_missing_requirements_fail_before_the_first_step_with_one_line(make, tmp_path):
    name = type(make(tmp_path)).__name__
    cases = [
        (_Module(unets=2), None, rf"{name} needs the module's diffusers UNet .*found 2 \(nets.0, nets.1\); pass {name}\(denoiser=...\)"),
        (_Module(prediction_type="v_prediction"), None, rf"{name}: DDPMScheduler has prediction_type='v_prediction'.*pass {name}\(task="),
        (_Module(), lambda i: {"index": i, "pixels": torch.zeros(1, 8, 8)}, rf"{name}: the training items are dicts without an 'image' key"),
        (_Module(), lambda i: {"index": 0, "image": torch.zeros(1, 8, 8)}, rf"{name}: the training items' 'index' values must be distinct"),
    ]
    for module, item, message in cases:
        with pytest.raises(WherefromError, match=message) as err:
            _fit(module, make(tmp_path / "store"), *([item] if item else []))
        assert "\n" not in str(err.value)
    # a store made for other data names the callback's own arguments, not CLI flags
    Store(tmp_path / "other", "another-fingerprint")
    with pytest.raises(WherefromError, match=rf"pass {name}\(overwrite=True\)"):
        _fit(_Module(), make(tmp_path / "other"))


def test_state_key_is_the_resolved_store_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cls in (TRAKFeatures, KFACFactors):
        assert cls("store").state_key == cls(str(tmp_path / "sub" / ".." / "store")).state_key == cls(str(tmp_path / "store")).state_key
        assert cls("store").state_key != cls("other").state_key
    assert TRAKFeatures("store", method="trak").state_key != TRAKFeatures("store", method="dtrak").state_key


def test_explicit_denoiser_and_task(tmp_path):
    """``denoiser=`` picks one of two UNets; ``task=`` replaces a scheduler it cannot honour."""
    from wherefrom.target import resolve_target

    module = _Module(unets=2, prediction_type="v_prediction")
    target = resolve_target(module, "TRAKFeatures", denoiser="nets.1", task=DiffusionTask(num_train_timesteps=50, measure_time=5))
    assert target.networks["model"] is module.nets[1] and target.task.num_train_timesteps == 50
    with pytest.raises(WherefromError, match=r"TRAKFeatures\(denoiser='nets.7'\)"):
        resolve_target(module, "TRAKFeatures", denoiser="nets.7")


def test_one_store_for_every_method_refuses_a_conflicting_entry_before_training(tmp_path):
    """Another method's entries are no conflict (the check passes and the first step runs); an entry of the
    same name made with another config is refused before the first step, without suggesting to replace
    anything but that entry."""
    from wherefrom.attribution.kfac.stored import InfluenceConfig
    from wherefrom.errors import FingerprintMismatchError
    from wherefrom.target import as_data

    data = as_data(DataLoader(_Items(lambda i: {"index": i, "image": torch.zeros(1, 8, 8)}), batch_size=2), "test")
    store = Store(tmp_path / "store", data.fingerprint)
    store.array("features/square_norm/model", (4, 2), {**FeatureConfig(timesteps=2).to_dict(), "model_id": "model"})
    store.array("influence/model", (4, 2), {**InfluenceConfig(dim=32).to_dict(), "model_id": "model"})
    for fine in (TRAKFeatures(str(store.root), method="trak"), TRAKFeatures(str(store.root), timesteps=2), KFACFactors(str(store.root))):
        with pytest.raises(AssertionError, match="the first training step ran"):
            _fit(_Module(), fine)
    cases = [
        (TRAKFeatures(str(store.root), timesteps=3), r"features/square_norm/model made with another config \(timesteps 2 \(stored\) vs 3\)", "TRAKFeatures"),
        (KFACFactors(str(store.root), features=True, dim=64), r"influence/model made with another config \(dim 32 \(stored\) vs 64\)", "KFACFactors"),
    ]
    for callback, message, owner in cases:
        with pytest.raises(FingerprintMismatchError, match=message) as err:
            _fit(_Module(), callback)
        assert str(err.value).endswith(f"pass {owner}(overwrite=True) to recompute that entry (only it)") and "\n" not in str(err.value)
    assert set(Store.open(store.root).entries()) == {"features/square_norm/model", "influence/model"}  # nothing was touched
