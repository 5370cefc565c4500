"""Evaluating attributions: LDS, retraining without the top influences, the encoded
ensemble's exact leave-one-out, and image distances.

- benchmark config and retraining recipe: :class:`Benchmark`
- LDS (Park et al. 2023): :mod:`wherefrom.evaluation.lds`, :class:`LinearDatamodelingScore`
- leave-one-out: :func:`leave_one_out`
- distances: :func:`l2_distance`, :class:`LPIPSDistance`, :class:`ImageDistance`
- statistics they share (Spearman rows, bootstrap intervals): :mod:`wherefrom.evaluation.stats`
"""

from wherefrom.evaluation.benchmark import Benchmark
from wherefrom.evaluation.distances import ImageDistance, LPIPSDistance, l2_distance
from wherefrom.evaluation.lds import LinearDatamodelingScore
from wherefrom.evaluation.loo import LeaveOneOut, leave_one_out
from wherefrom.evaluation.stats import Correlation

__all__ = [
    "Benchmark",
    "Correlation",
    "ImageDistance",
    "LPIPSDistance",
    "LeaveOneOut",
    "LinearDatamodelingScore",
    "l2_distance",
    "leave_one_out",
]
