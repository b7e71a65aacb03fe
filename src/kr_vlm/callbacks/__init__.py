"""Lightning callbacks that watch training without changing it."""

from kr_vlm.callbacks.parameter_summary import ParameterSummary
from kr_vlm.callbacks.progress import RichStepProgressBar
from kr_vlm.callbacks.rank_monitor import EffectiveRankMonitor

__all__ = ["EffectiveRankMonitor", "ParameterSummary", "RichStepProgressBar"]
