"""Text-conditional models: a tiny ``UNet2DConditionModel`` and a tiny CLIP text encoder built from
configs (a word-level tokenizer written here; nothing downloaded). Caption embeddings enter the
cross-attention everywhere a network is evaluated; the exact references hold with them."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from tests.helpers import (
    TEXT_UNET,
    attribute_every_method,
    check_jvp_columns,
    check_projected_grads,
    check_unet_factors,
    cli,
    tiny_config,
)
from wherefrom import DTRAK, EKFAC, load_module
from wherefrom.attribution.api import ATTRIBUTORS
from wherefrom.checkpoint import load_datamodule
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import Codes, EncodedEnsemble, EnsembleSampler
from wherefrom.model import DiffusionModel, build_unet
from wherefrom.task import DiffusionTask, Stream
from wherefrom.text import TextEncoder

WORDS = ["[PAD]", "[UNK]", "a", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CROSS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # the text tokens' projection


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny CLIP text encoder and a word-level tokenizer in the Stable Diffusion layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("text")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=5).save_pretrained(root / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=5, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


def test_captions_are_embedded_once_and_served_as_cond(encoder_dir):
    dm = DigitsDataModule(subset=list(range(6)), captions="labels", text_encoder=str(encoder_dir))
    item = dm.dataset()[3]
    expected = TextEncoder(encoder_dir).embed([f"a digit {WORDS[4 + int(dm.labels[3])]}"])[0]
    assert item["cond"].shape == (5, 16)
    torch.testing.assert_close(item["cond"], expected)
    assert not torch.allclose(dm.null_condition, expected)


def test_text_conditional_projected_grads_and_factors_equal_the_references(encoder_dir, float64):
    cond = TextEncoder(encoder_dir).embed(["a digit four", "a digit zero", "a digit seven"]).double()
    model = DiffusionModel(unet=dict(TEXT_UNET), seed=3).double().eval()
    assert model.is_text
    index, x0 = torch.tensor([4, 0, 17]), DigitsDataModule().images[[4, 0, 17]].double()
    for projection in ("dense", "structured"):
        check_projected_grads(model, x0, index, projection, "loss", cond=cond)
    task = DiffusionTask()
    t, eps = task.draw(index, 0, x0.shape[1:], stream=Stream.FACTORS, dtype=x0.dtype)
    check_unet_factors(model.unet, task.add_noise(x0, t, eps), t, eps, "expand", {CROSS}, cond=cond)


def test_text_guided_ablation_jacobian_equals_finite_differences(encoder_dir):
    text = TextEncoder(encoder_dir)
    members = [build_unet(TEXT_UNET, seed=i).double().eval() for i in range(3)]
    cond = text.embed(["a digit one", "a digit two", "a", "a", "a", "a digit nine"]).double()
    s = EnsembleSampler(members, DiffusionTask(), (1, 8, 8), Codes.generate(np.arange(10, 13), 3, 1, seed=0), seed=3, steps=3,
                        dtype=torch.float64, cond=cond, guidance=2.0, null=text.embed([""])[0].double())  # fmt: skip
    check_jvp_columns(s)


@pytest.fixture(scope="module")
def runs(encoder_dir, tmp_path_factory):
    """A text-conditional model from `wherefrom fit` (digit-name captions) and a text-conditional ensemble."""
    from wherefrom.cli import main

    root = tmp_path_factory.mktemp("textrun")
    text = ["--data.captions", "labels", "--data.text_encoder", str(encoder_dir)]
    main(["fit", "--config", str(tiny_config(root, lr=3e-3)), "--model.unet", json.dumps(TEXT_UNET), *text])
    L.seed_everything(0)
    ens = EncodedEnsemble(n=4, w=2, unet=dict(TEXT_UNET), lr=1e-3, seed=5)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ens, DigitsDataModule(batch_size=4, subset=list(range(2, 8)), captions="labels", text_encoder=str(encoder_dir)))
    trainer.save_checkpoint(root / "ens.ckpt")
    return root / "run" / "last.ckpt", root / "ens.ckpt"


def test_text_model_trained_sampled_and_attributed_from_the_cli(runs, tmp_path, capsys):
    ckpt, ens = runs
    captions = ["--captions", "a digit three", "a digit one"]
    code, err = cli(capsys, "sample", "--ckpt", str(ckpt), "--num-samples", "2", "--steps", "4", *captions, "--guidance", "2", "--out", str(tmp_path / "s"))
    assert code == 0, err
    module, data = load_module(ckpt), load_datamodule(ckpt)
    cond, null = data.embed(["a digit three", "a digit one"]), data.null_condition
    samples = torch.from_numpy(np.load(tmp_path / "s" / "samples.npy"))
    torch.testing.assert_close(samples, module.generate(2, steps=4, cond=cond, null=null, guidance=2.0))
    queries = ["--queries", str(tmp_path / "s" / "samples.npy"), *captions]
    scores = attribute_every_method(capsys, ckpt, tmp_path, queries, ens, ["--num-samples", "2", "--steps", "3", *captions, "--guidance", "2"])
    assert set(scores) == set(ATTRIBUTORS) and (scores["ablation"][:, 2:8] != 0).all()
    for method, attributor in [("dtrak", DTRAK(store=str(tmp_path / "store_dtrak"))), ("ekfac", EKFAC(store=str(tmp_path / "store_trak"), timesteps=2))]:
        api = attributor.attribute(module, data, samples, cond=cond)
        np.testing.assert_allclose(scores[method], api.scores, rtol=1e-5, atol=1e-6 * np.abs(api.scores).max())  # CLI == API
        other = attributor.attribute(module, data, samples, cond=data.embed(["a digit eight"] * 2))
        assert not np.allclose(other.scores, api.scores, rtol=1e-3), method  # the caption enters the query's gradient
    capsys.readouterr()  # the API calls' progress bars
    code, err = cli(capsys, "attribute", "--ckpt", str(ckpt), "--method", "pixel", "--queries", str(tmp_path / "s" / "samples.npy"), "--out", str(tmp_path / "x"))
    assert code == 2 and "pass one caption per sample" in err and err.count("\n") == 1


def test_text_model_needs_captioned_data(tmp_path, capsys):
    code, err = cli(capsys, "fit", "--config", str(tiny_config(tmp_path)), "--model.unet", json.dumps(TEXT_UNET))
    assert code == 2 and "--data.captions and --data.text_encoder" in err


def test_latent_text_conditional_lora_fine_tuning_composes(encoder_dir, tmp_path, capsys):
    """D-TRAK's ArtBench setting in small: a text-conditional latent model fine-tuned with LoRA from a
    base, sampled with guidance and attributed by D-TRAK over the adapters."""
    from tests.helpers import tiny_vae
    from wherefrom.cli import main

    tiny_vae(tmp_path / "vae")
    unet = json.dumps({**TEXT_UNET, "sample_size": 4, "in_channels": 4})
    data = ["--data.vae", str(tmp_path / "vae"), "--data.captions", "labels", "--data.text_encoder", str(encoder_dir), "--model.clip_sample", "false"]
    (tmp_path / "base").mkdir(), (tmp_path / "lora").mkdir()
    main(["fit", "--config", str(tiny_config(tmp_path / "base", lr=3e-3)), "--model.unet", unet, *data])
    base = tmp_path / "base" / "run" / "last.ckpt"
    main(["fit", "--config", str(tiny_config(tmp_path / "lora", lr=3e-2)), "--model.unet", unet, *data, "--model.base", str(base), "--model.lora", "{r: 2}"])
    ckpt = str(tmp_path / "lora" / "run" / "last.ckpt")
    caption = ["--captions", "a digit three"]
    assert cli(capsys, "sample", "--ckpt", ckpt, "--num-samples", "2", "--steps", "3", *caption, "--guidance", "2", "--out", str(tmp_path / "s"))[0] == 0
    assert cli(capsys, "featurize", "--ckpt", ckpt, "--store", str(tmp_path / "store"), "--timesteps", "2", "--proj-dim", "32")[0] == 0
    code, err = cli(capsys, "attribute", "--ckpt", ckpt, "--method", "dtrak", "--store", str(tmp_path / "store"),
                    "--queries", str(tmp_path / "s" / "samples.npy"), *caption, "--out", str(tmp_path / "a"))  # fmt: skip
    assert code == 0, err
    scores = np.load(tmp_path / "a" / "scores.npy")
    assert np.isfinite(scores).all() and (scores[:, :24] != 0).all() and not scores[:, 24:].any()
    trained = {n for n, p in load_module(ckpt).unet.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)  # the features are gradients of the adapters alone
