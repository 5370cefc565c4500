"""The capture callbacks and attributions report to the Trainer's loggers: scalars to every logger
(CSV here), top-k grids to TensorBoard (read back from its event file)."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import TINY_UNET
from wherefrom.attribution.baseline import Pixel
from wherefrom.attribution.report import log_attribution
from wherefrom.callbacks import KFACFactors, TRAKFeatures
from wherefrom.datamodules import DigitsDataModule
from wherefrom.model import DiffusionModel


def test_callbacks_and_attribution_log_to_the_trainers_loggers(tmp_path):
    dm = DigitsDataModule(batch_size=8, subset=list(range(16)))
    csv_logger, tb_logger = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    callbacks = [TRAKFeatures(str(tmp_path / "store"), timesteps=1, proj_dim=16), KFACFactors(str(tmp_path / "store"), passes=1)]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=[csv_logger, tb_logger], callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = DiffusionModel(unet=TINY_UNET, lr=1e-3)
    trainer.fit(model, dm)

    result = Pixel().attribute(model, dm, dm.images[[20, 30]])
    log_attribution(trainer.loggers, result, dm.images, top_k=3, step=1)
    for logger in trainer.loggers:
        logger.finalize("success")

    rows = list(csv.DictReader(open(csv_logger.log_dir + "/metrics.csv")))
    logged = {k: float(v) for row in rows for k, v in row.items() if v != "" and k.startswith("wherefrom/")}
    assert logged["wherefrom/features/model"] == 16.0
    assert logged["wherefrom/factors/model/images"] == 16.0 and logged["wherefrom/factors/model/layers"] > 5
    top = result.topk(3)[1]
    assert np.isclose(logged["wherefrom/pixel/top1_score"], top[:, 0].mean()) and logged["wherefrom/pixel/queries"] == 2.0

    events = EventAccumulator(tb_logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("wherefrom/pixel/topk")
    # two rows of (query + 3 training images), 8x8 digits with 1-pixel padding, upscaled 4x
    assert (image.height, image.width) == (4 * (2 * 9 + 1), 4 * (4 * 9 + 1)) and image.step == 1
    assert "wherefrom/features/model" in events.Tags()["scalars"]
