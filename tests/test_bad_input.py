"""Bad input over the whole CLI: exit status 2, one line saying what to do, no traceback,
and nothing lost: every file that existed before the failed command is byte-identical after it."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import cli, tiny_checkpoint
from wherefrom.datamodules import DigitsDataModule
from wherefrom.features import FeatureConfig, featurize
from wherefrom.store import Store

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny checkpoint, its store, and a collection of bad files, under one folder."""
    root = tmp_path_factory.mktemp("bad")
    model, dm = tiny_checkpoint(root)
    featurize(model.unet, "model", model.task, dm, Store(root / "store", dm.fingerprint), FeatureConfig(timesteps=1, proj_dim=32))
    # a copy of the store whose features were truncated (disk full) and one whose manifest was cut short
    for name in ("truncated", "badmanifest"):
        (root / name).mkdir()
        for f in (root / "store").rglob("*"):
            if f.is_file():
                target = root / name / f.relative_to(root / "store")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
    feats = root / "truncated" / "features" / "square_norm" / "model.npy"
    feats.write_bytes(feats.read_bytes()[:-100])
    manifest = root / "badmanifest" / "manifest.json"
    manifest.write_text(manifest.read_text()[:30])
    np.save(root / "queries.npy", dm.images[:2].numpy())
    np.save(root / "wrongshape.npy", np.zeros((2, 3, 8, 8), np.float32))
    nan = dm.images[:3].numpy().copy()
    nan[1, 0, 2, 2] = np.nan
    np.save(root / "nan_queries.npy", nan)
    (root / "truncated.npy").write_bytes((root / "queries.npy").read_bytes()[:90])
    np.save(root / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(root / "nan_scores.npy", np.full((2, 1797), np.nan))
    torch.save(torch.zeros(3), root / "tensor.ckpt")
    (root / "garbage.ckpt").write_bytes(b"\x80\x04not a pickle")
    (root / "words.txt").write_text("1 2 three 4")
    (root / "afile").write_text("not a folder")
    (root / "demo_prev" / "store").mkdir(parents=True)  # a previous demo run's output
    (root / "demo_prev" / ".wherefrom-demo").write_text("demo")
    (root / "demo_prev" / "store" / "manifest.json").write_text("{}")
    (root / "exported").mkdir()
    (root / "exported" / "config.json").write_text('{"mine": true}')
    with open(root / "notes.pkl", "wb") as f:
        pickle.dump({"user": "data"}, f)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# (argv with {root} for the fixture folder, a fragment of the expected message)
CASES = [
    ("frobnicate", "unknown command"),
    ("sample --ckpt {root}/missing.ckpt --out {root}/s", "does not exist"),
    ("sample --ckpt {root}/tensor.ckpt --out {root}/s", "holds a Tensor, not a Lightning checkpoint"),
    ("sample --ckpt {root}/garbage.ckpt --out {root}/s", "cannot read checkpoint"),
    ("sample --ckpt {root}/model.ckpt --steps 0 --out {root}/s", "steps must be in [1, 1000]"),
    ("sample --ckpt {root}/model.ckpt --num-samples 0 --out {root}/s", "--num-samples and --batch-size must be >= 1"),
    ("sample --ckpt {root}/model.ckpt --out {root}/afile", "is a file, not a folder"),
    ("sample --ckpt {root}/model.ckpt --out {root}/afile/sub", "is a file, not a folder"),
    ("sample --ckpt {root}/model.ckpt --ablate 1,2 --out {root}/s", "needs an encoded-ensemble checkpoint"),
    ("sample --ckpt {root}/model.ckpt --bogus 1 --out {root}/s", "unrecognized arguments: --bogus 1; see `wherefrom sample --help`"),
    ("sample --out {root}/s", "the following arguments are required: --ckpt"),
    ("export --ckpt {root}/model.ckpt --out {root}/exported", "is not empty"),
    ("attribute --ckpt {root}/model.ckpt --method nope --out {root}/a", "invalid choice: 'nope'"),
    ("attribute --ckpt {root}/model.ckpt --method dtrak --out {root}/a", "needs --store"),
    ("attribute --ckpt {root}/model.ckpt --method dtrak --exact --out {root}/a", "--exact does not apply to --method dtrak"),
    ("attribute --ckpt {root}/model.ckpt --method kfac --store {root}/a --grads sideways --out {root}/a", "invalid choice: 'sideways'"),
    ("attribute --ckpt {root}/model.ckpt --method dtrak --store {root}/store --queries {root}/truncated.npy --out {root}/a", "not a readable .npy"),
    ("attribute --ckpt {root}/model.ckpt --method dtrak --store {root}/store --queries {root}/pickled.npy --out {root}/a", "not a readable .npy"),
    ("attribute --ckpt {root}/model.ckpt --method dtrak --store {root}/store --queries {root}/wrongshape.npy --out {root}/a", "have shape (3, 8, 8)"),
    ("attribute --ckpt {root}/model.ckpt --method dtrak --store {root}/store --queries {root}/nan_queries.npy --out {root}/a", "1 of 3 images hold NaN (e.g. image 1)"),
    ("attribute --ckpt {root}/model.ckpt --method pixel --steps 0 --out {root}/a", "--num-samples and --steps must be >= 1, got 8 and 0"),
    ("attribute --ckpt {root}/model.ckpt --method pixel --steps 5000 --out {root}/a", "steps must be in [1, 1000], got 5000"),  # no progress line first
    ("attribute --ckpt {root}/model.ckpt --method dtrak --store {root}/truncated --queries {root}/queries.npy --out {root}/a", "truncated"),
    ("attribute --ckpt {root}/model.ckpt --method dtrak --store {root}/badmanifest --queries {root}/queries.npy --out {root}/a", "manifest"),
    ("attribute --ckpt {root}/model.ckpt --method dtrak --store {root}/store --queries {root}/queries.npy --out {root}/afile", "is a file"),
    ("attribute --ckpt {root}/model.ckpt --method trak --store {root}/store --queries {root}/queries.npy --out {root}/a", "no features of output 'loss'"),
    ("featurize --ckpt {root}/model.ckpt --store {root}/truncated --proj-dim 32 --timesteps 1", "with --repair"),
    ("featurize --ckpt {root}/model.ckpt --store {root}/store --proj-dim 64 --timesteps 1", "different config"),
    ("featurize --ckpt {root}/model.ckpt --store {root}/afile", "is a file, not a folder"),
    ("featurize --ckpt {root}/model.ckpt --store {root}/f --proj-dim 0", "projection dimension must be >= 1"),
    ("featurize --ckpt {root}/model.ckpt --store {root}/f --timesteps 0", "timesteps K must be >= 1"),
    ("featurize --ckpt {root}/model.ckpt --store {root}/f --projection bogus", "invalid choice: 'bogus'"),
    ("factors --ckpt {root}/model.ckpt --store {root}/f --batch-size 0", "--batch-size must be >= 1"),
    ("factors --ckpt {root}/model.ckpt --store {root}/f --passes 0", "passes must be >= 1"),
    ("factors --ckpt {root}/model.ckpt --store {root}/badmanifest", "manifest"),
    ("lds score --config {root}/missing.yaml --scores {root}/nan_scores.npy", "does not exist"),
    ("lds score --config " + str(CONFIGS / "lds_digits.yaml") + " --out {root}/l --scores {root}/nan_scores.npy", "non-finite scores"),
    ("lds train --config " + str(CONFIGS / "lds_digits.yaml") + " --out {root}/l --workers 0", "--workers must be >= 1"),
    ("lds frob --config x", "invalid choice: 'frob'"),
    ("lds subsets --config " + str(CONFIGS / "lds_digits.yaml") + " --out {root}/afile", "is a file, not a folder"),
    ("loo --ckpt {root}/model.ckpt --scores {root}/nan_scores.npy --out {root}/o --num-indices 1", "--num-indices must be >= 2"),
    ("fit --config " + str(CONFIGS / "digits.yaml") + " --model.init_args.warmup 1.5", "warmup is a fraction of the training steps"),
    ("fit --config " + str(CONFIGS / "digits.yaml") + " --data.init_args.batch_size 0", "batch_size must be >= 1"),
    ("fit --config " + str(CONFIGS / "digits.yaml") + " --trainer.max_epohs 1", "unrecognized arguments: --trainer.max_epohs 1; see `wherefrom fit --help`"),
    ("fit --config " + str(CONFIGS / "digits_ensemble.yaml") + " --model.init_args.w 16", "code weight w must be in [1, n - 1]"),
    ("fit --config " + str(CONFIGS / "digits_ensemble.yaml") + " --model.init_args.member 16", "member must be in [0, n)"),
    ("fit --config " + str(CONFIGS / "digits_ensemble.yaml") + " --model.init_args.n 1", "number of members n must be in"),
    ("fit --config {root}/missing.yaml", "does not exist"),
    ("fit --config " + str(CONFIGS / "digits.yaml") + " --model.bogus 1", "DiffusionModel takes no option 'bogus' (--model.bogus); see `wherefrom fit --print_config`"),
    # refused in setup, after LightningCLI made its log folder and config.yaml: the folder is removed again ("d" below)
    ("fit --config " + str(CONFIGS / "digits.yaml") + ' --trainer.default_root_dir {root}/d --model.init_args.unet {{"sample_size":16}}', "but the UNet expects (1, 16, 16)"),
    ("fit --config " + str(CONFIGS / "digits_ensemble.yaml") + " --trainer.default_root_dir {root}/d/sub --model.init_args.n 4 --model.init_args.w 2", "distinct codes"),
    ("demo --out {root}/d --num-images 1", "--num-images must be in"),
    ("demo --out {root}/demo_prev --members 4 --code-weight 2", "distinct codes"),  # a previous run's folders survive a typo
    ("demo --out {root}/d --members 4 --code-weight 2", "distinct codes"),
    ("demo --out {root}/d --scheduler bogus", "sampling.scheduler must be one of"),
    ("demo --out {root}/afile", "is a file"),
    ("demo --out {root}/exported --tiny", "holds files the demo did not write"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[c[0].split(" --")[0] + f"#{i}" for i, c in enumerate(CASES)])
def test_bad_input_gets_one_line_exit_2_and_loses_nothing(world, capsys, argv, message):
    before = _snapshot(world)
    code, err = cli(capsys, *argv.format(root=world).split())
    lines = [line for line in err.splitlines() if line.strip() and not _noise(line)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("wherefrom ") and message in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(world) == before  # nothing that existed was changed, deleted or appended to
    for made in ("s", "a", "f", "o", "d", "l"):  # and no output folder was started
        assert not (world / made).exists()


def _noise(line: str) -> bool:
    """Lightning's banner lines (seed, accelerator) on stderr, not part of our message."""
    return line.startswith(("Seed set to", "GPU available", "TPU available", "HPU available", "💡", "Restoring states"))


def test_fit_with_a_missing_ckpt_path_is_one_line_and_leaves_nothing(world, capsys, tmp_path):
    code, err = cli(capsys, "fit", "--config", str(CONFIGS / "digits.yaml"), "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
                    "--trainer.callbacks", "[]", "--ckpt_path", str(world / "missing.ckpt"))  # fmt: skip
    assert code == 2 and "pass an existing checkpoint to --ckpt_path" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # LightningCLI had written run/lightning_logs/version_0/config.yaml and an event file


def test_subset_file_with_a_word_is_one_line(world):
    from wherefrom.errors import WherefromError

    with pytest.raises(WherefromError, match="must hold integer indices"):
        DigitsDataModule(subset=str(world / "words.txt")).setup()


def test_queries_as_users_hold_them(tmp_path):
    """Issue 38 (items 4-6): an .npz of one array or of 'images', a single RGB image without its batch
    dimension (named), and [0, 1] floats as ToTensor makes them (a warning that names the rescale)."""
    from wherefrom.cli.options import load_queries
    from wherefrom.datamodules import ArrayDataModule
    from wherefrom.errors import WherefromError

    rgb = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "train.npy", rgb)
    dm = ArrayDataModule(str(tmp_path / "train.npy"))
    dm.setup()
    expected = torch.from_numpy(rgb[:2]).float() / 127.5 - 1
    np.savez(tmp_path / "one.npz", rgb[:2])
    np.savez(tmp_path / "named.npz", images=rgb[:2], labels=np.arange(2))
    for name in ("one.npz", "named.npz"):
        torch.testing.assert_close(load_queries(str(tmp_path / name), dm), expected, rtol=0, atol=0)
    np.savez(tmp_path / "two.npz", a=rgb, b=rgb)
    with pytest.raises(WherefromError, match=r"holds arrays \['a', 'b'\]; keep one array or name the images 'images' \(np.savez\(path, images=x\)\)$"):
        load_queries(str(tmp_path / "two.npz"), dm)
    np.save(tmp_path / "single.npy", rgb[0])
    with pytest.raises(WherefromError, match=r"have shape \(1, 16, 16\) but the training images are \(3, 16, 16\); one image\? add the batch dimension \(x\[None\], 1 x 3 x 16 x 16\)$"):
        load_queries(str(tmp_path / "single.npy"), dm)
    np.save(tmp_path / "unit.npy", rgb[:2].astype(np.float32) / 255)
    with pytest.warns(UserWarning, match=r"no value is below 0, but the training images reach -1; .*rescale them: x \* 2 - 1"):
        load_queries(str(tmp_path / "unit.npy"), dm)


def test_images_as_queries(world, tmp_path, capsys):
    """Issue 38, item 7: `--queries sample.png` said "not a readable .npy/.npz array"; image files, several of
    them and folders are now read as the training folder is (its mode and size), and score as the array does."""
    from PIL import Image

    from wherefrom.cli.options import load_queries
    from wherefrom.errors import WherefromError

    root = world
    digits = np.load(root / "queries.npy")  # 2 x 1 x 8 x 8 in [-1, 1]
    pixels = np.round((digits[:, 0] + 1) * 127.5).astype(np.uint8)
    (tmp_path / "folder" / "nested").mkdir(parents=True)
    for i, px in enumerate(pixels):
        Image.fromarray(px, mode="L").save(tmp_path / f"q{i}.png")
        Image.fromarray(px, mode="L").convert("RGB").save(tmp_path / "folder" / "nested" / f"q{i}.png")  # read in the model's mode
    np.save(tmp_path / "same.npy", pixels[:, None])
    dm = DigitsDataModule()
    expected = load_queries(str(tmp_path / "same.npy"), dm)
    for spec in ([str(tmp_path / "q0.png"), str(tmp_path / "q1.png")], [str(tmp_path / "folder")]):
        torch.testing.assert_close(load_queries(spec, dm), expected, rtol=0, atol=0)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(WherefromError, match=r"are 16 x 16 but the training images are 8 x 8; resize them"):
        load_queries([str(tmp_path / "big.png")], dm)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(WherefromError, match=r"is neither an image .*, a folder of images, a .npy/.npz array nor 'val'$"):
        load_queries([str(tmp_path / "notes.txt")], dm)
    scores = {}
    for name, spec in (("png", [str(tmp_path / "q0.png"), str(tmp_path / "q1.png")]), ("npy", [str(tmp_path / "same.npy")])):
        code, err = cli(capsys, "attribute", "--ckpt", str(root / "model.ckpt"), "--method", "pixel", "--queries", *spec, "--out", str(tmp_path / name))
        assert code == 0, err
        scores[name] = np.load(tmp_path / name / "scores.npy")
    np.testing.assert_array_equal(scores["png"], scores["npy"])
