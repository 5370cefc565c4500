"""The command line end to end: LightningCLI fit (1 process and DDP with 2), sample, and clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml

from tests.helpers import TINY_UNET, cli
from wherefrom.attribution.protocol import Attribution, Needs
from wherefrom.target import as_data


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2, "accelerator": "cpu", "devices": 1, "logger": False, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "run"), "filename": "last", "enable_version_counter": False}}],
        },
        "model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"unet": {**TINY_UNET, "block_out_channels": list(TINY_UNET["block_out_channels"]), "down_block_types": list(TINY_UNET["down_block_types"]), "up_block_types": list(TINY_UNET["up_block_types"])}, "lr": 1e-3}},
        "data": {"class_path": "wherefrom.DigitsDataModule", "init_args": {"batch_size": 8, "subset": list(range(32))}},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_print_config_and_overrides(tiny_config, capsys):
    from wherefrom.cli import main

    with pytest.raises(SystemExit) as exit_:  # LightningCLI prints the config and exits
        main(["fit", "--config", str(tiny_config), "--model.lr", "0.5", "--print_config"])
    assert exit_.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"].endswith("DiffusionModel")
    assert cfg["model"]["init_args"]["lr"] == 0.5 and cfg["data"]["init_args"]["batch_size"] == 8


def test_fit_ddp_then_sample_is_deterministic(ddp_runs, capsys):
    # `wherefrom fit` with 2 DDP processes across the process boundary (conftest.ddp_runs); the samples in this process
    root = ddp_runs[2]
    ckpt = root / "run" / "last.ckpt"
    assert ckpt.is_file()
    outs = []
    for name in ("a", "b"):
        code, err = cli(capsys, "sample", "--ckpt", str(ckpt), "--num-samples", "3", "--seed", "5", "--steps", "4", "--out", str(root / name))
        assert code == 0, err[-3000:]
        assert (root / name / "samples.png").is_file()
        outs.append(np.load(root / name / "samples.npy"))
    assert outs[0].dtype == np.float32 and outs[0].shape == (3, 1, 8, 8)
    assert np.array_equal(outs[0], outs[1]) and np.abs(outs[0]).max() <= 1


@pytest.mark.parametrize(
    "args, match",
    [
        (("sample", "--ckpt", "missing.ckpt", "--out", "x"), "does not exist"),
        (("sample", "--ckpt", "missing.ckpt", "--out", "x", "--num-samples", "0"), "num-samples"),
        (("fit", "--config", "{cfg}", "--data.subset", "[5000]"), "outside"),
        (("fit", "--config", "{cfg}", "--data", "wherefrom.FolderDataModule", "--data.root", "empty"), "has no images"),
        (("frobnicate",), "unknown command"),
    ],
)
def test_bad_input_gives_one_line_and_status_2(tiny_config, args, match, capsys, monkeypatch):
    # in-process through the real entry point (conftest.ddp_runs and test_dropin cover the process boundary)
    from wherefrom.cli import main

    root = tiny_config.parent
    (root / "empty").mkdir(exist_ok=True)
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_:
        main([a.format(cfg=tiny_config) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("wherefrom")]
    assert len(lines) == 1 and match in lines[0], err[-2000:]
    assert "wherefrom.errors" not in err  # no traceback of the error, just its message
    assert not (root / "x").exists()


@dataclasses.dataclass
class Brightest:
    """A user's own attributor: every training image scored by its mean brightness times ``scale``."""

    scale: float = 1.0

    name: ClassVar[str] = "brightest"
    needs: ClassVar[Needs] = Needs.NOTHING
    unit: ClassVar[str] = "mean brightness x scale"

    def attribute(self, module, data, queries, cond=None) -> Attribution:
        data = as_data(data, "Brightest")
        scores = np.tile(data.images.mean((1, 2, 3)).numpy() * self.scale, (len(queries), 1))
        return Attribution(scores, queries, self.name, split=data.indices, unit=self.unit)


def test_a_registered_attributor_runs_from_the_command_line(tiny_config, tmp_path, capsys):
    """Issue 37: `register` said it added a user's attributor to the CLI, which never imported user code;
    `--method package.module:Class` now imports and registers it, and its fields are flags."""
    from wherefrom.attribution.api import ATTRIBUTORS
    from wherefrom.datamodules import DigitsDataModule

    code, err = cli(capsys, "fit", "--config", str(tiny_config), "--trainer.default_root_dir", str(tmp_path / "fit"))
    assert code == 0, err
    ckpt = tiny_config.parent / "run" / "last.ckpt"
    np.save(tmp_path / "q.npy", np.zeros((2, 1, 8, 8), np.float32))
    try:
        code, err = cli(capsys, "attribute", "--ckpt", str(ckpt), "--method", "tests.test_cli:Brightest", "--scale", "2",
                        "--queries", str(tmp_path / "q.npy"), "--out", str(tmp_path / "out"))  # fmt: skip
        assert code == 0, err
    finally:
        ATTRIBUTORS.pop("brightest", None)
    images = DigitsDataModule().images
    np.testing.assert_allclose(np.load(tmp_path / "out" / "scores.npy")[1], images.mean((1, 2, 3)).numpy() * 2, rtol=1e-6)
    assert json.loads((tmp_path / "out" / "topk.json").read_text())["unit"] == "mean brightness x scale"
    code, err = cli(capsys, "attribute", "--ckpt", str(ckpt), "--method", "tests.test_cli:Nothing", "--queries", str(tmp_path / "q.npy"), "--out", str(tmp_path / "x"))
    assert code == 2 and "cannot import --method 'tests.test_cli.Nothing'" in err and err.count("\n") == 1, err
