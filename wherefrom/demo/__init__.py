"""The demo (``wherefrom demo``): the whole pipeline on the embedded digits, checked by its own numbers.

1. Train an encoded ensemble on ``num_images`` digits drawn at random (the rest are
   held out) with ``wherefrom fit`` from a generated LightningCLI config: the drop-in
   callbacks capture TRAK / D-TRAK features and K-FAC factors during the same fit,
   on ``devices`` CPU processes (DDP, gloo).
2. Queries: ``num_samples`` of the ensemble's samples (fixed exogenous noise) and
   ``real_queries`` held-out real digits. A digit classifier (:mod:`wherefrom.evaluation.quality`)
   says how many samples are recognisable digits.
3. Attribute both query sets with every registered attributor through the Python API
   (:data:`wherefrom.attribution.ATTRIBUTORS`), writing ``DIR/methods/<set>/<method>/``.
4. Evaluate without retraining (:mod:`wherefrom.evaluation.removal`): remove each query's
   top-``removal_k`` training images from the ensemble (drop every member that saw one)
   and measure the exact rise of the query's loss and, for samples, how far the sample
   moves, against ``removal_k`` random images; optionally an LDS over ``lds_subsets``
   retrained halves.
5. ``DIR/report.md``: which method won and by how much, every figure with its 95% interval,
   the sample-quality fractions, top-k and counterfactual grids, and the time per stage; beside
   it ``DIR/report/<set>/index.html``, every method's top-k side by side, query by query.

The defaults take under 10 minutes on 2 idle CPU cores; the size options scale it up
to the LDS benchmark (``num_images=500, lds_subsets=64, ...``), :data:`TINY` shrinks it to
seconds (tests).

Rooms: :mod:`~wherefrom.demo.config` (options and the configs they make), :mod:`~wherefrom.demo.run`
(the run), :mod:`~wherefrom.demo.report` (the verdict, figures and files).
"""

from wherefrom.demo.config import TINY, DemoConfig
from wherefrom.demo.run import run

__all__ = ["DemoConfig", "TINY", "run"]
