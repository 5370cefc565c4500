"""The capture callbacks drop into an ordinary Lightning pipeline unchanged.

The pipeline below is written without wherefrom's module or datamodule: a LightningModule
around a diffusers ``UNet2DModel`` + ``DDPMScheduler`` and a plain DataLoader of
``{"index", "image"}`` dicts. Attaching ``TRAKFeatures`` and ``KFACFactors`` is the only
change; on 1 and 2 DDP ranks the one store they fill (D-TRAK and TRAK features, factors, stored
influence) equals the wherefrom-module path,
and each missing requirement fails before the first training step with one line.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from torch.utils.data import DataLoader, Dataset

from tests.helpers import TINY_UNET, MinSNR
from wherefrom.callbacks import KFACFactors, TRAKFeatures
from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import FingerprintMismatchError, WherefromError
from wherefrom.features import FeatureConfig, featurize
from wherefrom.io import weights_hash
from wherefrom.kfac import FactorConfig, fit_factors
from wherefrom.kfac.stored import InfluenceConfig, featurize_influence
from wherefrom.store import Store
from wherefrom.task import DiffusionTask

SUBSET = list(range(3, 27))
PIPELINE = '''
import sys
import lightning as L
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from sklearn.datasets import load_digits
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from wherefrom.callbacks import KFACFactors, TRAKFeatures  # the only wherefrom import


class Denoiser(L.LightningModule):
    def __init__(self, unet_config: dict):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.unet = UNet2DModel(**unet_config)
        self.noise_scheduler = SCHEDULER

    def training_step(self, batch, batch_idx):
        x0 = batch["image"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),))
        if isinstance(self.noise_scheduler, FlowMatchEulerDiscreteScheduler):  # rectified flow
            s = self.noise_scheduler.sigmas[t].view(-1, 1, 1, 1)
            return F.mse_loss(self.unet((1 - s) * x0 + s * noise, self.noise_scheduler.timesteps[t]).sample, noise - x0)
        target = noise if self.noise_scheduler.config.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, t)
        return F.mse_loss(self.unet(self.noise_scheduler.add_noise(x0, noise, t), t).sample, target)

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
        KFACFactors(f"{root}/store", passes=2, ekfac=True, features=True, dim=120, residual_dim=40, timesteps=3, features_dtype="float64", batch_size=5),
    ]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=callbacks)
    trainer.fit(Denoiser(UNET), DataLoader(Digits(SUBSET), batch_size=8, shuffle=True))
    trainer.save_checkpoint(f"{root}/last.ckpt")
'''


# the user's diffusers scheduler, as they construct it: epsilon, v-prediction, rectified flow
SCHEDULERS = {
    "epsilon": ("DDPMScheduler(num_train_timesteps=1000)", lambda: DDPMScheduler(num_train_timesteps=1000)),
    "v_prediction": (
        "DDPMScheduler(num_train_timesteps=1000, prediction_type='v_prediction', beta_schedule='squaredcos_cap_v2')",
        lambda: DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"),
    ),
    "flow_matching": ("FlowMatchEulerDiscreteScheduler(shift=3.0)", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)),
}


@pytest.fixture(scope="module", params=list(SCHEDULERS))
def ordinary(request, tmp_path_factory):
    """The ordinary pipeline's stores after a fit on 1 and on 2 DDP ranks, under each objective; and its scheduler."""
    root = tmp_path_factory.mktemp(f"ordinary_{request.param}")
    script = root / "pipeline.py"
    text = textwrap.dedent(PIPELINE).replace("(SUBSET)", f"({SUBSET})").replace("(UNET)", f"({TINY_UNET!r})")
    script.write_text(text.replace("SCHEDULER", SCHEDULERS[request.param][0]))
    stores = {}
    for devices in (1, 2):  # cwd root: `pipeline` is importable by the commands run there
        out = root / f"ranks{devices}"
        if devices == 1:  # the script as `python pipeline.py`, in this process
            argv = sys.argv
            sys.argv = [str(script), str(out), "1"]
            try:
                runpy.run_path(str(script), run_name="__main__")
            finally:
                sys.argv = argv
        else:  # DDP relaunches the script for rank 1: a process of its own
            r = subprocess.run([sys.executable, str(script), str(out), str(devices)], capture_output=True, text=True, cwd=root)
            assert r.returncode == 0, r.stderr[-3000:]
        stores[devices] = Store.open(out / "store")
    return root, stores, request.param


def reference(store: Store, tmp_path, objective: str) -> Store:
    """The same statistics through wherefrom's own path: the store's saved weights, DigitsDataModule,
    featurize (both outputs), fit_factors and featurize_influence, under the pipeline scheduler's objective."""
    net = UNet2DModel(**TINY_UNET).double()
    net.load_state_dict(store.load_tensors("weights/model"))
    dm = DigitsDataModule(subset=SUBSET)
    ref = Store(tmp_path / "ref", dm.fingerprint)
    task = DiffusionTask.from_scheduler(SCHEDULERS[objective][1]())
    for output in ("square_norm", "loss"):
        featurize(net, "model", task, dm, ref, FeatureConfig.from_dict(store.config(f"features/{output}/model")), batch_size=5)
    fit_factors(net, "model", task, dm, np.asarray(SUBSET), ref, FactorConfig(passes=2, ekfac=True), batch_size=5)
    featurize_influence(net, "model", task, dm, np.asarray(SUBSET), ref, InfluenceConfig.from_dict(store.config("influence/model")), batch_size=5)
    return ref


def test_callbacks_in_an_ordinary_pipeline_equal_the_wherefrom_path(ordinary, tmp_path):
    """D-TRAK and TRAK features, factors with EK-FAC and stored influence side by side in one store,
    filled in one fit, on 1 and 2 DDP ranks alike and equal to wherefrom's own path, for a user's
    epsilon, v-prediction and rectified-flow modules alike."""
    _, stores, objective = ordinary
    ref = reference(stores[1], tmp_path, objective)
    for devices, store in stores.items():
        assert set(store.entries()) == set(ref.entries()) | {"weights/model"}
        for name in ("features/square_norm/model", "features/loss/model", "influence/model"):
            got, want = store.read_array(name)[SUBSET], ref.read_array(name)[SUBSET]
            assert store.read_array(name).shape == (max(SUBSET) + 1, want.shape[1])  # the DataLoader's global indices 0..26
            # float64, the same batches and seeded draws: equal up to summation order across ranks (influence
            # rows: coordinates in the eigenbases of factors summed in another order, signs made canonical)
            tol = 1e-7 if name.startswith("influence") else 1e-10
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=f"{name}, {devices} ranks")
        # the callback measured the stored rows' fidelity on rank 0 and recorded it, alike on 1 and 2 ranks
        fidelity = store.manifest["entries"]["influence/model"]["fidelity"]
        first = stores[1].manifest["entries"]["influence/model"]["fidelity"]
        assert fidelity["train"] == len(SUBSET) and -1 <= fidelity["spearman"] <= 1
        np.testing.assert_allclose([fidelity["pearson"], fidelity["spearman"]], [first["pearson"], first["spearman"]], rtol=1e-6)
        for name in ("factors/model", "ekfac/model"):
            mine, theirs = store.load_tensors(name), ref.load_tensors(name)  # (eigen/ is derived from factors/)
            assert mine.keys() == theirs.keys() and store.has("eigen/model")
            for key in mine:  # sums over the same per-example terms, in another order on 2 ranks
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-9, atol=1e-10 * float(theirs[key].abs().max()) + 1e-300)


def test_commands_and_api_read_the_ordinary_pipelines_own_checkpoint(ordinary, tmp_path, monkeypatch, capsys):
    """`featurize` and `attribute` read the user's checkpoint given its classes; the features equal the
    callback's (float32 here, float64 there), and the command's scores equal the Python API's."""
    from tests.helpers import cli
    from wherefrom import DTRAK
    from wherefrom.checkpoint import load_module

    root, stores, _ = ordinary
    monkeypatch.delitem(sys.modules, "pipeline", raising=False)  # this objective's pipeline, not another's imported before
    monkeypatch.chdir(root)  # `pipeline` is importable from the working directory, as for a user
    monkeypatch.syspath_prepend(str(root))
    run = ["--ckpt", str(root / "ranks1" / "last.ckpt"), "--model.class_path", "pipeline.Denoiser",
           "--data.class_path", "pipeline.Digits", "--data.init_args", f"{{indices: {SUBSET}}}"]  # fmt: skip
    code, err = cli(capsys, "featurize", *run, "--store", str(tmp_path / "store"), "--timesteps", "3", "--proj-dim", "64", "--batch-size", "5")
    assert code == 0, err[-2000:]
    got, want = Store.open(tmp_path / "store").read_array("features/square_norm/model"), stores[1].read_array("features/square_norm/model")
    np.testing.assert_allclose(got[SUBSET], want[SUBSET], rtol=1e-4, atol=1e-5 * np.abs(want).max())
    queries = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.save(tmp_path / "queries.npy", queries.numpy())
    code, err = cli(capsys, "attribute", *run, "--method", "dtrak", "--store", str(tmp_path / "store"), "--queries", str(tmp_path / "queries.npy"),
                    "--out", str(tmp_path / "scores"))  # fmt: skip
    assert code == 0, err[-2000:]
    from pipeline import Digits

    module = load_module(root / "ranks1" / "last.ckpt", "pipeline.Denoiser")  # the user's own class, not a wherefrom module
    api = DTRAK(store=str(tmp_path / "store")).attribute(module, DataLoader(Digits(SUBSET)), queries)
    np.testing.assert_allclose(np.load(tmp_path / "scores" / "scores.npy"), api.scores, rtol=1e-6, atol=1e-7 * np.abs(api.scores).max())
    # without the class, the command says which flag to pass
    code, err = cli(capsys, "featurize", "--ckpt", str(root / "ranks1" / "last.ckpt"), "--store", str(tmp_path / "s2"))
    assert code == 2 and "pass --model.class_path" in err and err.count("\n") == 1, err


class _Items(Dataset):
    def __init__(self, item, n=4):
        self.item, self.n = item, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item(i)


class _Module(L.LightningModule):
    """Fails its first training step: a callback error seen instead proves the check came first."""

    def __init__(self, unets=1, **scheduler):
        super().__init__()
        self.nets = torch.nn.ModuleList([UNet2DModel(**TINY_UNET) for _ in range(unets)])
        self.noise_scheduler = DDPMScheduler(**scheduler)

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
        (_Module(thresholding=True), None, rf"{name}: DDPMScheduler has thresholding=True; wherefrom models thresholding=False only; give the module a DiffusionTask with your own Objective$"),
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
    """``denoiser=`` picks one of two UNets; ``task=`` replaces the scheduler's schedule."""
    from wherefrom.target import resolve_target

    module = _Module(unets=2)
    target = resolve_target(module, "TRAKFeatures", denoiser="nets.1", task=DiffusionTask(num_train_timesteps=50, measure_time=5))
    assert target.networks["model"] is module.nets[1] and target.task.num_train_timesteps == 50
    with pytest.raises(WherefromError, match=r"TRAKFeatures\(denoiser='nets.7'\)"):
        resolve_target(module, "TRAKFeatures", denoiser="nets.7")


def test_one_store_for_every_method_refuses_a_conflicting_entry_before_training(tmp_path):
    """Another method's entries are no conflict (the check passes and the first step runs); an entry of the
    same name made with another config is refused before the first step, without suggesting to replace
    anything but that entry."""
    from wherefrom.kfac.stored import InfluenceConfig
    from wherefrom.target import as_data

    data = as_data(DataLoader(_Items(lambda i: {"index": i, "image": torch.zeros(1, 8, 8)}), batch_size=2), "test")
    store = Store(tmp_path / "store", data.fingerprint)
    module = _Module()
    weights = {"model_id": "model", "weights": weights_hash(module.nets[0])}  # made from this module's weights
    store.array("features/square_norm/model", (4, 2), {**FeatureConfig(timesteps=2).to_dict(), **weights})
    store.array("influence/model", (4, 2), {**InfluenceConfig(dim=32).to_dict(), **weights})
    for fine in (TRAKFeatures(str(store.root), method="trak"), TRAKFeatures(str(store.root), timesteps=2), KFACFactors(str(store.root))):
        with pytest.raises(AssertionError, match="the first training step ran"):
            _fit(module, fine)
    cases = [
        (TRAKFeatures(str(store.root), timesteps=3), r"features/square_norm/model made with another config \(timesteps 2 \(stored\) vs 3\)", "TRAKFeatures"),
        (KFACFactors(str(store.root), features=True, dim=64), r"influence/model made with another config \(dim 32 \(stored\) vs 64\)", "KFACFactors"),
    ]
    for callback, message, owner in cases:
        with pytest.raises(FingerprintMismatchError, match=message) as err:
            _fit(module, callback)
        assert str(err.value).endswith(f"pass {owner}(overwrite=True) to recompute that entry (only it)") and "\n" not in str(err.value)
    assert set(Store.open(store.root).entries()) == {"features/square_norm/model", "influence/model"}  # nothing was touched


# --- a user's pipeline in every form (issue 20): each case reproduces the user's exact situation first ---------------


def _digits(n: int = 16) -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images[:n, None]).float() / 8 - 1


def _x0(batch):
    """A user's training step reads its images from whatever its DataLoader yields."""
    return batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch


class _Trainable(L.LightningModule):
    """An ordinary module that trains on dicts, ``(image, label)`` tuples or bare tensors alike, with
    noise seeded per batch (the same steps whatever the form); lr 0 keeps the seeded weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.unet = UNet2DModel(**TINY_UNET)
        self.noise_scheduler = DDPMScheduler()

    def training_step(self, batch, batch_idx):
        x0 = _x0(batch)
        g = torch.Generator().manual_seed(batch_idx)
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (len(x0),), generator=g)
        return torch.nn.functional.mse_loss(self.unet(self.noise_scheduler.add_noise(x0, noise, t), t).sample, noise)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


FORMS = {
    "dicts": lambda x, i: {"index": i, "image": x[i]},
    "tuples": lambda x, i: (x[i], i % 10),
    "tensors": lambda x, i: x[i],
}


def test_kfac_during_training_reads_every_batch_form(tmp_path):
    """`KFACFactors(mode="during")` crashed at the first tuple or tensor batch (``batch["image"]``); now the three
    forms give the same factors, from the same training steps."""
    images = _digits()
    factors = {}
    for form, item in FORMS.items():
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[KFACFactors(str(tmp_path / form), mode="during")])  # fmt: skip
        trainer.fit(_Trainable(), DataLoader(_Items(lambda i, item=item: item(images, i), n=16), batch_size=8))
        factors[form] = Store.open(tmp_path / form).load_tensors("factors/model")
    for form in ("tuples", "tensors"):
        assert factors[form].keys() == factors["dicts"].keys()
        for key, value in factors["dicts"].items():  # the same float32 operations in the same order
            torch.testing.assert_close(factors[form][key], value, rtol=0, atol=0, msg=f"{form}: {key}")
    assert any(v.abs().sum() > 0 for k, v in factors["dicts"].items() if not k.endswith("_count"))


def test_a_task_that_contradicts_the_modules_scheduler_is_refused(tmp_path):
    """A built-in task cannot stand in for what the module's scheduler says (v-prediction scored with the epsilon
    loss), nor for a scheduler no built-in models; an own objective is the user's word and is taken."""
    from wherefrom import DTRAK

    for make in (TRAKFeatures, KFACFactors):
        with pytest.raises(WherefromError, match=r"the module's DDPMScheduler trains DDPMObjective\(prediction_type='v_prediction'\) "
                                                 r"but the task given is DDPMObjective\(prediction_type='epsilon'\); drop the task or make it match$") as err:
            _fit(_Module(prediction_type="v_prediction"), make(str(tmp_path / "store"), task=DiffusionTask()))
        assert "\n" not in str(err.value)
        with pytest.raises(WherefromError, match=r"thresholding=True.*; a built-in objective cannot stand in for it$"):
            _fit(_Module(thresholding=True), make(str(tmp_path / "store"), task=DiffusionTask()))
        with pytest.raises(AssertionError, match="the first training step ran"):  # past every check: an own objective is taken
            _fit(_Module(thresholding=True), make(str(tmp_path / "own"), task=DiffusionTask(objective=MinSNR())))
    with pytest.raises(WherefromError, match=r"^DTRAK: DDPMScheduler has thresholding=True"):
        DTRAK(store=str(tmp_path / "store")).attribute(_Module(thresholding=True), DataLoader(_Items(lambda i: {"index": i, "image": torch.zeros(1, 8, 8)})), torch.zeros(1, 1, 8, 8))
    assert not (tmp_path / "store").exists()


def test_a_subset_keeps_its_parents_indices_and_says_so(tmp_path):
    """``Subset(data, range(100, 110))`` of items without "index" was featurised as indices 0..9; now as 100..109,
    with one warning at setup that positions (in the parent) are used."""
    from torch.utils.data import Subset, TensorDataset

    from wherefrom.target import as_data

    images = torch.rand(120, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    subset = Subset(Subset(TensorDataset(images), range(50, 120)), range(50, 60))  # nested: 100..109 of the root
    with pytest.warns(UserWarning) as record:
        view = as_data(DataLoader(subset), "TRAKFeatures")
    said = [str(w.message) for w in record if "carry no 'index'" in str(w.message)]
    assert said == ["TRAKFeatures: 10 training items carry no 'index'; their positions in the TensorDataset the Subset selects from "
                    "are used as their global indices (yield {'index', 'image'} items to choose them)"]  # fmt: skip
    assert view.indices.tolist() == list(range(100, 110)) and view.num_images == 110
    assert torch.equal(view.images[100:110], images[100:110]) and not view.images[:100].any()
    # a callback in a fit on that Subset writes the rows of 100..109
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[TRAKFeatures(str(tmp_path / "store"), timesteps=1, proj_dim=8)])  # fmt: skip
    trainer.fit(_Trainable(), DataLoader(subset, batch_size=5))
    rows = Store.open(tmp_path / "store").read_array("features/square_norm/model")
    assert rows.shape[0] == 110 and np.abs(rows[100:]).min(1).all() and not rows[:100].any()


@pytest.mark.parametrize("name", ["random", "pixel", "trak", "dtrak", "kfac", "ekfac", "ablation", "ablation-loss"])
def test_every_attributor_checks_its_queries_as_the_cli_does(name, tmp_path):
    """Bad queries returned scores silently or raised raw conv / AttributeError tracebacks; now each gets the
    CLI's one line, before any store or network is touched."""
    from wherefrom.attribution.api import ATTRIBUTORS, attributor

    method = attributor(name, **({"store": str(tmp_path / "none")} if "store" in ATTRIBUTORS[name].__dataclass_fields__ else {}))
    loader = DataLoader(_Items(lambda i: {"index": i, "image": torch.zeros(1, 8, 8)}))
    good = torch.zeros(6, 1, 8, 8)
    nan = good.clone()
    nan[4, 0, 1, 1] = float("nan")
    cases = [
        (torch.zeros(6, 1, 16, 16), r" have shape \(1, 16, 16\) but the training images are \(1, 8, 8\)$"),
        (good + 8, r": float images must be in \[-1, 1\], found \[8, 8\]; rescale"),
        (torch.zeros(6, 3, 8, 8), r" have shape \(3, 8, 8\)"),
        (nan, r": 1 of 6 images hold NaN \(e.g. image 4\)"),
        (torch.zeros(6, 8, 8, 1), r": images need 1 or 3 channels in dim 1, got shape \(6, 8, 8, 1\) \(channels-last\?"),
    ]
    owner = type(method).__name__
    for queries, message in cases:
        for form in (queries, queries.numpy()):
            with pytest.raises(WherefromError, match=rf"^{owner} queries{message}") as err:
                method.attribute(_Module(), loader, form)
            assert "\n" not in str(err.value)
    assert not (tmp_path / "none").exists()


def test_queries_as_arrays_and_without_channels_score_as_the_tensor():
    """One validation for the API and the CLI: a numpy array, and ``Q x H x W`` for one-channel data, are the CLI's
    forms too; float64 queries keep their dtype."""
    from wherefrom import Pixel
    from wherefrom.target import as_data, as_queries

    loader = DataLoader(_Items(lambda i: {"index": i, "image": _digits(4)[i]}))
    queries = _digits(16)[10:13]
    want = Pixel().attribute(None, loader, queries).scores
    for form in (queries.numpy(), queries[:, 0]):
        np.testing.assert_array_equal(Pixel().attribute(None, loader, form).scores, want)
    as_uint8 = ((queries + 1) * 127.5).round().to(torch.uint8)  # read as [0, 255]
    np.testing.assert_array_equal(Pixel().attribute(None, loader, as_uint8.numpy()).scores, Pixel().attribute(None, loader, as_uint8 / 127.5 - 1).scores)
    assert as_queries(queries.double(), as_data(loader, "test"), "queries").dtype == torch.float64


def test_log_attribution_takes_the_data_the_attributors_take(tmp_path):
    """`log_attribution(loggers, result, dataset)` raised ``'dict' object has no attribute 'float'``."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from wherefrom import Pixel
    from wherefrom.attribution.report import log_attribution
    from wherefrom.target import as_data

    loader = DataLoader(_Items(lambda i: {"index": i, "image": _digits(4)[i]}))
    result = Pixel().attribute(None, loader, _digits(8)[5:7])
    logger = CSVLogger(tmp_path)
    for step, data in enumerate((loader, loader.dataset, as_data(loader, "test").images)):
        log_attribution([logger], result, data, top_k=2, step=step)
    logger.finalize("success")
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    assert [float(r["wherefrom/pixel/top1_score"]) for r in rows] == pytest.approx([float(result.topk(1)[1].mean())] * 3)


def test_a_store_of_another_model_is_refused_before_the_first_step(tmp_path):
    """A store made by another model was refused only after training (a traceback, with the weights entry already
    replaced); now one line before the first step, and nothing in the store changes. The same model finishing
    its own store (a resumed run) is no conflict."""
    store = tmp_path / "store"
    callbacks = lambda: [TRAKFeatures(str(store), timesteps=1, proj_dim=8, batch_size=2), KFACFactors(str(store), passes=1, batch_size=2)]  # noqa: E731
    for callback in callbacks():
        _fit(_Trainable(), callback)  # the first model fills the store
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    for callback in callbacks():
        with pytest.raises(FingerprintMismatchError, match=r"already holds \S+ of a run with weights \w{12}, not this model's \(\w{12}\): to capture this run, "
                                                       r"point \w+\(store=...\) at a new folder or pass \w+\(overwrite=True\) to replace that entry \(only it\); "
                                                       r"to finish an interrupted capture of that run, resume it with trainer.fit\(..., ckpt_path=...\)$") as err:  # issue 38, item 8
            _fit(_Module(), callback)  # _Module fails its first step: the refusal came before it
        assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    for callback in callbacks():  # the same weights (lr 0): the check passes and the run completes
        _fit(_Trainable(), callback)


def test_every_network_reading_attributor_takes_denoiser(tmp_path):
    """The two-UNet message said ``pass DTRAK(denoiser=...)``, which DTRAK did not take."""
    from wherefrom import DTRAK, KFAC
    from wherefrom.target import as_data, resolve_target

    module = _Module(unets=2)
    loader = DataLoader(_Items(lambda i: {"index": i, "image": _digits(4)[i]}))
    store = Store(tmp_path / "store", as_data(loader, "test").fingerprint)
    featurize(module.nets[1], "model", DiffusionTask(), as_data(loader, "test"), store, FeatureConfig(timesteps=1, proj_dim=16))
    queries = _digits(8)[5:7]
    for cls in (DTRAK, KFAC):
        with pytest.raises(WherefromError, match=rf"found 2 \(nets.0, nets.1\); pass {cls.__name__}\(denoiser=...\)$"):
            cls(store=str(tmp_path / "store")).attribute(module, loader, queries)
    got = DTRAK(store=str(tmp_path / "store"), denoiser="nets.1").attribute(module, loader, queries).scores
    want = DTRAK(store=str(tmp_path / "store")).attribute(resolve_target(module, "test", denoiser="nets.1"), loader, queries).scores
    np.testing.assert_array_equal(got, want)
    with pytest.raises(WherefromError, match=r"DTRAK\(denoiser='nets.7'\): _Module has no attribute 'nets.7'"):
        DTRAK(store=str(tmp_path / "store"), denoiser="nets.7").attribute(module, loader, queries)


# the ordinary pipeline as a user's package, with a LightningDataModule for a plain LightningCLI
USER_PACKAGE = PIPELINE.replace("SCHEDULER", SCHEDULERS["epsilon"][0]) + '''

class DigitsData(L.LightningDataModule):
    def __init__(self, n: int = 12):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return DataLoader(Digits(list(range(self.hparams.n))), batch_size=6)
'''


def test_a_plain_lightningcli_run_of_a_package_in_the_working_directory(tmp_path, monkeypatch, capsys):
    """A user's package in the working directory, trained by a plain ``LightningCLI(Denoiser, DigitsData)``: the
    `wherefrom` script imports the package from there (it said "No module named 'mypipe'"), `python -m wherefrom`
    works, the run's missing class names is one line that says why, and `sample` / `export` take ``--model.class_path``."""
    import os
    from pathlib import Path

    from lightning.pytorch.cli import LightningCLI

    from tests.helpers import cli
    from wherefrom.checkpoint import load_module
    from wherefrom.target import resolve_target

    (tmp_path / "mypipe").mkdir()
    (tmp_path / "mypipe" / "__init__.py").write_text("")
    (tmp_path / "mypipe" / "pipeline.py").write_text(USER_PACKAGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from mypipe.pipeline import Denoiser, DigitsData

    unet = "{" + ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in {**TINY_UNET, "out_channels": 1}.items()) + "}"
    LightningCLI(Denoiser, DigitsData, args=["fit", "--model.unet_config", unet, "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
                                             "--trainer.precision", "64-true", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])  # fmt: skip
    (ckpt,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    capsys.readouterr()  # the fit's own output
    code, err = cli(capsys, "sample", "--ckpt", str(ckpt), "--out", "s")  # the checkpoint holds {'_instantiator': ...} only
    assert code == 2 and err.count("\n") == 1 and "records no class, only its arguments); pass --model.class_path" in err, err
    # the console script, from the folder that holds the package (its own sys.path does not have that folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    argv = ["sample", "--ckpt", str(ckpt), "--model.class_path", "mypipe.pipeline.Denoiser", "--num-samples", "2", "--steps", "3", "--out", "s"]
    r = subprocess.run([str(Path(sys.executable).parent / "wherefrom"), *argv], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    target = resolve_target(load_module(ckpt, "mypipe.pipeline.Denoiser"), "test")
    np.testing.assert_allclose(np.load(tmp_path / "s" / "samples.npy"), target.generate(2, seed=0, steps=3).numpy(), rtol=1e-5, atol=1e-5)
    assert cli(capsys, "export", "--ckpt", str(ckpt), "--model.class_path", "mypipe.pipeline.Denoiser", "--out", "unet")[0] == 0  # the run's own UNet
    assert cli(capsys, "sample", "--ckpt", "unet", "--num-samples", "2", "--steps", "3", "--out", "s2")[0] == 0
    np.testing.assert_allclose(np.load(tmp_path / "s2" / "samples.npy"), np.load(tmp_path / "s" / "samples.npy"), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(sys, "argv", ["wherefrom", "featurize", "--ckpt", str(ckpt), "--model.class_path", "mypipe.pipeline.Denoiser",
                                      "--data.class_path", "mypipe.pipeline.DigitsData", "--store", "store", "--timesteps", "1", "--proj-dim", "8"])  # fmt: skip
    runpy.run_module("wherefrom", run_name="__main__")  # python -m wherefrom
    assert len(Store.open(tmp_path / "store").read_array("features/square_norm/model")) == 12  # every image of the saved DigitsData(n=12)


class _Conditional(L.LightningModule):
    """A user's class-conditional UNet (10 classes), trained on ``(image, label)`` tuples (``fail``: its first step fails)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.unet, self.noise_scheduler, self.fail = UNet2DModel(**TINY_UNET, num_class_embeds=10), DDPMScheduler(), fail

    def training_step(self, batch, batch_idx):
        if self.fail:
            raise AssertionError("the first training step ran before the callback's check")
        x0, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (len(x0),))
        return torch.nn.functional.mse_loss(self.unet(self.noise_scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_tuple_labels_condition_a_users_class_conditional_unet(tmp_path, caplog):
    """Issue 38, item 1: capture crashed after training (diffusers' "class_labels should be provided") because
    only dicts' "label" became conditions; now ``(image, label)`` tuples condition the UNet exactly as labelled
    dicts do, and items without labels are refused in one line before the first step."""
    images = _digits()
    forms = {"tuples": lambda i: (images[i], i % 10), "dicts": lambda i: {"index": i, "image": images[i], "label": i % 10}}
    stores = {}
    caplog.set_level("INFO")
    for form, item in forms.items():
        callbacks = [TRAKFeatures(str(tmp_path / form), timesteps=2, proj_dim=32), KFACFactors(str(tmp_path / form), passes=1)]
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks)  # fmt: skip
        trainer.fit(_Conditional(), DataLoader(_Items(item, n=8), batch_size=4))
        stores[form] = Store.open(tmp_path / form)
    np.testing.assert_array_equal(stores["tuples"].read_array("features/square_norm/model"), stores["dicts"].read_array("features/square_norm/model"))
    # issue 38, item 11: what the capture will run is said before it runs
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("TRAKFeatures: ", "KFACFactors: "))]
    assert said[:2] == [
        f"TRAKFeatures: featurising 8 training images x 2 draws (square_norm, D = 32) for 1 network(s) into {tmp_path / 'tuples'}; the first batch's time gives the time left",
        f"KFACFactors: 1 factor pass(es) over 8 training images (one seeded draw per image per pass) of 1 network(s), into {tmp_path / 'tuples'}; "
        "the first batch's time gives the time left",
    ]
    for key, value in stores["dicts"].load_tensors("factors/model").items():
        torch.testing.assert_close(stores["tuples"].load_tensors("factors/model")[key], value, rtol=0, atol=0)
    for make in (TRAKFeatures, KFACFactors):
        with pytest.raises(WherefromError, match=rf"^{make.__name__}: network 'model' is class-conditional but the training items carry no class label; "
                                                 r"yield \{'index', 'image', 'label'\} dicts or \(image, label\) tuples$"):  # fmt: skip
            _fit(_Conditional(fail=True), make(str(tmp_path / "unlabelled")), item=lambda i: {"index": i, "image": torch.zeros(1, 8, 8)})
    assert not (tmp_path / "unlabelled").exists()


def test_a_conditional_users_run_without_labels_is_one_line_from_the_command(tmp_path, capsys):
    """Issue 38, item 2: `wherefrom attribute --queries q.npy` on a user's class-conditional run without `--labels`
    raised diffusers' ValueError with a traceback; now one line naming the flag, exit 2."""
    from tests.helpers import cli

    images = _digits()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Conditional(), DataLoader(_Items(lambda i: (images[i], i % 10), n=8), batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    np.save(tmp_path / "q.npy", images[:2].numpy())
    run = ["--ckpt", str(tmp_path / "run.ckpt"), "--model.class_path", "tests.test_dropin._Conditional", "--data.class_path", "wherefrom.DigitsDataModule",
           "--data.init_args", "{subset: [0, 1, 2, 3], conditional: true}", "--queries", str(tmp_path / "q.npy")]  # fmt: skip
    code, err = cli(capsys, "attribute", *run, "--method", "pixel", "--out", str(tmp_path / "out"))
    assert code == 2 and err.strip().endswith("this network is class-conditional; pass --labels (each query's class, comma-separated, or one for all)") and err.count("\n") == 1, err
    code, err = cli(capsys, "attribute", *run, "--labels", "3,5", "--method", "pixel", "--out", str(tmp_path / "out"))
    assert code == 0, err
