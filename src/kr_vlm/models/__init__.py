"""CLIP models: offline loading, tower conversion and labels, the text head and the LightningModule.

Nothing here reads dataset files.
"""

from kr_vlm.models.attention import convert_attention
from kr_vlm.models.classifier import CLIPClassifier
from kr_vlm.models.clip import WeightsNotFoundError, load_clip
from kr_vlm.models.converted import fuse_qkv_state_dict
from kr_vlm.models.finetuner import CLIPFineTuner
from kr_vlm.models.hf_offline import HubFilesNotFoundError
from kr_vlm.models.targets import clip_layer_labels, clip_target_modules, clip_targets, select_targets
from kr_vlm.models.towers import clip_towers, convert_towers, example_forward

__all__ = [
    "CLIPClassifier",
    "CLIPFineTuner",
    "HubFilesNotFoundError",
    "WeightsNotFoundError",
    "clip_layer_labels",
    "clip_target_modules",
    "clip_targets",
    "clip_towers",
    "convert_attention",
    "convert_towers",
    "example_forward",
    "fuse_qkv_state_dict",
    "load_clip",
    "select_targets",
]
