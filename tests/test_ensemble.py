"""EncodedEnsemble and EnsembleSampler: routing, equivalence with lone members, DDP, per-member runs, assembly, ablation."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from tests.helpers import TINY_UNET, cli
from wherefrom.checkpoint import load_module
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import Codes, EncodedEnsemble, EnsembleSampler, member_seed
from wherefrom.errors import WherefromError
from wherefrom.model import Attributable, DiffusionModel, build_unet
from wherefrom.sampling import sample
from wherefrom.task import DiffusionTask, predict

REPO = Path(__file__).resolve().parents[1]


def trainer(root: Path, epochs: int = 1, callbacks=(), **kwargs) -> L.Trainer:
    kwargs = {"accelerator": "cpu", "devices": 1, **kwargs}
    return L.Trainer(
        max_epochs=epochs, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks), **kwargs,
    )


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class Steps(Callback):
    """Per step: the batch indices, which members changed, and (rank 0) the members' parameters before/after."""

    def __init__(self, out: Path | None = None) -> None:
        self.out, self.steps = out, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {k: flat_params(m) for k, m in module.members.items()}
        self.steps.append({"index": batch["index"].tolist()})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[-1]["moved"] = {k: not torch.equal(self.before[k], flat_params(m)) for k, m in module.members.items()}

    def on_train_end(self, trainer, module):
        if self.out is not None:
            state = {"steps": self.steps, "codes": module.codes.state(), "params": flat_params(module.members)}
            torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


class Replay(DigitsDataModule):
    """Digits served as the given batches of global indices, in order."""

    def __init__(self, batches: list[list[int]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.dataset()[b] for b in self.batches], batch_size=None)


def check_idle_members_do_not_move(steps: list[dict], codes: Codes) -> int:
    """A member moves in a step iff some row of the (global) batch is in its split; returns the idle count."""
    idle = 0
    for step in steps:
        active = codes.bits[codes.rows(step["index"])].any(0)
        assert [step["moved"][f"member{i}"] for i in range(codes.n)] == active.tolist()
        idle += int((~active).sum())
    return idle


# --- routing --------------------------------------------------------------------------------------------


def test_each_member_forward_receives_exactly_its_split(tmp_path):
    """Record every (x_t, t) each member's forward received and identify the training image it came from."""
    dm = DigitsDataModule(batch_size=3, subset=list(range(20)))
    model = EncodedEnsemble(n=6, w=3, unet=TINY_UNET, lr=1e-3, weight_decay=0.1, warmup=0.0, seed=4)
    seen: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, unet in enumerate(model.members.values()):
        unet.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault((i, model.current_epoch), []).append((args[0].detach().flatten(1), args[1])))
    steps = Steps()
    trainer(tmp_path, epochs=2, callbacks=[steps]).fit(model, dm)

    codes, task, images = model.codes, model.task, dm.images
    assert codes.n == 6 and codes.data_fingerprint == dm.fingerprint and len(codes.indices) == 20
    idx = torch.as_tensor(codes.indices)
    for epoch in range(2):
        t_ref, eps = task.draw(idx, epoch, images.shape[1:])
        x_ref = task.add_noise(images[idx], t_ref, eps).flatten(1)
        for i in range(6):
            x = torch.cat([x for x, _ in seen[(i, epoch)]])
            t = torch.cat([t for _, t in seen[(i, epoch)]])
            dist, row = torch.cdist(x, x_ref).min(1)
            assert dist.max() < 1e-5 and torch.equal(t, t_ref[row])
            got = sorted(codes.indices[row.numpy()].tolist())
            assert got == codes.split(i).tolist()  # exactly its split, each image once per epoch
    assert check_idle_members_do_not_move(steps.steps, codes) > 0  # batches of 3 leave members idle


# --- equivalence with a lone member -----------------------------------------------------------------


def test_member_in_ensemble_equals_member_trained_alone(tmp_path):
    """Float64: each member's weights after joint training equal a DiffusionModel trained alone on the member's
    rows of the same batches, from the member's initialisation, with the same seed (same draws)."""
    hp = dict(unet=TINY_UNET, lr=3e-3, weight_decay=0.1, warmup=0.25, seed=7)
    order = [[3, 17, 0, 12, 9, 5, 14, 1, 19, 8], [2, 11, 6, 15, 4, 18, 10, 7, 13, 16]]
    dm = Replay(order, subset=list(range(20)))
    ensemble = EncodedEnsemble(n=6, w=3, **hp)
    trainer(tmp_path, epochs=2, precision="64-true").fit(ensemble, dm)
    batches = [dm.dataset()[b] for b in order]

    compared = 0
    for i in range(6):
        rows = [b["index"].numpy() for b in batches]
        member_batches = [{k: v[ensemble.codes.bits[ensemble.codes.rows(r), i]] for k, v in b.items()} for b, r in zip(batches, rows)]
        if any(len(b["index"]) == 0 for b in member_batches):
            continue  # an idle batch would shorten the lone run's LR schedule
        alone = DiffusionModel(**hp)
        alone.unet.load_state_dict(build_unet(TINY_UNET, member_seed(7, i)).state_dict())
        trainer(tmp_path, epochs=2, precision="64-true").fit(alone, DataLoader(member_batches, batch_size=None))
        torch.testing.assert_close(flat_params(ensemble.members[f"member{i}"]), flat_params(alone.unet), rtol=0, atol=1e-12)
        compared += 1
    assert compared >= 4


# --- DDP ---------------------------------------------------------------------------------------------------


def test_ddp_two_processes_route_like_one_and_give_the_same_weights(tmp_path):
    """DDP (2 CPU processes, gloo) with 2 rows per rank: members are often idle on a rank or globally; each member
    still sees exactly its split, idle members do not move, and the weights equal one process with batch 4."""
    hp = dict(n=6, w=3, unet=TINY_UNET, lr=3e-3, weight_decay=0.1, warmup=0.0, seed=2)
    ddp = EncodedEnsemble(**hp)
    trainer(tmp_path, callbacks=[Steps(tmp_path)], devices=2, strategy="ddp_fork", precision="64-true").fit(
        ddp, DigitsDataModule(batch_size=2, subset=list(range(20)), shuffle=False)
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    codes = Codes.from_state(ranks[0]["codes"])
    seen = [[] for _ in range(6)]
    local_idle = 0
    for rank in ranks:
        for step in rank["steps"]:
            bits = codes.bits[codes.rows(step["index"])]
            local_idle += int((~bits.any(0)).sum())
            for i in range(6):
                seen[i] += np.asarray(step["index"])[bits[:, i]].tolist()
    assert local_idle > 0
    for i in range(6):
        assert sorted(seen[i]) == codes.split(i).tolist()
    merged = [{"index": a["index"] + b["index"], "moved": a["moved"]} for a, b in zip(*(r["steps"] for r in ranks))]
    assert check_idle_members_do_not_move(merged, codes) > 0  # some member was idle on both ranks

    # one process on the same global batches (Lightning's DistributedSampler shuffles with its own seed)
    single = EncodedEnsemble(**hp)
    trainer(tmp_path, precision="64-true").fit(single, Replay([step["index"] for step in merged], subset=list(range(20))))
    assert single.codes_fingerprint == codes.fingerprint
    for rank in ranks:
        torch.testing.assert_close(rank["params"], flat_params(single.members), rtol=0, atol=1e-10)


# --- sampler ---------------------------------------------------------------------------------------------------


@pytest.fixture
def sampler() -> EnsembleSampler:
    codes = Codes.generate(np.arange(10, 16), 4, 2, seed=0)
    members = [build_unet(TINY_UNET, seed=i).eval() for i in range(4)]
    return EnsembleSampler(members, DiffusionTask(), (1, 8, 8), codes, seed=3, steps=6)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
@torch.no_grad()
def test_one_hot_weights_reproduce_each_member_alone(sampler, scheduler):
    outs = []
    for i in range(4):
        one_hot = torch.zeros(4, dtype=torch.float64)
        one_hot[i] = 1
        got = sampler.sample(3, one_hot, scheduler=scheduler)
        alone = sample(lambda x, t: predict(sampler.members[i], x, t), sampler.task, (1, 8, 8), [0, 1, 2], 3, 6, scheduler)
        assert torch.equal(got, alone)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1])


@torch.no_grad()
def test_equal_seeds_give_equal_samples_and_batching_does_not_matter(sampler):
    full = sampler.sample(4)
    assert torch.equal(full, sampler.sample(4))
    torch.testing.assert_close(full, sampler.generate(4, batch_size=3))  # conv kernels round differently per batch size
    assert not torch.allclose(full, sampler.sample(4, seed=4))
    # uniform weights are the plain average of the members' noise predictions
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    mean = torch.stack([predict(m, x, t) for m in sampler.members]).mean(0)
    torch.testing.assert_close(sampler.eps_fn()(x, t), mean)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
@torch.no_grad()
def test_ablation_differs_from_the_full_run_only_through_removed_members(sampler, scheduler):
    codes = sampler.codes
    x = int(codes.indices[2])
    removed = codes.members_of(x)
    weights = torch.tensor([0.0 if i in removed else 1.0 / (4 - len(removed)) for i in range(4)], dtype=torch.float64)
    ablated = sampler.ablate([x], 5, scheduler=scheduler)
    assert torch.equal(ablated, sampler.sample(5, weights, scheduler=scheduler))  # same noise, renormalised weights
    full = sampler.sample(5, scheduler=scheduler)
    assert not torch.allclose(ablated, full)

    # scrambling the removed members changes the full run but not the ablated one
    scrambled = copy.copy(sampler)
    scrambled.members = list(sampler.members)
    for i in removed:
        scrambled.members[i] = build_unet(TINY_UNET, seed=100 + i).eval()
    assert torch.equal(scrambled.ablate([x], 5, scheduler=scheduler), ablated)
    assert not torch.allclose(scrambled.sample(5, scheduler=scheduler), full)


def test_ablation_errors(sampler):
    all_members = [int(i) for i in sampler.codes.indices]
    with pytest.raises(WherefromError, match="removes all 4 members"):
        sampler.ablate(all_members, 2)
    with pytest.raises(WherefromError, match="not in the ensemble's training split"):
        sampler.ablation_weights([3])
    with pytest.raises(WherefromError, match="shape"):
        sampler.sample(2, torch.ones(3) / 3)
    with pytest.raises(WherefromError, match="all member weights are zero"):
        sampler.sample(2, torch.zeros(4))


def test_weights_are_differentiable_by_forward_mode():
    """The weights enter as a plain tensor: a forward-mode JVP through the whole chain matches finite differences."""
    # no attention: fused SDPA has no forward-AD rule (issue 4 handles attention UNets)
    unet = {**TINY_UNET, "down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2, "add_attention": False}
    members = [build_unet(unet, seed=i).double().eval() for i in range(3)]
    s = EnsembleSampler(members, DiffusionTask(), (1, 8, 8), seed=1, steps=3, scheduler="ddpm", clip_sample=False, dtype=torch.float64)
    a, v = torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64)
    with torch.no_grad():
        _, jvp = torch.func.jvp(lambda w: s.sample(2, w), (a,), (v,))
        h = 1e-5
        fd = (s.sample(2, a + h * v) - s.sample(2, a - h * v)) / (2 * h)
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-8)


# --- checkpoints, per-member runs, assembly, CLI -------------------------------------------------------------


def test_checkpoint_round_trip_and_sample_ablate_cli(tmp_path, capsys):
    model = EncodedEnsemble(n=4, w=2, unet=TINY_UNET, lr=1e-3, seed=5)
    fit = trainer(tmp_path)
    fit.fit(model, DigitsDataModule(batch_size=4, subset=list(range(6))))
    fit.save_checkpoint(tmp_path / "ens.ckpt")
    loaded = load_module(tmp_path / "ens.ckpt")
    assert isinstance(loaded, EncodedEnsemble) and isinstance(loaded, Attributable)
    assert loaded.codes_fingerprint == model.codes_fingerprint
    assert list(loaded.denoisers()) == ["member0", "member1", "member2", "member3"]
    assert loaded.members_of(4) == model.codes.members_of(4)
    assert torch.equal(flat_params(loaded.members), flat_params(model.members))

    args = ("sample", "--ckpt", str(tmp_path / "ens.ckpt"), "--num-samples", "3", "--steps", "4", "--seed", "2")
    assert cli(capsys, *args, "--out", str(tmp_path / "full"))[0] == 0
    assert cli(capsys, *args, "--out", str(tmp_path / "ablated"), "--ablate", "4,5")[0] == 0
    full, ablated = (np.load(tmp_path / d / "samples.npy") for d in ("full", "ablated"))
    assert (tmp_path / "ablated" / "samples.png").is_file()
    s = loaded.sampler(seed=2, steps=4)
    with torch.no_grad():
        assert np.array_equal(full, s.sample(3).numpy()) and np.array_equal(ablated, s.ablate([4, 5], 3).numpy())
    assert not np.allclose(full, ablated)
    code, err = cli(capsys, *args, "--out", str(tmp_path / "none"), "--ablate", "0,1,2,3,4,5")
    assert code == 2 and "removes all 4 members" in err and "Traceback" not in err


def test_per_member_runs_assemble_into_the_ensemble(tmp_path, capsys):
    subset = list(range(6))
    ckpts, members = [], []
    for i in range(4):
        dm = DigitsDataModule(batch_size=2, subset=subset)
        model, steps = EncodedEnsemble(n=4, w=2, member=i, unet=TINY_UNET, lr=1e-3, seed=5), Steps()
        fit = trainer(tmp_path, callbacks=[steps])
        fit.fit(model, dm)
        assert list(model.denoisers()) == [f"member{i}"]
        # the datamodule served exactly the member's split (the codes cover the whole split)
        assert sorted(sum((s["index"] for s in steps.steps), [])) == model.codes.split(i).tolist()
        assert model.codes.indices.tolist() == subset and model.codes.data_fingerprint == DigitsDataModule(subset=subset).fingerprint
        fit.save_checkpoint(tmp_path / f"m{i}.ckpt")
        ckpts.append(str(tmp_path / f"m{i}.ckpt"))
        members.append(model)
    joint = Codes.generate(np.array(subset), 4, 2, seed=5, data_fingerprint=DigitsDataModule(subset=subset).fingerprint)
    assert members[0].codes_fingerprint == joint.fingerprint  # the joint run would use the same codes

    out = tmp_path / "ensemble.ckpt"
    code, err = cli(capsys, "ensemble", "assemble", "--members", *ckpts[::-1], "--out", str(out))
    assert code == 0, err
    ens = load_module(out)
    assert ens.codes_fingerprint == joint.fingerprint and ens.hparams.member is None
    for i, m in enumerate(members):
        assert torch.equal(flat_params(ens.members[f"member{i}"]), flat_params(m.members[f"member{i}"]))
    one_hot = torch.eye(4, dtype=torch.float64)[2]
    assert torch.equal(ens.generate(2, steps=3, weights=one_hot), members[2].eval().generate(2, steps=3))
    with pytest.raises(WherefromError, match="assemble the ensemble"):
        members[0].ablation_weights([0])

    # a member trained on other data has other codes
    other = EncodedEnsemble(n=4, w=2, member=3, unet=TINY_UNET, lr=1e-3, seed=5)
    fit = trainer(tmp_path)
    fit.fit(other, DigitsDataModule(batch_size=2, subset=list(range(1, 7))))
    fit.save_checkpoint(tmp_path / "other.ckpt")
    bad = {
        "codes fingerprint": [*ckpts[:3], str(tmp_path / "other.ckpt")],
        "members [3] are missing": ckpts[:3],
        "appears twice": [*ckpts, shutil.copy(ckpts[1], tmp_path / "copy.ckpt")],
        "listed more than once": [*ckpts, ckpts[0]],
        "not a per-member ensemble checkpoint": [*ckpts[:3], str(out)],
    }
    for match, paths in bad.items():
        code, err = cli(capsys, "ensemble", "assemble", "--members", *map(str, paths), "--out", str(tmp_path / "bad.ckpt"))
        assert code == 2 and match in err, (match, err)
    assert not (tmp_path / "bad.ckpt").exists()


def test_shipped_config_trains_one_member_through_the_cli(tmp_path, monkeypatch, capsys):
    """`wherefrom fit --config configs/digits_ensemble.yaml --model.member i` (LightningCLI)."""
    monkeypatch.chdir(tmp_path)  # the config writes runs/digits_ensemble/last.ckpt
    subset = list(range(40))
    code, err = cli(
        capsys, "fit", "--config", str(REPO / "configs" / "digits_ensemble.yaml"), "--model.member", "3",
        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        f"--data.subset={subset}", "--model.unet", json.dumps(TINY_UNET),
    )
    assert code == 0, err[-3000:]
    model = load_module(tmp_path / "runs" / "digits_ensemble" / "last.ckpt")
    assert model.hparams.member == 3 and list(model.denoisers()) == ["member3"]
    assert model.codes.indices.tolist() == subset and model.codes.n == model.hparams.n == 16


def test_bad_ensemble_settings_fail_clearly(tmp_path):
    with pytest.raises(WherefromError, match="member must be in"):
        EncodedEnsemble(n=4, member=4)
    with pytest.raises(WherefromError, match="weight w"):
        EncodedEnsemble(n=4, w=4)
    with pytest.raises(WherefromError, match=r"use n >= 9 with w=4"):
        trainer(tmp_path).fit(EncodedEnsemble(n=8, w=4, unet=TINY_UNET), DigitsDataModule(subset=list(range(71))))


def test_group_codes_train_members_on_whole_classes(tmp_path):
    """``groups="labels"``: one code per digit class; a member's split is a union of whole classes, and
    ablating any image drops exactly the members that saw its class (and survives a checkpoint)."""
    dm = DigitsDataModule(batch_size=20, subset=list(range(60)), groups="labels")
    model = EncodedEnsemble(n=5, w=2, unet=TINY_UNET, lr=1e-3, warmup=0.0, seed=1)
    trainer(tmp_path, epochs=1).fit(model, dm)
    labels = dm.labels
    assert np.array_equal(model.codes.groups, labels[model.codes.indices])
    for i in range(5):
        split = model.codes.split(i)
        classes = np.unique(labels[split])
        assert len(classes) == 4 and set(split) == set(np.flatnonzero(np.isin(labels[:60], classes)))
    image = 7
    same_class = [int(j) for j in range(60) if labels[j] == labels[image]]
    assert all(model.members_of(j) == model.members_of(image) for j in same_class)
    assert not set(model.ablation_weights([image]).nonzero().ravel().tolist()) & set(model.members_of(image))
    torch.save(model.codes.state(), tmp_path / "codes.pt")  # the checkpoint's form: tensors and plain values
    assert Codes.from_state(torch.load(tmp_path / "codes.pt", weights_only=True)).fingerprint == model.codes.fingerprint
    with pytest.raises(WherefromError, match="groups must give one id per image"):
        DigitsDataModule(groups=[0, 1, 2]).group_ids
