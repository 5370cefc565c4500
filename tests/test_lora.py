"""LoRA models: a single model and an encoded ensemble of adapters on one frozen base. Gradients,
projections and K-FAC factors cover the adapters only and equal the exact references; the base
never moves; adapters round-trip through the diffusers layout."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import (
    TINY_UNET,
    attribute_every_method,
    check_jvp_columns,
    check_projected_grads,
    check_unet_factors,
    cli,
    tiny_config,
)
from wherefrom import DTRAK, load_module
from wherefrom.attribution.api import ATTRIBUTORS
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import Codes, EncodedEnsemble, EnsembleSampler
from wherefrom.features import trainable_parameters
from wherefrom.kfac import tracked_layers
from wherefrom.lora import add_lora, load_adapter, save_adapter
from wherefrom.model import DiffusionModel, build_unet
from wherefrom.store import Store
from wherefrom.task import DiffusionTask, Stream

LORA = {"r": 2}


def _trained_adapters(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random B (peft initialises B = 0, where the gradient of A vanishes): an adapter as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net


def test_lora_model_trains_the_adapters_only():
    model = DiffusionModel(unet=dict(TINY_UNET), lora=LORA)
    trainable = trainable_parameters(model.unet)
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) < 0.1 * sum(p.numel() for p in model.parameters())
    assert set(tracked_layers(model.unet)) == {n.rsplit(".", 1)[0] for n in trainable}  # K-FAC: the adapters' layers


@pytest.mark.parametrize("projection", ["dense", "structured"])
def test_lora_projected_grads_equal_autograd_loop_and_explicit_matrix(projection):
    model = DiffusionModel(unet=dict(TINY_UNET), lora=LORA, seed=3).double().eval()
    _trained_adapters(model.unet)
    index = torch.tensor([4, 0, 17])
    check_projected_grads(model, DigitsDataModule().images[index].double(), index, projection, "square_norm")


def test_lora_factors_equal_explicit_per_position_computation(float64):
    model = DiffusionModel(unet=dict(TINY_UNET), lora=LORA).double()
    unet, task = _trained_adapters(model.unet), DiffusionTask()
    x0 = DigitsDataModule().images[:3].double()
    t, eps = task.draw(torch.arange(3), 0, x0.shape[1:], stream=Stream.FACTORS, dtype=x0.dtype)
    check_unet_factors(unet, task.add_noise(x0, t, eps), t, eps, "expand", {"down_blocks.1.attentions.0.to_q.lora_A.default"})


def test_lora_ensemble_shares_one_frozen_base():
    ens = EncodedEnsemble(n=4, w=2, unet=dict(TINY_UNET), lora=LORA)
    unique = {id(p): p for p in ens.parameters()}
    base = sum(p.numel() for p in build_unet(TINY_UNET, 0).parameters())
    adapters = [sum(p.numel() for p in trainable_parameters(m).values()) for m in ens.members.values()]
    assert sum(p.numel() for p in unique.values()) == base + sum(adapters)  # memory: base + n adapters
    a, b = ens.members["member0"], ens.members["member1"]
    assert a.conv_in.weight is b.conv_in.weight and not a.conv_in.weight.requires_grad
    assert not torch.equal(*(dict(m.named_parameters())["down_blocks.1.attentions.0.to_q.lora_A.default.weight"] for m in (a, b)))


def test_lora_ensemble_ablation_jacobian_equals_finite_differences():
    ens = EncodedEnsemble(n=3, w=1, unet=dict(TINY_UNET), lora=LORA).double().eval()
    members = [_trained_adapters(m, i) for i, m in enumerate(ens.members.values())]
    codes = Codes.generate(np.arange(10, 13), 3, 1, seed=0)
    check_jvp_columns(EnsembleSampler(members, DiffusionTask(), (1, 8, 8), codes, seed=3, steps=3, dtype=torch.float64))


def test_adapter_round_trips_through_the_diffusers_layout(tmp_path):
    model = DiffusionModel(unet=dict(TINY_UNET), lora=LORA, seed=1)
    _trained_adapters(model.unet)
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "export" / "wherefrom_task.json").is_file()
    fresh = load_adapter(build_unet(TINY_UNET, 1), tmp_path / "export")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t).sample, model.unet(x, t).sample, rtol=0, atol=0)
        assert not torch.allclose(build_unet(TINY_UNET, 1)(x, t).sample, model.unet(x, t).sample)  # the adapter matters


def test_exported_adapter_loads_into_diffusers_own_lora_loader(tmp_path):
    """diffusers' ``UNet2DConditionModel.load_lora_adapter`` reads the export and gives the same network."""
    from tests.helpers import TEXT_UNET

    unet = _trained_adapters(add_lora(build_unet(TEXT_UNET, 0), LORA, 0))
    save_adapter(unet, LORA, tmp_path)
    fresh = build_unet(TEXT_UNET, 0)
    fresh.load_lora_adapter(tmp_path, prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, encoder_hidden_states=c).sample, unet(x, t, encoder_hidden_states=c).sample, rtol=0, atol=0)
        assert not torch.allclose(build_unet(TEXT_UNET, 0)(x, t, encoder_hidden_states=c).sample, unet(x, t, encoder_hidden_states=c).sample)


# --- end to end: fine-tune a trained base with LoRA ---------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A base model from `wherefrom fit`, then LoRA fine-tuning of it (single model and ensemble)."""
    from wherefrom.cli import main

    root = tmp_path_factory.mktemp("lora")
    (root / "base").mkdir(), (root / "lora").mkdir()
    main(["fit", "--config", str(tiny_config(root / "base", lr=3e-3))])
    base = root / "base" / "run" / "last.ckpt"
    main(["fit", "--config", str(tiny_config(root / "lora", lr=3e-2)), "--model.base", str(base), "--model.lora", "{r: 2}"])
    L.seed_everything(0)
    ens = EncodedEnsemble(n=4, w=2, unet=dict(TINY_UNET), base=str(base), lora=LORA, lr=3e-2, seed=5)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ens, DigitsDataModule(batch_size=4, subset=list(range(2, 8))))
    trainer.save_checkpoint(root / "ens.ckpt")
    return base, root / "lora" / "run" / "last.ckpt", root / "ens.ckpt"


def test_lora_fine_tuning_keeps_the_base_and_is_attributed_by_every_method(lora_run, tmp_path, capsys):
    base, ckpt, ens = lora_run
    before, after = load_module(base).unet, load_module(ckpt).unet
    moved = {n for n, p in after.named_parameters() if "lora_B" in n and p.abs().max() > 0}
    assert moved  # training moved the adapters off B = 0
    base_weights = {n.replace(".base_layer", ""): p for n, p in after.named_parameters() if "lora_" not in n}
    assert base_weights.keys() == dict(before.named_parameters()).keys()
    for name, p in before.named_parameters():  # and never the base (peft renames an adapted layer's weight to base_layer.weight)
        torch.testing.assert_close(base_weights[name], p, rtol=0, atol=0)
    module = load_module(ckpt)
    code, err = cli(capsys, "sample", "--ckpt", str(ckpt), "--num-samples", "2", "--steps", "3", "--out", str(tmp_path / "s"))
    assert code == 0, err
    queries = ["--queries", str(tmp_path / "s" / "samples.npy")]
    scores = attribute_every_method(capsys, ckpt, tmp_path, queries, ens, ["--num-samples", "2", "--steps", "3"])
    assert set(scores) == set(ATTRIBUTORS) and (scores["ablation"][:, 2:8] != 0).all()
    for method in ("trak", "dtrak", "kfac", "ekfac"):  # gradients of the adapters only: nonzero for every trained image
        assert (scores[method][:, :24] != 0).all(), method
    data, samples = DigitsDataModule(subset=list(range(24))), torch.from_numpy(np.load(tmp_path / "s" / "samples.npy"))
    api = DTRAK(store=str(tmp_path / "store_dtrak")).attribute(module, data, samples)
    np.testing.assert_allclose(scores["dtrak"], api.scores, rtol=1e-5, atol=1e-6 * np.abs(api.scores).max())
    # the LoRA ensemble's members have features of their own adapters
    small = ["--timesteps", "2", "--proj-dim", "64", "--batch-size", "8"]
    assert cli(capsys, "featurize", "--ckpt", str(ens), "--store", str(tmp_path / "ens_store"), *small)[0] == 0
    assert len([k for k in Store.open(tmp_path / "ens_store").entries("array") if k.startswith("features/")]) == 4
    code, err = cli(capsys, "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "adapter"))
    assert code == 0, err
    fresh = load_adapter(load_module(base).unet, tmp_path / "adapter")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t).sample, module.unet(x, t).sample)


def test_lora_checkpoint_reloads_without_its_base_file(lora_run, tmp_path):
    """The base is loaded when training starts; a trained checkpoint holds it, so it reloads once the base is gone."""
    import shutil

    base, _, _ = lora_run
    shutil.copy(base, tmp_path / "base.ckpt")
    L.seed_everything(0)
    model = DiffusionModel(unet=dict(TINY_UNET), base=str(tmp_path / "base.ckpt"), lora=LORA, lr=3e-2)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, DigitsDataModule(batch_size=8, subset=list(range(8))))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    (tmp_path / "base.ckpt").unlink()
    reloaded = load_module(tmp_path / "lora.ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    conv = dict(reloaded.unet.named_parameters())["conv_in.weight"]
    torch.testing.assert_close(conv, load_module(base).unet.conv_in.weight, rtol=0, atol=0)  # the base's weights, frozen


def test_lora_rejects_a_foreign_base_and_bad_options(tmp_path, capsys):
    torch.save({"state_dict": {"members.member0.conv_in.weight": torch.zeros(1)}}, tmp_path / "ens.ckpt")
    code, err = cli(capsys, "fit", "--config", str(tiny_config(tmp_path)), "--model.base", str(tmp_path / "ens.ckpt"), "--model.lora", "{r: 2}")
    assert code == 2 and "holds no single model's UNet" in err
    code, err = cli(capsys, "fit", "--config", str(tiny_config(tmp_path)), "--model.lora", "{rank: 2}")
    assert code == 2 and "unknown lora option 'rank'" in err
    save_adapter(DiffusionModel(unet=dict(TINY_UNET), lora=LORA).unet, LORA, tmp_path / "ok")
    with pytest.raises(Exception, match="holds no LoRA adapter"):
        load_adapter(build_unet(TINY_UNET, 0), tmp_path)
