"""sampling.py: each step equals diffusers' schedulers; noise is fixed per (seed, query, step)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from wherefrom.errors import WherefromError
from wherefrom.model import build_unet
from wherefrom.sampling import SchedulerType, generate, sampling_timesteps, step
from wherefrom.task import DiffusionTask, predict_eps


@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_equals_diffusers(clip):
    task = DiffusionTask()
    ref = DDPMScheduler.from_config(task.scheduler.config, clip_sample=clip)
    ref.set_timesteps(20)
    ts = sampling_timesteps(task, 20)
    assert ts == [int(t) for t in ref.timesteps]
    x, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8) * 2
    for k in (0, 7, 19):
        t, t_prev = ts[k], (ts[k + 1] if k + 1 < len(ts) else -1)
        g = torch.Generator().manual_seed(k)
        expected = ref.step(eps, t, x, generator=g).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
        got = step(task, SchedulerType.DDPM, x, eps, t, t_prev, noise, clip)
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_equals_diffusers(clip):
    task = DiffusionTask()
    ref = DDIMScheduler.from_config(task.scheduler.config, clip_sample=clip)
    ref.set_timesteps(10)
    ts = sampling_timesteps(task, 10)
    x, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for k, t in enumerate(ts):
        t_prev = ts[k + 1] if k + 1 < len(ts) else -1
        expected = ref.step(eps, t, x, eta=0.0).prev_sample
        assert torch.allclose(step(task, SchedulerType.DDIM, x, eps, t, t_prev, None, clip), expected, atol=1e-5)


def test_samples_are_seeded_and_batch_invariant(tiny_unet):
    task = DiffusionTask()
    unet = build_unet(tiny_unet, seed=0).eval()
    fn = lambda x, t: predict_eps(unet, x, t)  # noqa: E731
    with torch.no_grad():
        a = generate(fn, task, (1, 8, 8), 5, seed=1, steps=5, batch_size=5)
        b = generate(fn, task, (1, 8, 8), 5, seed=1, steps=5, batch_size=2)
        c = generate(fn, task, (1, 8, 8), 5, seed=2, steps=5, batch_size=5)
        d = generate(fn, task, (1, 8, 8), 5, seed=1, steps=5, scheduler="ddim")
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    assert a.shape == (5, 1, 8, 8) and a.abs().max() <= 1


def test_bad_steps():
    with pytest.raises(WherefromError, match="steps must be in"):
        sampling_timesteps(DiffusionTask(), 0)
