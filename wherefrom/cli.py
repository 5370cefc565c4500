"""``wherefrom`` command line.

``fit`` (and Lightning's ``validate``/``test``/``predict``) go through
LightningCLI, so YAML configs, ``--print_config`` and class paths for
``--model``/``--data`` work as in any Lightning project. The other commands
are small argparse programs registered in :data:`COMMANDS`. Bad input raises
:class:`~wherefrom.errors.WherefromError`; ``main`` prints its one-line message
and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

from wherefrom.errors import ConfigArgumentParser, WherefromError, one_line

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# name -> ("module:function", one-line help); each function takes its argv list.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("wherefrom.cli:sample_main", "generate samples from a checkpoint"),
    "export": ("wherefrom.cli:export_main", "export a checkpoint's UNet in diffusers format"),
    "featurize": ("wherefrom.attribution.features:featurize_main", "TRAK / D-TRAK features of a run into a store"),
    "factors": ("wherefrom.attribution.kfac.command:factors_main", "K-FAC / EK-FAC factors of a run into a store"),
    "attribute": ("wherefrom.attribution.cli:attribute_main", "score training images' influence on queries"),
    "lds": ("wherefrom.evaluation.cli:lds_main", "linear datamodelling score: subsets, train, measure, score"),
    "counterfactual": ("wherefrom.evaluation.cli:counterfactual_main", "retrain without each query's top influences and compare"),
    "loo": ("wherefrom.evaluation.cli:loo_main", "grade methods against an encoded ensemble's exact leave-one-out"),
    "demo": ("wherefrom.demo:main", "run the end-to-end demo on the embedded digits"),
    "ensemble": ("wherefrom.ensemble.cli:main", "encoded ensembles: `ensemble assemble --members CKPT... --out CKPT`"),
}


def _ours(error: BaseException) -> WherefromError | None:
    """The WherefromError in an exception's chain (jsonargparse wraps constructor errors)."""
    while error is not None:
        if isinstance(error, WherefromError):
            return error
        error = error.__cause__ or error.__context__
    return None


def lightning_main(argv: list[str]) -> None:
    """LightningCLI; its parse errors, our constructors' errors and a missing
    ``--ckpt_path`` become one-line :class:`WherefromError` s."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    try:
        with warnings.catch_warnings():  # argv is passed explicitly (main, in-process tests, the LDS recipe)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            LightningCLI(
                L.LightningModule,
                L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=argv,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
            )
    except WherefromError:
        raise
    except argparse.ArgumentError as e:
        cmd = argv[0] if argv and not argv[0].startswith("-") else "fit"
        raise WherefromError(f"{one_line(e, 1000)}; see `wherefrom {cmd} --help`") from None
    except FileNotFoundError as e:
        raise WherefromError(f"{e}; pass an existing checkpoint to --ckpt_path (or drop it to start from scratch)") from None
    except ValueError as e:  # jsonargparse wraps the errors of our constructors
        ours = _ours(e)
        if ours is None:
            raise
        raise ours from None


def load_sampler_module(ckpt: str):
    """A module with ``eps_fn``/``task``/``image_shape`` from a .ckpt or a diffusers export folder."""
    from wherefrom.checkpoint import load_module, load_pretrained
    from wherefrom.model import DiffusionModel

    if Path(ckpt).is_dir():
        unet, task = load_pretrained(ckpt)
        module = DiffusionModel(unet=dict(unet.config), **{k: v for k, v in task.config.items() if k != "measure_time"})
        module.unet.load_state_dict(unet.state_dict())
        return module.eval()
    return load_module(ckpt)


def sample_main(argv: list[str]) -> None:
    from wherefrom.io import check_out_dir, save_grid, write_npy
    from wherefrom.sampling import SchedulerType, sampling_timesteps

    p = ConfigArgumentParser(prog="wherefrom sample", description="Generate samples with fixed, seeded noise.")
    p.add_argument("--ckpt", required=True, help="a .ckpt from `wherefrom fit` or a diffusers export folder")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (samples.png, samples.npy)")
    p.add_argument("--steps", type=int, default=100, help="denoising steps")
    p.add_argument("--scheduler", choices=[s.value for s in SchedulerType], default="ddpm")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ablate", default=None, help="ensembles only: comma-separated training indices to ablate exactly")
    a = p.parse_args(argv)
    if a.num_samples < 1 or a.batch_size < 1:
        raise WherefromError(f"--num-samples and --batch-size must be >= 1, got {a.num_samples} and {a.batch_size}")
    check_out_dir(a.out)
    module = load_sampler_module(a.ckpt)
    sampling_timesteps(module.task, a.steps)  # validates --steps before anything is drawn
    kwargs = {}
    if a.ablate:
        if not hasattr(module, "ablation_weights"):
            raise WherefromError("--ablate needs an encoded-ensemble checkpoint; this one is a single model")
        try:
            ablate = [int(i) for i in a.ablate.split(",")]
        except ValueError:
            raise WherefromError(f"--ablate takes comma-separated training indices like 17,42, got {a.ablate!r}") from None
        kwargs["weights"] = module.ablation_weights(ablate)
    images = module.generate(a.num_samples, seed=a.seed, steps=a.steps, scheduler=a.scheduler, batch_size=a.batch_size, progress=True, **kwargs)
    out = Path(a.out)
    write_npy(out / "samples.npy", images.numpy().astype("float32"))
    save_grid(images, out / "samples.png")
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npy'}")


def export_main(argv: list[str]) -> None:
    from wherefrom.io import check_out_dir

    p = ConfigArgumentParser(prog="wherefrom export", description="Export a single model's UNet (diffusers format).")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (replacing same-named files)")
    a = p.parse_args(argv)
    out = check_out_dir(a.out)
    if out.is_dir() and any(out.iterdir()) and not a.overwrite:
        raise WherefromError(f"--out {a.out!r} is not empty; export into a new folder or pass --overwrite")
    module = load_sampler_module(a.ckpt)
    if not hasattr(module, "save_pretrained"):
        raise WherefromError("only single-model checkpoints export to one diffusers UNet")
    module.save_pretrained(out)
    print(f"wrote diffusers UNet to {a.out}")


def _usage() -> str:
    lines = ["usage: wherefrom COMMAND [options]", "", "commands:"]
    lines += [f"  {c:<12} LightningCLI {c} (--config YAML, --print_config)" for c in LIGHTNING_COMMANDS[:1]]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd in LIGHTNING_COMMANDS:
            lightning_main(argv)
        elif cmd in COMMANDS:
            mod, _, fn = COMMANDS[cmd][0].partition(":")
            getattr(importlib.import_module(mod), fn)(rest)
        else:
            raise WherefromError(f"unknown command {cmd!r}; run `wherefrom --help` for the list")
    except WherefromError as e:
        print(f"wherefrom {cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
