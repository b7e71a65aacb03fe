"""Lightning callbacks that watch training without changing it, and one that ends a fit that diverged."""

from kr_vlm.callbacks.divergence import StopOnDivergence, TrainingDivergedError
from kr_vlm.callbacks.parameter_summary import ParameterSummary
from kr_vlm.callbacks.progress import RichStepProgressBar
from kr_vlm.callbacks.rank_monitor import EffectiveRankMonitor

__all__ = [
    "EffectiveRankMonitor",
    "ParameterSummary",
    "RichStepProgressBar",
    "StopOnDivergence",
    "TrainingDivergedError",
]
