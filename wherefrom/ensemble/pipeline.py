"""diffusers interop for encoded ensembles: ``EncodedEnsemblePipeline`` (members + codes + scheduler).

    pipe = EncodedEnsemblePipeline.from_module(ensemble)          # a trained EncodedEnsemble
    pipe.save_pretrained("ens")                                   # model_index.json, ensemble/, scheduler/
    pipe = EncodedEnsemblePipeline.from_pretrained("ens")
    images = pipe(8, generator=0, ablate=[17, 42]).images         # exact ablation of training images 17 and 42

Sampling runs wherefrom's chain with fixed exogenous noise (:class:`~wherefrom.ensemble.EnsembleSampler`),
so a pipeline gives exactly the samples of the Lightning checkpoint it came from, ablated or not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn

from wherefrom.ensemble.codes import Codes, bits_from_masks, masks_from_bits
from wherefrom.ensemble.sampler import EnsembleSampler
from wherefrom.errors import WherefromError
from wherefrom.model import image_shape
from wherefrom.sampling import SchedulerType
from wherefrom.task import DiffusionTask


class EnsembleDenoiser(ModelMixin, ConfigMixin):
    """The ``n`` members of an encoded ensemble (UNets of one config) and their codes, as one diffusers model.

    Codes are stored in the config: ``code_indices`` (global training indices), ``code_masks``
    (each index's code as an integer bit mask, bit ``i`` = member ``i``) and optional ``code_groups``.
    """

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        n: int,
        w: int,
        code_indices: list[int] | None = None,
        code_masks: list[int] | None = None,
        code_groups: list[int] | None = None,
        data_fingerprint: str = "",
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList([UNet2DModel(**unet_config) for _ in range(n)])

    @property
    def codes(self) -> Codes | None:
        cfg = self.config
        if cfg.code_indices is None:
            return None
        bits = bits_from_masks(cfg.code_masks, cfg.n)
        groups = None if cfg.code_groups is None else np.asarray(cfg.code_groups, dtype=np.int64)
        return Codes(bits, np.asarray(cfg.code_indices, dtype=np.int64), cfg.w, cfg.data_fingerprint, groups)


class EncodedEnsemblePipeline(DiffusionPipeline):
    """Sample an encoded ensemble with diffusers, with exact ablation (``ablate``) or any member ``weights``.

    The scheduler says the objective (:meth:`DiffusionTask.from_scheduler`); the chain
    (DDPM or DDIM for the DDPM family, Euler for flow matching, Euler or Heun for EDM; ``steps``) is wherefrom's, whose exogenous noise is fixed by ``(seed, query, step)``.
    """

    def __init__(self, ensemble: EnsembleDenoiser, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(ensemble=ensemble, scheduler=scheduler)

    @classmethod
    def from_module(cls, module: Any) -> EncodedEnsemblePipeline:
        """The pipeline of a trained :class:`~wherefrom.ensemble.EncodedEnsemble` (all members, with codes)."""
        if getattr(module, "codes", None) is None or module.hparams.member is not None:
            raise WherefromError("a pipeline needs a whole trained ensemble with codes; assemble per-member runs first (`wherefrom ensemble assemble`)")
        if module.is_conditional or not module.hparams.get("clip_sample", True) or module.hparams.get("lora") is not None:
            raise WherefromError("the diffusers pipeline covers unconditional pixel-space ensembles of whole UNets; sample this one with `wherefrom sample`")
        members = list(module.members.values())
        codes = module.codes
        masks = masks_from_bits(codes.bits)
        denoiser = EnsembleDenoiser(
            dict(members[0].config), codes.n, codes.w, codes.indices.tolist(), masks.tolist(),
            None if codes.groups is None else codes.groups.tolist(), codes.data_fingerprint,
        )  # fmt: skip
        for mine, theirs in zip(denoiser.members, members, strict=True):
            mine.load_state_dict(theirs.state_dict())
        scheduler = getattr(module.task.objective, "scheduler", None)
        if scheduler is None:
            raise WherefromError("the diffusers pipeline needs a built-in objective (its diffusers scheduler); sample this one with `wherefrom sample`")
        return cls(denoiser.to(module.dtype), scheduler)

    def sampler(self, seed: int = 0, steps: int = 100, scheduler: str = "auto") -> EnsembleSampler:
        members = list(self.ensemble.members)
        param = next(self.ensemble.parameters())
        task = DiffusionTask.from_scheduler(self.scheduler)
        return EnsembleSampler(members, task, image_shape(members[0]), self.ensemble.codes, seed=seed, steps=steps,
                               scheduler=SchedulerType(scheduler), dtype=param.dtype, device=param.device)  # fmt: skip

    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 1,
        generator: torch.Generator | int | None = None,
        steps: int = 100,
        scheduler: str = "auto",
        ablate: list[int] | None = None,
        weights: Tensor | None = None,
        output_type: str = "pt",
    ) -> ImagePipelineOutput:
        """Samples ``0..num_images-1``: the whole ensemble, without the members that saw ``ablate``
        (exact ablation), or with member ``weights``. ``generator``: the seed (an int, or a
        ``torch.Generator``'s initial seed). ``output_type``: ``pt`` (tensors in [-1, 1]), ``np`` or ``pil``."""
        if ablate is not None and weights is not None:
            raise WherefromError("pass ablate (training indices to remove) or weights (one per member), not both")
        seed = generator.initial_seed() if isinstance(generator, torch.Generator) else int(generator or 0)
        sampler = self.sampler(seed, steps, scheduler)
        if ablate is not None:
            weights = sampler.ablation_weights(list(ablate))
        images = sampler.generate(num_images, weights)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        arrays = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return ImagePipelineOutput(images=arrays)
        if output_type == "pil":
            return ImagePipelineOutput(images=self.numpy_to_pil(arrays))
        raise WherefromError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")


__all__ = ["EncodedEnsemblePipeline", "EnsembleDenoiser"]
