"""sampling.py and the objectives' chains: each step equals diffusers' schedulers (DDPM, DDIM under every
prediction type, flow-matching Euler, EDM Euler); noise is fixed per (seed, query, step)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from wherefrom.errors import WherefromError
from wherefrom.model import build_unet
from wherefrom.sampling import SchedulerType, generate, sampling_plan
from wherefrom.task import DiffusionTask, predict


PREDICTIONS = ["epsilon", "v_prediction", "sample"]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_equals_diffusers(clip, prediction):
    task = DiffusionTask(objective=prediction)
    ref = DDPMScheduler.from_config(task.objective.scheduler.config, clip_sample=clip)
    ref.set_timesteps(20)
    ts = sampling_plan(task, 20)
    assert ts == [int(t) for t in ref.timesteps] + [-1]
    x, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8) * 2
    for k in (0, 7, 19):
        t, t_prev = ts[k], (ts[k + 1] if k + 1 < len(ts) else -1)
        g = torch.Generator().manual_seed(k)
        expected = ref.step(eps, t, x, generator=g).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
        got = task.objective.denoise_step(SchedulerType.DDPM, x, eps, t, t_prev, noise, clip)
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_equals_diffusers(clip, prediction):
    task = DiffusionTask(objective=prediction)
    ref = DDIMScheduler.from_config(task.objective.scheduler.config, clip_sample=clip)
    ref.set_timesteps(10)
    ts = sampling_plan(task, 10, "ddim")
    x, out = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for k, t in enumerate(ts[:-1]):
        expected = ref.step(out, t, x, eta=0.0).prev_sample
        got = task.objective.step(lambda z, time: out, x, ts, k, SchedulerType.DDIM, None, clip)
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_euler_step_equals_diffusers(shift):
    task = DiffusionTask(objective={"type": "flow_matching", "shift": shift})
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(8)
    plan = sampling_plan(task, 8)
    assert torch.allclose(torch.tensor(plan), ref.sigmas.double().float(), atol=1e-6)
    x, v = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for k, t in enumerate(ref.timesteps):
        seen = []
        got = task.objective.step(lambda z, time: seen.append(time) or v, x, plan, k, SchedulerType.EULER, None, False)
        assert torch.allclose(seen[0], t.expand(2), atol=1e-3)  # the network time is diffusers' timestep
        assert torch.allclose(got, ref.step(v, t, x).prev_sample, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_euler_step_equals_diffusers(prediction):
    task = DiffusionTask(objective={"type": "edm", "prediction_type": prediction})
    ref = EDMEulerScheduler(prediction_type=prediction)
    ref.set_timesteps(6)
    plan = sampling_plan(task, 6)
    assert torch.allclose(torch.tensor(plan), ref.sigmas.double().float(), rtol=1e-5)
    net = lambda z, time: torch.tanh(z) * (1 + time.view(-1, 1, 1, 1))  # noqa: E731  a stand-in network of input and time
    x = torch.randn(2, 1, 8, 8) * 10
    for k, t in enumerate(ref.timesteps):
        expected = ref.step(net(ref.scale_model_input(x, t), t.expand(2)), t, x).prev_sample
        assert torch.allclose(task.objective.step(net, x, plan, k, SchedulerType.EULER, None, False), expected, rtol=1e-4, atol=1e-4)


def test_samples_are_seeded_and_batch_invariant(tiny_unet):
    task = DiffusionTask()
    unet = build_unet(tiny_unet, seed=0).eval()
    fn = lambda x, t: predict(unet, x, t)  # noqa: E731
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
        sampling_plan(DiffusionTask(), 0)


def test_a_chain_the_objective_does_not_sample_with_is_refused():
    with pytest.raises(WherefromError, match=r"^FlowMatching samples with \['euler'\], not 'ddpm'; pick one of those \(or 'auto'\)$"):
        sampling_plan(DiffusionTask(objective="flow_matching"), 10, "ddpm")


@pytest.mark.parametrize("objective", ["v_prediction", "flow_matching", "edm"])
def test_every_objective_samples_seeded(tiny_unet, objective):
    task = DiffusionTask(objective=objective)
    unet = build_unet(tiny_unet, seed=0).eval()
    fn = lambda x, t: predict(unet, x, t)  # noqa: E731
    with torch.no_grad():
        a = generate(fn, task, (1, 8, 8), 3, seed=1, steps=4, batch_size=3)
        b = generate(fn, task, (1, 8, 8), 3, seed=1, steps=4, batch_size=1)
    assert torch.allclose(a, b, atol=1e-5) and torch.isfinite(a).all()
