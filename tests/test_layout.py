"""The layout's rules (issue 23): the library never reaches up into the command line, the rooms'
import graph has no circle, the attribution package imports eagerly on its own, and a store's
messages name the options of the front end that opened it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from tests.helpers import SUBSET, TINY_UNET, cli, tiny_checkpoint
from wherefrom.callbacks import TRAKFeatures
from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import FingerprintMismatchError
from wherefrom.model import DiffusionModel
from wherefrom.store import Store

PACKAGE = Path(__file__).resolve().parent.parent / "wherefrom"
ENTRY_POINTS = {"wherefrom.__main__"}  # `python -m wherefrom`: the command line's second entry point


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every wherefrom module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base) if node.level else node.module
            targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _room(name: str, modules: dict[str, Path]) -> str:
    """A top-level module is a room of its own; a module in a subpackage belongs to the subpackage's room."""
    parent = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
    return name if parent == "wherefrom" else parent


def test_no_library_module_imports_the_command_line():
    modules = _modules()
    offenders = sorted(
        (name, target)
        for name, path in modules.items()
        if not name.startswith("wherefrom.cli") and name not in ENTRY_POINTS
        for target in _imports(name, path, modules)
        if target == "wherefrom.cli" or target.startswith("wherefrom.cli.")
    )
    assert offenders == []
    # nor runs it: no library module spawns `python -m wherefrom.cli`
    assert [n for n, p in modules.items() if not n.startswith("wherefrom.cli") and '"wherefrom.cli"' in p.read_text()] == []


def test_the_rooms_import_graph_has_no_circle():
    modules = _modules()
    rooms: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name in ENTRY_POINTS or name == "wherefrom":  # the package face imports every room
            continue
        room = _room(name, modules)
        for target in _imports(name, path, modules):
            other = _room(target, modules)
            if other not in (room, "wherefrom") and not other.startswith(room + "."):
                rooms.setdefault(room, set()).add(other)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)) for nxt in rooms.get(start, ()))

    circles = sorted((a, b) for a, targets in rooms.items() for b in targets if reaches(b, a, set()))
    assert circles == [], f"arrows that lie on a circle: {circles}"


def test_the_attribution_package_imports_eagerly_on_its_own():
    code = "import wherefrom.attribution as a; missing = [n for n in a.__all__ if n not in vars(a)]; assert not missing, missing; assert '__getattr__' not in vars(a)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_store_conflict_names_the_options_of_the_front_end_that_opened_it(tmp_path, capsys):
    tiny_checkpoint(tmp_path)
    other = tmp_path / "store"
    Store(other, "another-dataset")  # a store made for other data
    with pytest.raises(FingerprintMismatchError, match=r"point Store\(root=\.\.\.\) at a new folder or pass Store\(overwrite=True\)"):
        Store(other, "this-dataset")
    code, err = cli(capsys, "featurize", "--ckpt", str(tmp_path / "model.ckpt"), "--store", str(other), "--proj-dim", "16", "--timesteps", "1")
    assert code == 2 and "point --store at a new folder or pass --overwrite to replace it" in err and "Store(" not in err, err
    module, data = DiffusionModel(unet=dict(TINY_UNET), lr=1e-3, warmup=0.0), DigitsDataModule(batch_size=8, subset=SUBSET)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[TRAKFeatures(str(other), timesteps=1, proj_dim=16)])  # fmt: skip
    with pytest.raises(FingerprintMismatchError, match=r"point TRAKFeatures\(store=\.\.\.\) at a new folder or pass TRAKFeatures\(overwrite=True\)"):
        trainer.fit(module, data)
    assert Store.open(other).manifest["fingerprint"] == "another-dataset"  # nothing was replaced


def test_every_front_end_offers_every_option_of_its_config():
    """The configs are the one source of each option: the commands derive their flags from the fields, and
    the callbacks (whose ``__init__`` LightningCLI reads) list every field with the config's default."""
    from wherefrom.callbacks import KFACFactors
    from wherefrom.cli.factors import INFLUENCE_FLAGS
    from wherefrom.cli.featurize import parser as featurize_parser
    from wherefrom.features import FeatureConfig
    from wherefrom.kfac.fit import FactorConfig
    from wherefrom.kfac.stored import InfluenceConfig

    chosen_later = {"output", "projector", "curvature"}  # by the method, the device, the mode when not given
    for callback, configs in ((TRAKFeatures, [(FeatureConfig, {})]), (KFACFactors, [(FactorConfig, {}), (InfluenceConfig, INFLUENCE_FLAGS)])):
        params = inspect.signature(callback).parameters
        for config, names in configs:
            for f in dataclasses.fields(config):
                name = names.get(f.name, f.name)
                assert name in params, f"{callback.__name__} lacks {config.__name__}.{f.name}"
                assert f.name in chosen_later or params[name].default == f.default, (callback.__name__, name)
    flags = {a.dest for a in featurize_parser()._actions}
    assert {f.name for f in dataclasses.fields(FeatureConfig)} - {"output", "projector"} <= flags
