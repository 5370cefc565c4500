"""``wherefrom sample`` and ``wherefrom export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wherefrom.cli.options import (
    add_batch_size,
    add_overwrite,
    add_run,
    add_sampling,
    open_module,
    query_conditions,
)
from wherefrom.cli.parser import ConfigArgumentParser
from wherefrom.errors import WherefromError


def load_sampler_module(a: Any, owner: str):
    """A module with ``generate``/``task`` from :func:`~wherefrom.cli.options.add_run`'s options: a
    diffusers export folder, a wherefrom checkpoint, or any Lightning run's (its single network)."""
    from wherefrom.checkpoint import load_pretrained
    from wherefrom.model import DiffusionModel

    if Path(a.ckpt).is_dir():
        unet, task = load_pretrained(a.ckpt)
        config = dict(unet.config)
        classes = config.pop("num_class_embeds", None)  # a class-conditional export: the classes and the null class
        schedule = {k: v for k, v in task.config.items() if k != "measure_time"}
        module = DiffusionModel(unet=config, num_classes=None if classes is None else classes - 1, **schedule)
        module.unet.load_state_dict(unet.state_dict())
        return module.eval()
    return open_module(a, owner)


def run_data(ckpt: str):
    """The datamodule a wherefrom checkpoint records (``None`` for an export folder or a foreign checkpoint)."""
    from wherefrom.checkpoint import DATAMODULE_KEY, load_datamodule, read_checkpoint

    return load_datamodule(ckpt) if Path(ckpt).is_file() and DATAMODULE_KEY in read_checkpoint(ckpt) else None


def sample_main(argv: list[str]) -> None:
    from wherefrom.io import check_out_dir, save_grid, write_npy
    from wherefrom.sampling import sampling_plan

    p = ConfigArgumentParser(prog="wherefrom sample", description="Generate samples with fixed, seeded noise.")
    add_run(p, "a .ckpt from `wherefrom fit` or any Lightning run, or a diffusers export folder", data=False)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--out", required=True, help="output folder (samples.png, samples.npy)")
    add_sampling(p)
    add_batch_size(p, 256)
    p.add_argument("--ablate", default=None, help="ensembles only: comma-separated training indices to ablate exactly")
    a = p.parse_args(argv)
    if a.num_samples < 1 or a.batch_size < 1:
        raise WherefromError(f"--num-samples and --batch-size must be >= 1, got {a.num_samples} and {a.batch_size}")
    check_out_dir(a.out, "--out")
    module, data = load_sampler_module(a, "wherefrom sample"), run_data(a.ckpt)
    decode = getattr(data, "decode", lambda x: x)  # how the samples look: a latent model's VAE decodes them
    sampling_plan(module.task, a.steps, a.scheduler)  # validates --steps and --scheduler before anything is drawn
    kwargs = {}
    if a.ablate:
        if not hasattr(module, "ablation_weights"):
            raise WherefromError("--ablate needs an encoded-ensemble checkpoint; this one is a single model")
        try:
            ablate = [int(i) for i in a.ablate.split(",")]
        except ValueError:
            raise WherefromError(f"--ablate takes comma-separated training indices like 17,42, got {a.ablate!r}") from None
        kwargs["weights"] = module.ablation_weights(ablate)
    if a.labels is not None or a.captions is not None or a.guidance != 1.0:
        kwargs.update(query_conditions(a, data, a.num_samples))
    images = module.generate(a.num_samples, seed=a.seed, steps=a.steps, scheduler=a.scheduler, batch_size=a.batch_size, progress=True, **kwargs)
    out = Path(a.out)
    write_npy(out / "samples.npy", images.numpy().astype("float32"))  # what the model made (a latent model's latents)
    save_grid(decode(images), out / "samples.png")
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npy'}")


def export_main(argv: list[str]) -> None:
    from wherefrom.checkpoint import save_pretrained
    from wherefrom.io import check_out_dir
    from wherefrom.target import Target

    p = ConfigArgumentParser(prog="wherefrom export", description="Export a single model's UNet (diffusers format).")
    add_run(p, "a .ckpt from `wherefrom fit` or any Lightning run", data=False)
    p.add_argument("--out", required=True, help="a new or empty folder")
    add_overwrite(p, "write into a non-empty --out (replacing same-named files)")
    a = p.parse_args(argv)
    out = check_out_dir(a.out, "--out")
    if out.is_dir() and any(out.iterdir()) and not a.overwrite:
        raise WherefromError(f"--out {a.out!r} is not empty; export into a new folder or pass --overwrite")
    module = load_sampler_module(a, "wherefrom export")
    if isinstance(module, Target) and len(module.networks) == 1:  # a Lightning run's own network (or --denoiser's)
        save_pretrained(next(iter(module.networks.values())), module.task, out)
        print(f"wrote diffusers UNet to {a.out}")
        return
    if not hasattr(module, "save_pretrained"):
        raise WherefromError("only single-model checkpoints export to one diffusers UNet; pick one network with --denoiser, e.g. members.member0")
    module.save_pretrained(out)
    print(f"wrote {'LoRA adapter' if module.hparams.get('lora') else 'diffusers UNet'} to {a.out}")
