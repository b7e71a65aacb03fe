"""CLIP models: offline loading, attention conversion, the text head and the LightningModule.

Nothing here reads dataset files.
"""

from kr_vlm.models.attention import convert_attention
from kr_vlm.models.classifier import CLIPClassifier
from kr_vlm.models.clip import WeightsNotFoundError, load_clip
from kr_vlm.models.finetuner import CLIPFineTuner
from kr_vlm.models.targets import clip_target_modules, clip_targets

__all__ = [
    "CLIPClassifier",
    "CLIPFineTuner",
    "WeightsNotFoundError",
    "clip_target_modules",
    "clip_targets",
    "convert_attention",
    "load_clip",
]
