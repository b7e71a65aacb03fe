"""Readers for the CoOp dataset layout.

Each reader takes `(dataset_dir, split)` (plus layout options bound in the registry) and returns
`(samples, classnames)`: `samples` is a list of `(absolute image path, label)` and
`classnames[label]` the readable class name. `kr_vlm.data.registry.build_dataset` wraps them.
"""

from kr_vlm.data.datasets.fgvc_aircraft import read_fgvc_aircraft
from kr_vlm.data.datasets.imagenet import read_imagenet, read_imagenet_v2, read_wnid_folders
from kr_vlm.data.datasets.split_zhou import read_split_zhou

__all__ = ["read_fgvc_aircraft", "read_imagenet", "read_imagenet_v2", "read_split_zhou", "read_wnid_folders"]
