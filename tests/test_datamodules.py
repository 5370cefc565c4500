"""Datamodules: global indices, subset/exclude, fingerprints, every source and its errors."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from wherefrom.attribution.baseline import Pixel
from wherefrom.attribution.report import write_attribution
from wherefrom.datamodules import ArrayDataModule, CIFAR10DataModule, DigitsDataModule, FolderDataModule
from wherefrom.errors import WherefromError


def _all_batches(dm):
    batches = list(dm.train_dataloader())
    return torch.cat([b["index"] for b in batches]), torch.cat([b["image"] for b in batches])


def test_digits_indices_are_unique_stable_and_in_range():
    dm = DigitsDataModule(batch_size=100)
    idx, img = _all_batches(dm)
    assert len(idx) == 1797 and torch.equal(idx.sort().values, torch.arange(1797))
    assert img.shape[1:] == (1, 8, 8) and img.min() >= -1 and img.max() <= 1 and img.dtype == torch.float32
    # the image of each index is the same whatever the shuffle
    for i, x in zip(idx[:50].tolist(), img[:50]):
        assert torch.equal(dm.images[i], x)
    from sklearn.datasets import load_digits

    assert torch.allclose(dm.images[10, 0], torch.tensor(load_digits().images[10] / 8 - 1, dtype=torch.float32))


def test_subset_and_exclude_select_exactly(tmp_path):
    np.save(tmp_path / "sub.npy", np.array([9, 3, 5, 7, 1]))
    (tmp_path / "exc.txt").write_text("4\n0")
    dm = DigitsDataModule(batch_size=2, subset=str(tmp_path / "sub.npy"), exclude=str(tmp_path / "exc.txt"))
    idx, img = _all_batches(dm)
    assert sorted(idx.tolist()) == [1, 3, 5, 7, 9]
    assert torch.equal(img[idx.argsort()], dm.images[[1, 3, 5, 7, 9]])
    dm = DigitsDataModule(batch_size=500, exclude=str(tmp_path / "exc.txt"))
    assert sorted(_all_batches(dm)[0].tolist()) == [1, 2, 3] + list(range(5, 1797))


def test_fingerprint_tracks_the_split():
    base = DigitsDataModule().fingerprint
    assert DigitsDataModule(batch_size=7, shuffle=False).fingerprint == base
    fps = {base, DigitsDataModule(exclude=[3]).fingerprint, DigitsDataModule(subset=[1, 2]).fingerprint, DigitsDataModule(val_size=10).fingerprint}
    assert len(fps) == 4
    assert DigitsDataModule(subset=[2, 1]).fingerprint == DigitsDataModule(subset=[1, 2]).fingerprint


def test_val_split_is_held_out():
    dm = DigitsDataModule(val_size=97)
    assert dm.num_images == 1700 and len(dm.val_images) == 97
    assert torch.equal(dm.val_images[0], DigitsDataModule().images[1700])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(subset=[0, 1797]), "outside"),
        (dict(exclude=[-1]), "outside"),
        (dict(subset=[1, 1]), "more than once"),
        (dict(subset=[1, 2], exclude=[2]), "both subset and exclude"),
        (dict(subset=[1], exclude=[1]), "both subset and exclude"),
        (dict(subset="/nonexistent/indices.npy"), "does not exist"),
        (dict(val_size=1797), "leaves no training images"),
    ],
)
def test_bad_splits(kwargs, match):
    with pytest.raises(WherefromError, match=match):
        DigitsDataModule(**kwargs).setup()


def test_array_source_and_range_checks(tmp_path):
    u8 = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=u8)
    dm = ArrayDataModule(str(tmp_path / "a.npz"))
    assert torch.allclose(dm.images, torch.tensor(u8).float() / 127.5 - 1)
    np.save(tmp_path / "gray.npy", np.zeros((4, 5, 5), np.float32))
    assert ArrayDataModule(str(tmp_path / "gray.npy")).image_shape == (1, 5, 5)
    cases = {
        "range.npy": (np.full((2, 1, 4, 4), 3.0, np.float32), "must be in \\[-1, 1\\]"),
        "last.npy": (np.zeros((2, 4, 4, 3), np.float32), "channels-last"),
        "chan.npy": (np.zeros((2, 5, 4, 4), np.float32), "1 or 3 channels"),
        "dims.npy": (np.zeros((2, 4), np.float32), "N x C x H x W"),
        "ints.npy": (np.zeros((2, 1, 4, 4), np.int32), "uint8"),
    }
    for name, (arr, match) in cases.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(WherefromError, match=match):
            ArrayDataModule(str(tmp_path / name)).setup()
    with pytest.raises(WherefromError, match="no array 'x'"):
        ArrayDataModule(str(tmp_path / "a.npz"), key="x").setup()
    with pytest.raises(WherefromError, match="does not exist"):
        ArrayDataModule(str(tmp_path / "missing.npy")).setup()


def test_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "sub").mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / ("sub" if i == 2 else ".") / f"img{i}.png")
    dm = FolderDataModule(str(tmp_path))
    assert dm.image_shape == (3, 6, 6)
    assert torch.allclose(dm.images[0], torch.tensor(arrays[0]).permute(2, 0, 1).float() / 127.5 - 1)
    # topk.json names each training image by its file under the folder
    assert dm.image_names() == ["img0.png", "img1.png", "sub/img2.png"]
    result = Pixel().attribute(None, dm, dm.images[[2, 0]])
    write_attribution(tmp_path / "out", result, dm.images, top_k=2)
    rows = json.loads((tmp_path / "out" / "topk.json").read_text())["queries"]
    assert [r["names"][0] for r in rows] == ["sub/img2.png", "img0.png"] and all(len(r["names"]) == 2 for r in rows)
    shutil.rmtree(tmp_path / "out")  # its topk.png is no training image
    assert FolderDataModule(str(tmp_path), mode="L").image_shape == (1, 6, 6)
    Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(WherefromError, match="different sizes"):
        FolderDataModule(str(tmp_path)).setup()
    assert FolderDataModule(str(tmp_path), image_size=4).image_shape == (3, 4, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WherefromError, match="has no images"):
        FolderDataModule(str(tmp_path / "empty")).setup()
    with pytest.raises(WherefromError, match="does not exist"):
        FolderDataModule(str(tmp_path / "nope")).setup()


def test_cifar10_from_local_folder(tmp_path, monkeypatch):
    with pytest.raises(WherefromError, match="cifar-10-batches-py"):
        CIFAR10DataModule(str(tmp_path)).setup()
    # a torchvision-format folder with tiny batches, read by torchvision's real loader
    from torchvision.datasets import CIFAR10

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        data[name] = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({"data": data[name], "labels": [0, 1]}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # torchvision checks md5 sums of the real files; ours differ, so it must raise our clear error
    with pytest.raises(WherefromError, match="no CIFAR-10"):
        CIFAR10DataModule(str(tmp_path)).setup()
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    dm = CIFAR10DataModule(str(tmp_path))
    first = data["data_batch_1"][0].reshape(3, 32, 32)
    assert dm.num_images == 10 and dm.image_shape == (3, 32, 32)
    assert torch.allclose(dm.images[0], torch.tensor(first).float() / 127.5 - 1)
