"""objective.py: each built-in objective's loss equals its paper's formula (float64), a user's training step
written with diffusers' own calls gives the library's loss for the same draws, objectives are read from
diffusers schedulers (and what cannot be modelled is refused in one line), and an own objective works."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from tests.helpers import MinSNR
from wherefrom.errors import WherefromError
from wherefrom.objective import DDPMObjective, EDM, FlowMatching, Objective, build_objective, objective_from_scheduler
from wherefrom.task import DiffusionTask, Stream


class Net(nn.Module):
    """f(x, time) = W x + 1e-3 time: a real module with known outputs, time-dependent."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Linear(d, d).double()

    def forward(self, x, time):
        return self.w(x.flatten(1)).view_as(x) + time.to(x.dtype).view(-1, 1, 1, 1) * 1e-3


def _setup(task: DiffusionTask, draw: int = 3):
    x0 = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1
    index = torch.tensor([5, 0, 7, 2])
    t, eps = task.draw(index, draw, (1, 4, 4), stream=Stream.TRAIN, dtype=torch.float64)
    return x0, index, t, eps


def _mse(a, b):
    return (a - b).flatten(1).pow(2).mean(1)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddpm_family_losses_equal_their_formulas(prediction):
    task, net = DiffusionTask(seed=1, objective=prediction), Net()
    x0, index, t, eps = _setup(task)
    ab = task.objective.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # Ho et al. (2020), eq. 4
    target = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]  # Salimans & Ho (2022), eq. 5
    torch.testing.assert_close(task.loss(net, x0, index, draw=3), _mse(net(x_t, t), target), rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_elbo_of_every_prediction_is_the_epsilon_elbo_of_its_implied_noise(prediction):
    """Ho et al. (2020), eq. 12 is a weighting of the epsilon error; v and x0 predictions imply an epsilon."""
    task, eps_task, net = DiffusionTask(seed=1, objective=prediction), DiffusionTask(seed=1), Net()
    x0, index, t, eps = _setup(task)
    x_t = task.add_noise(x0, t, eps)
    ab = task.objective.alphas_cumprod[t].view(-1, 1, 1, 1)
    out = net(x_t, t)
    implied = ab.sqrt() * out + (1 - ab).sqrt() * x_t if prediction == "v_prediction" else (x_t - ab.sqrt() * out) / (1 - ab).sqrt()
    got = task.measurement("elbo")(out, task.objective.target(x0, t, eps), t, task)
    ref = eps_task.measurement("elbo")(implied, eps, t, eps_task)
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_flow_matching_loss_equals_rectified_flow(density):
    task, net = DiffusionTask(seed=2, objective={"type": "flow_matching", "shift": 3.0, "density": density}), Net()
    x0, index, t, eps = _setup(task)
    s0 = (t.double() + 1) / 1000  # diffusers' unshifted sigma at training index T-1-t (level t: larger is noisier)
    s = (3.0 * s0 / (1 + 2.0 * s0)).view(-1, 1, 1, 1)  # SD3's shift (Esser et al. 2024, eq. 23)
    x_t = (1 - s) * x0 + s * eps
    torch.testing.assert_close(task.loss(net, x0, index, draw=3), _mse(net(x_t, s.flatten() * 1000), eps - x0), rtol=1e-6, atol=0)


def test_flow_matching_weightings_and_densities():
    for weighting, fn in (("sigma_sqrt", lambda s: s**-2), ("cosmap", lambda s: 2 / (math.pi * (1 - 2 * s + 2 * s**2)))):
        obj = FlowMatching(weighting=weighting)
        t = torch.tensor([0, 499, 999])
        torch.testing.assert_close(obj.loss_weight(t).double(), fn(obj.sigmas[t]), rtol=1e-6, atol=0)
    # logit-normal draws concentrate in the middle; uniform-strategy levels are its quantiles
    levels = DiffusionTask(objective={"type": "flow_matching", "density": "logit_normal"}).draw(torch.arange(2000), 0, (1,))[0]
    assert ((levels > 250) & (levels < 750)).double().mean() > 0.65  # 0.73 for logit-normal(0, 1), 0.5 for uniform
    assert FlowMatching(density="logit_normal").uniform_levels(3) == sorted(FlowMatching(density="logit_normal").uniform_levels(3))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_loss_equals_karras_weighted_denoiser_error(prediction):
    """Karras et al. (2022), eq. 8 and Table 1: lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2."""
    task, net = DiffusionTask(seed=4, objective={"type": "edm", "prediction_type": prediction}), Net()
    x0, index, t, eps = _setup(task)
    sigma, sd = task.objective.sigmas[t].view(-1, 1, 1, 1), 0.5
    x = x0 + sigma * eps
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt() * (1 if prediction == "epsilon" else -1)
    c_in, c_noise = 1 / (sigma**2 + sd**2).sqrt(), 0.25 * sigma.log().flatten()
    denoised = c_skip * x + c_out * net(c_in * x, c_noise)
    lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(task.loss(net, x0, index, draw=3), (lam.flatten() * _mse(denoised, x0)), rtol=1e-6, atol=0)
    # the levels are the log-normal's equally likely quantiles (ln sigma ~ N(-1.2, 1.2^2))
    logs = task.objective.sigmas.log()
    assert abs(logs.mean() + 1.2) < 1e-3 and abs(logs.std() - 1.2) < 0.02


def test_a_users_diffusers_training_step_gives_the_librarys_loss():
    """The same (x0, t, eps) through diffusers' add_noise / get_velocity / scale_noise."""
    net = Net()
    for scheduler in (DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"),
                      DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
                      DDPMScheduler(prediction_type="sample", trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist())):  # fmt: skip
        task = DiffusionTask.from_scheduler(scheduler, seed=5)
        x0, index, t, eps = _setup(task)
        x_t = scheduler.add_noise(x0, eps, t)
        target = scheduler.get_velocity(x0, eps, t) if scheduler.config.prediction_type == "v_prediction" else x0
        torch.testing.assert_close(task.loss(net, x0, index, draw=3), _mse(net(x_t, t), target), rtol=1e-5, atol=1e-7)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    task = DiffusionTask.from_scheduler(scheduler, seed=5)
    x0, index, t, eps = _setup(task)
    timesteps = scheduler.timesteps[999 - t]  # the user's draw of training indices 999 - t
    x_t = scheduler.scale_noise(x0, timesteps, eps)
    torch.testing.assert_close(task.loss(net, x0, index, draw=3), _mse(net(x_t, timesteps), eps - x0), rtol=1e-5, atol=1e-7)
    scheduler = EDMEulerScheduler(sigma_data=0.7)
    task = DiffusionTask.from_scheduler(scheduler, seed=5)
    x0, index, t, eps = _setup(task)
    sigma = task.objective.sigmas[t].view(-1, 1, 1, 1)
    x = x0 + sigma * eps
    denoised = scheduler.precondition_outputs(x, net(scheduler.precondition_inputs(x, sigma), scheduler.precondition_noise(sigma.flatten())), sigma)
    lam = (sigma**2 + 0.49) / (sigma * 0.7) ** 2
    torch.testing.assert_close(task.loss(net, x0, index, draw=3), lam.flatten() * _mse(denoised, x0), rtol=1e-5, atol=1e-7)


def test_objectives_are_read_from_schedulers_and_rebuilt_from_their_records():
    obj = objective_from_scheduler(DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, beta_schedule="scaled_linear"))
    assert isinstance(obj, DDPMObjective) and obj.prediction_type == "v_prediction" and float(obj.alphas_cumprod[-1]) < 1e-12
    assert isinstance(objective_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=2.0)), FlowMatching)
    assert isinstance(objective_from_scheduler(EDMEulerScheduler()), EDM)
    for spec in ("v_prediction", "flow_matching", {"type": "edm", "sigma_data": 0.3}, {"type": "flow_matching", "shift": 3.0}):
        task = DiffusionTask(objective=spec)
        again = DiffusionTask(**task.config)
        assert again.config == task.config and type(again.objective) is type(task.objective)
        x0, index, t, eps = _setup(task)
        torch.testing.assert_close(again.add_noise(x0, t, eps), task.add_noise(x0, t, eps), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), r"^FlowMatchEulerDiscreteScheduler has use_dynamic_shifting=True; wherefrom models use_dynamic_shifting=False only; give the module a DiffusionTask with your own Objective$"),
        (DDPMScheduler(thresholding=True), r"^DDPMScheduler has thresholding=True; wherefrom models thresholding=False only"),
        (DDPMScheduler(variance_type="learned"), r"^DDPMScheduler has variance_type='learned'"),
        (object(), r"^object is not a diffusers noise scheduler"),
    ],
)
def test_what_cannot_be_modelled_is_refused_in_one_line(scheduler, message):
    with pytest.raises(WherefromError, match=message) as err:
        DiffusionTask.from_scheduler(scheduler)
    assert "\n" not in str(err.value)


def test_bad_objective_settings_are_one_line():
    for spec, message in (("x1", r"unknown objective 'x1'"), ({"type": "flow_matching", "density": "beta"}, r"density must be one of"),
                          ({"type": "edm", "prediction_type": "sample"}, r"EDM's prediction_type must be")):  # fmt: skip
        with pytest.raises(WherefromError, match=message):
            build_objective(spec)
    with pytest.raises(WherefromError, match=r"carries its own schedule; leave num_train_timesteps and beta_\* unset"):
        DiffusionTask(num_train_timesteps=500, objective="flow_matching")


def test_an_own_objective_gives_its_loss_and_is_recorded_by_import_path():
    task, net = DiffusionTask(seed=1, objective=MinSNR(2.0)), Net()
    x0, index, t, eps = _setup(task)
    ab = task.objective.alphas_cumprod[t]
    weight = (ab / (1 - ab)).clamp(max=2.0) / (ab / (1 - ab))
    torch.testing.assert_close(task.loss(net, x0, index, draw=3), weight * _mse(net(task.add_noise(x0, t, eps), t), eps), rtol=1e-6, atol=0)
    assert task.config["objective"] == {"type": "own", "class": "tests.helpers:MinSNR", "gamma": 2.0}
    again = DiffusionTask(**task.config)
    assert isinstance(again.objective, MinSNR) and again.objective.gamma == 2.0
    assert isinstance(Objective(), Objective)  # the base is instantiable and says what to implement
    with pytest.raises(NotImplementedError):
        Objective().target(x0, t, eps)


def test_review_findings_are_refused_or_kept_canonical():
    """A scheduler whose network time or schedule no built-in models, epsilon at zero terminal SNR, an own
    objective without its own config(), SD3's preconditioned outputs; and one config for equal objectives."""
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(WherefromError, match=r"^EulerDiscreteScheduler has timestep_type='continuous'; wherefrom models timestep_type='discrete' only"):
        objective_from_scheduler(EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction"))
    with pytest.raises(WherefromError, match=r"rescale_betas_zero_snr needs v_prediction"):
        DDPMObjective("epsilon", rescale_betas_zero_snr=True)

    class Shifted(DDPMObjective):
        def __init__(self, gamma: float = 1.0):
            super().__init__("v_prediction")

    with pytest.raises(WherefromError, match=r"^own objective Shifted takes its own arguments but inherits config\(\)"):
        DiffusionTask(objective=Shifted())
    s = FlowMatching(precondition_outputs=True).sigmas[torch.tensor([10, 700])]
    torch.testing.assert_close(FlowMatching(precondition_outputs=True).loss_weight(torch.tensor([10, 700])).double(), s**2, rtol=1e-6, atol=0)
    assert DiffusionTask.from_scheduler(DDPMScheduler()).config == DiffusionTask().config == DiffusionTask(objective=DDPMObjective()).config


@pytest.mark.parametrize(("objective", "scheduler"), [("flow_matching", "euler"), ("edm", "heun")])
def test_sample_and_export_under_an_objective(objective, scheduler, tmp_path, capsys):
    """`wherefrom sample` picks the objective's own chain (`auto`), takes the others it has, refuses one it has
    not in one line, and an export records the objective: the export samples exactly as the checkpoint does."""
    from tests.helpers import cli, tiny_checkpoint

    tiny_checkpoint(tmp_path, 0, "model.ckpt", objective=objective)
    ckpt = str(tmp_path / "model.ckpt")
    for chain in ("auto", scheduler):
        code, err = cli(capsys, "sample", "--ckpt", ckpt, "--num-samples", "2", "--steps", "3", "--scheduler", chain, "--out", str(tmp_path / chain))
        assert code == 0, err
        assert np.abs(np.load(tmp_path / chain / "samples.npy")).max() <= 1 + 1e-6  # the clipped clean image, to float32 rounding
    code, err = cli(capsys, "sample", "--ckpt", ckpt, "--num-samples", "2", "--scheduler", "ddpm", "--out", str(tmp_path / "no"))
    assert code == 2 and "samples with" in err and err.count("\n") == 1 and not (tmp_path / "no").exists()
    assert cli(capsys, "export", "--ckpt", ckpt, "--out", str(tmp_path / "export"))[0] == 0
    code, err = cli(capsys, "sample", "--ckpt", str(tmp_path / "export"), "--num-samples", "2", "--steps", "3", "--out", str(tmp_path / "from_export"))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "from_export" / "samples.npy"), np.load(tmp_path / "auto" / "samples.npy"))
