"""Helpers the test modules share: tiny UNet configs and runs, the CLI runners, and checks several
modules apply to their own models (projected gradients, K-FAC factors, JVP columns)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL
from torch import nn
from trak.projectors import BasicProjector, ProjectionType

from wherefrom.cli import main as cli_main
from wherefrom.ensemble import Codes, EnsembleSampler
from wherefrom.ensemble.synthetic import linearize
from wherefrom.features import (
    FeatureConfig,
    Projection,
    per_sample_grads,
    projection_seed,
    trainable_parameters,
)
from wherefrom.features.projection import BLOCK_SIZE
from wherefrom.kfac import FactorCollector, backpropagate, tracked_layers
from wherefrom.model import DiffusionModel, build_unet
from wherefrom.objective import DDPMObjective
from wherefrom.task import DiffusionTask, Stream, predict

# ~12k parameters, with attention at 4x4.
TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    block_out_channels=(4, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=2,
    attention_head_dim=4,
)

# ~15k parameters on 3 x 32 x 32: 32 -> 16 -> 8, attention at 8x8 (the shape of a CIFAR-size UNet, tiny).
TINY_UNET_RGB32 = dict(
    sample_size=32,
    in_channels=3,
    block_out_channels=(4, 8, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=2,
    attention_head_dim=4,
)

TEXT_UNET = dict(
    sample_size=8, in_channels=1, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, attention_head_dim=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
)  # fmt: skip

SUBSET = list(range(24))

SHAPE = (1, 8, 8)


def run_cli(*args: str, cwd: Path, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m wherefrom.cli ARGS`` (``popen=True``-style kwargs start it without waiting)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "wherefrom.cli", *args]
    if popen.pop("background", False):
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``wherefrom ARGS`` in-process; returns (exit status, captured stderr)."""
    try:
        cli_main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def attribute_every_method(capsys, ckpt, root, queries: list[str], ensemble=None, ensemble_queries: list[str] = ()) -> dict:
    """Every registered method from the CLI on one kind of model: `featurize` (trak and dtrak stores) and
    `factors` (EK-FAC) of ``ckpt``, `attribute` of its ``queries`` (flags) by the store, factor and baseline
    methods, and of the encoded ``ensemble``'s own samples (``ensemble_queries`` flags) by the ensemble
    methods. Returns each method's scores, all finite."""
    import numpy as np

    from wherefrom.attribution.api import ATTRIBUTORS
    from wherefrom.attribution.protocol import Needs

    small = ["--timesteps", "2", "--proj-dim", "64", "--batch-size", "8"]
    for method in ("trak", "dtrak"):
        code, err = cli(capsys, "featurize", "--ckpt", str(ckpt), "--method", method, "--store", str(root / f"store_{method}"), *small)
        assert code == 0, err
    code, err = cli(capsys, "factors", "--ckpt", str(ckpt), "--store", str(root / "store_trak"), "--ekfac", "--passes", "1", "--batch-size", "8")
    assert code == 0, err
    options = {
        "trak": ["--store", str(root / "store_trak")], "dtrak": ["--store", str(root / "store_dtrak")],
        "kfac": ["--store", str(root / "store_trak"), "--timesteps", "2"], "ekfac": ["--store", str(root / "store_trak"), "--timesteps", "2"],
        "ablation": ["--exact", "--top-k", "2"], "ablation-loss": ["--timesteps", "2"],
    }  # fmt: skip
    scores = {}
    for method, cls in ATTRIBUTORS.items():
        if cls.needs is Needs.ENSEMBLE and ensemble is None:
            continue
        run = [str(ensemble), *ensemble_queries] if cls.needs is Needs.ENSEMBLE else [str(ckpt), *queries]
        out = root / f"scores_{method}"
        code, err = cli(capsys, "attribute", "--method", method, "--ckpt", *run, *options.get(method, []), "--out", str(out))
        assert code == 0, f"{method}: {err}"
        scores[method] = np.load(out / "scores.npy")
        assert np.isfinite(scores[method]).all() and (out / "topk.png").is_file(), method
    return scores


def tiny_config(root: Path, callbacks: list[dict] | None = None, lr: float = 1e-3, precision: str = "32-true", epochs: int = 1) -> Path:
    """A LightningCLI config: the tiny UNet (with attention) on 24 digits, checkpoint at ``root/run/last.ckpt``."""
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET.items()}
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs, "accelerator": "cpu", "devices": 1, "logger": False, "enable_model_summary": False,
            "default_root_dir": str(root),  # LightningCLI saves config.yaml there, not in the cwd
            "enable_progress_bar": False, "precision": precision,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "run"), "filename": "last", "enable_version_counter": False}},
                          *(callbacks or [])],
        },
        "model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"unet": unet, "lr": lr, "warmup": 0.0}},
        "data": {"class_path": "wherefrom.DigitsDataModule", "init_args": {"batch_size": 8, "subset": SUBSET}},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_checkpoint(root: Path, seed: int = 0, name: str = "model.ckpt", **model: Any):
    """A tiny model (seeded by ``seed``) trained one epoch (lr 3e-3) on SUBSET, saved as ``root/name``; returns (model, datamodule)."""
    import lightning as L

    from wherefrom.datamodules import DigitsDataModule
    from wherefrom.model import DiffusionModel

    L.seed_everything(seed)
    module = DiffusionModel(**{"unet": dict(TINY_UNET), "lr": 3e-3, "warmup": 0.0, "seed": seed, **model})
    dm = DigitsDataModule(batch_size=8, subset=SUBSET)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, dm)
    trainer.save_checkpoint(root / name)
    return module, dm


def tiny_vae(path, seed: int = 0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8)  # fmt: skip
    vae.save_pretrained(path)
    return vae


def loop_grads(model, x0, index, output, draws, cond=None) -> torch.Tensor:
    """Reference: one example at a time, torch.autograd.grad of the measurement."""
    params = list(trainable_parameters(model.unet).values())
    rows = []
    for i in range(len(x0)):
        c = None if cond is None else cond[i : i + 1]
        value = model.task.measure(model.unet, x0[i : i + 1], index[i : i + 1], output, draws, stream=Stream.FEATURES, cond=c)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value.sum(), params)]))
    return torch.stack(rows)


def kronecker_matrix(projection: Projection) -> torch.Tensor:
    """The structured projection as an explicit P x D matrix: per layer (P_out (x) P_in) on vec(G),
    G = [W | b] (out x (fan_in + 1)), rows placed at the parameters' positions."""
    m = torch.zeros(projection.num_params, projection.dim, dtype=torch.float64)
    col = 0
    for layer in projection.layers:
        (out, k_out), (fan_in, k_in) = layer.p_out.shape, layer.p_in.shape
        w_in = fan_in - (layer.bias is not None)
        rows = torch.empty(out, fan_in, dtype=torch.long)
        rows[:, :w_in] = layer.weight.start + torch.arange(out * w_in).view(out, w_in)
        if layer.bias is not None:
            rows[:, w_in] = layer.bias.start + torch.arange(out)
        m[rows.flatten(), col : col + k_out * k_in] = torch.kron(layer.p_out, layer.p_in)
        col += k_out * k_in
    return m


def check_projected_grads(model: DiffusionModel, x0: torch.Tensor, index: torch.Tensor, projection: str, output: str, cond: torch.Tensor | None = None) -> None:
    """vmap per-sample gradients == an autograd loop; fast projections == trak's projector / the explicit Kronecker matrix
    (each example under its condition ``cond``)."""
    config = FeatureConfig(output=output, timesteps=3, strategy="random", proj_dim=200, projection=projection, seed=1)
    draws = config.draws(model.task)
    ref = loop_grads(model, x0, index, output, draws, cond)
    assert torch.allclose(per_sample_grads(model.unet, model.task, x0, index, output, draws, cond=cond), ref, rtol=1e-10, atol=1e-13)

    proj = Projection(config, model.unet, "model")
    if projection == "dense":  # a fresh trak BasicProjector with the documented seed and block size
        trak = BasicProjector(proj.num_params, 200, projection_seed(1, "model"), ProjectionType.normal, "cpu", BLOCK_SIZE, torch.float64)
        expected = trak.project(ref, model_id=0)
    else:
        assert any("to_q" in layer.name for layer in proj.layers)
        assert {layer.name for layer in proj.layers} == set(tracked_layers(model.unet))  # every trained conv and linear layer
        expected = ref @ kronecker_matrix(proj)
    assert expected.abs().max() > 0
    fast = proj.projected_grads(model.task, x0, index, output, draws, cond=cond)
    assert torch.allclose(fast, expected, rtol=1e-9, atol=1e-11 * expected.abs().max())
    # the dense-input path (used to project preconditioned gradients) is the same map
    assert torch.allclose(proj.project(ref), expected, rtol=1e-9, atol=1e-11 * expected.abs().max())
    # another model id draws another matrix
    assert not torch.allclose(Projection(config, model.unet, "member1").project(ref), expected)


def explicit_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``B x R x (C k k + 1)``: the conv's input window at each output position, sliced one at a time."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, (pw, pw, ph, ph), mode=mode)
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = [
        [torch.cat([xp[n, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw].reshape(-1), torch.ones(1)])
         for i in range(ho) for j in range(wo)]
        for n in range(len(x))
    ]  # fmt: skip
    return torch.stack([torch.stack(r) for r in rows])


def collect(model: nn.Module, approx: str, run, eigen=None) -> dict:
    collector = FactorCollector(model, approx, eigen=eigen)
    with collector.attached(), collector.recording():
        run()
    return collector.state_dict()


def normalised(sums: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return sums[f"{name}/A"] / sums[f"{name}/A_count"], sums[f"{name}/G"] / sums[f"{name}/G_count"]


def check_unet_factors(
    unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, approx: str, required: set[str], cond: torch.Tensor | None = None
) -> None:
    """The factors of every tracked layer of ``unet`` (``required`` among them) equal explicit per-position sums."""
    inputs, grads = {}, {}
    layers = tracked_layers(unet)
    assert required <= set(layers)

    def spy(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return hook

    handles = [m.register_forward_hook(spy(n)) for n, m in layers.items()]
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
    sums = collect(unet, approx, lambda: backpropagate(predict(unet, x_t, t, cond), eps, "mc", noise))
    for h in handles:
        h.remove()
    for name, layer in layers.items():
        x, g = inputs[name], grads[name]
        if isinstance(layer, nn.Conv2d):
            a_pos = explicit_patches(x, layer)
            g_pos = g.flatten(2).transpose(1, 2)
        else:
            a_pos = x.reshape(len(x), -1, x.shape[-1])
            if layer.bias is not None:  # the bias as a constant-1 input (LoRA's adapter layers have none)
                a_pos = torch.cat([a_pos, torch.ones(*a_pos.shape[:2], 1)], -1)
            g_pos = g.reshape(len(g), -1, g.shape[-1])
        n, r = a_pos.shape[:2]
        if approx == "expand":  # Eschenhagen et al. (2023), eq. 7
            a_ref = sum(torch.outer(a_pos[i, j], a_pos[i, j]) for i in range(n) for j in range(r)) / (n * r)
            g_ref = sum(torch.outer(g_pos[i, j], g_pos[i, j]) for i in range(n) for j in range(r)) / n
        else:  # eq. 9: mean of the inputs, sum of the output gradients over positions
            a_ref = sum(torch.outer(a_pos[i].mean(0), a_pos[i].mean(0)) for i in range(n)) / n
            g_ref = sum(torch.outer(g_pos[i].sum(0), g_pos[i].sum(0)) for i in range(n)) / n
        a, gg = normalised(sums, name)
        torch.testing.assert_close(a, a_ref, msg=name)
        torch.testing.assert_close(gg, g_ref, msg=name)


def unet_sampler(
    n: int = 3, steps: int = 4, scheduler: str = "ddpm", dtype: torch.dtype = torch.float64, unet: dict = TINY_UNET, objective: str = "epsilon"
) -> EnsembleSampler:
    """Tiny attention UNets (TINY_UNET has AttnDownBlock2D/AttnUpBlock2D), codes for training indices 10.. (at most 6)."""
    members = [build_unet(unet, seed=i).to(dtype).eval() for i in range(n)]
    codes = Codes.generate(np.arange(10, 10 + min(6, math.comb(n, n // 2))), n, n // 2, seed=0)
    shape = (unet["in_channels"], unet["sample_size"], unet["sample_size"])
    return EnsembleSampler(members, DiffusionTask(objective=objective), shape, codes, seed=3, steps=steps, scheduler=scheduler, dtype=dtype)


def check_jvp_columns(s: EnsembleSampler) -> None:
    """The forward-mode Jacobian of a 3-member sampler's x0 w.r.t. the member weights == central finite differences."""
    assert any(type(m).__name__ == "Attention" for m in s.members[0].modules())
    a = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)  # member 2 is skipped when sampling, not when differentiating
    lin = linearize(s, [0, 5], a)
    h = 1e-6
    with torch.no_grad():
        fd = torch.stack([(s.sample([0, 5], a + h * e) - s.sample([0, 5], a - h * e)).flatten(1) / (2 * h) for e in torch.eye(3, dtype=torch.float64)], -1)
        torch.testing.assert_close(lin.x0, s.sample([0, 5], a), rtol=0, atol=1e-12)
    assert lin.jacobian.shape == (2, math.prod(s.image_shape), 3) and fd[..., 2].abs().max() > 0.5  # the zero-weight member matters
    torch.testing.assert_close(lin.jacobian, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


class MinSNR(DDPMObjective):
    """An own objective: epsilon-prediction with Min-SNR-gamma weighting (Hang et al. 2023, eq. 12)."""

    def __init__(self, gamma: float = 5.0) -> None:
        super().__init__("epsilon")
        self.gamma = gamma

    def loss_weight(self, t):
        snr = self.alphas_cumprod[t.cpu()] / (1 - self.alphas_cumprod[t.cpu()])
        return (snr.clamp(max=self.gamma) / snr).float()

    def config(self):
        return {"gamma": self.gamma}
