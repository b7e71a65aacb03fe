"""Prompt templates per dataset: one `{}` stands for the class name.

Seven kinds, chosen by `get_templates(dataset_name, kind)`:

- `simple`: ``"a photo of a {}."``, CLIP-LoRA's training template.
- `coop`: the one hand-written template per dataset of CoOp's zero-shot CLIP
  (`CUSTOM_TEMPLATES` in KaiyangZhou/CoOp `trainers/zsclip.py`, its `ZeroshotCLIP`).
- `coop_ensemble`: CoOp's prompt ensemble (`ZeroshotCLIP2` in the same file): the 7 templates of
  `IMAGENET_TEMPLATES_SELECT` (`trainers/imagenet_templates.py`) plus the dataset's own `coop`
  template, except for ImageNet, which gets the 7 alone (as `ZeroshotCLIP2` does).
- `clip80`: the 80 ImageNet templates of OpenAI's CLIP prompt-engineering notebook, taken from
  `open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES`.
- `an_image_of`: ``"An image of {}"``, the caption the KRAdapter / RandLoRA authors train and test
  CLIP's two towers with (`CLIPVL` in PaulAlbert31/RandLoRA `vision_language/src/modeling.py`: no full
  stop; open_clip's tokenizer lowercases it).
- `atlas`: aTLAS's templates of the dataset (`src/datasets/templates.py` of fredzzhang/atlas, which the
  KRAdapter authors' RandLoRA code uses): the default of aTLAS's 22 datasets (`kr_vlm.data.atlas`);
  every ImageNet variant gets ImageNet's, as RandLoRA's `get_templates` does.
- `clip_benchmark`: LAION CLIP_benchmark's templates of the dataset (its
  `en_zeroshot_classification_templates.json`, read from the installed package: `kr_vlm[benchmark]`);
  ImageNet's for a dataset it lacks, as its builder does.

A dataset CoOp or aTLAS has no template for gets its own single one: its CoOp twin's (`dtd_atlas`),
kr_vlm's for digits and glyphs, else ``"a photo of a {}."``.

Class names need no cleaning here: the readers already turn underscores into spaces, as CoOp and
CLIP-LoRA do when they build prompts.
"""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from kr_vlm.data.atlas import atlas_templates
from kr_vlm.data.registry import DATASETS, dataset_info
from kr_vlm.errors import ConfigError

SIMPLE_TEMPLATE = "a photo of a {}."
AN_IMAGE_OF_TEMPLATE = "An image of {}"

# Keyed by CoOp's dataset class names (`DatasetInfo.coop_name`), copied from CoOp's zsclip.py.
COOP_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# Datasets CoOp does not have. digits: OpenAI CLIP's MNIST prompt (CLIP repo, data/prompts.md);
# glyphs (digits and letters in held-out fonts, kr_vlm's own): the plain CLIP prompt.
OTHER_TEMPLATES: dict[str, str] = {
    "digits": 'a photo of the number: "{}".',
    "glyphs": "a photo of a {}.",
}

# open_clip stores the templates as functions of the class name; "{}" turns them back into strings.
CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)

# The 7 templates CoOp's ZeroshotCLIP2 ensembles, copied from CoOp's trainers/imagenet_templates.py.
COOP_IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_KINDS = ("simple", "coop", "coop_ensemble", "clip80", "an_image_of", "atlas", "clip_benchmark")


def _own_template(info) -> str:
    """The dataset's one template: CoOp's (for an aTLAS variant, its CoOp twin's), kr_vlm's for digits and
    glyphs, else CLIP's plain ``"a photo of a {}."``."""
    twin = DATASETS.get(info.name.removesuffix("_atlas"))
    coop_name = info.coop_name or (twin.coop_name if twin is not None else None)
    if coop_name:
        return COOP_TEMPLATES[coop_name]
    return OTHER_TEMPLATES.get(info.name, SIMPLE_TEMPLATE)


def get_templates(dataset_name: str, kind: str = "coop") -> tuple[str, ...]:
    """The prompt templates of `kind` (one of `TEMPLATE_KINDS`) for dataset `dataset_name`.

    A dataset a source has no templates for gets its own one (`_own_template`), except with
    `clip_benchmark`, which gives ImageNet's, as CLIP_benchmark's builder does.
    """
    info = dataset_info(dataset_name)
    own = _own_template(info)
    if kind == "simple":
        return (SIMPLE_TEMPLATE,)
    if kind == "coop":
        return (own,)
    if kind == "coop_ensemble":
        return COOP_IMAGENET_TEMPLATES_SELECT + (() if info.coop_name == "ImageNet" else (own,))
    if kind == "clip80":
        return CLIP_IMAGENET_TEMPLATES
    if kind == "an_image_of":
        return (AN_IMAGE_OF_TEMPLATE,)
    if kind == "atlas":
        return atlas_templates(info.atlas_name) if info.atlas_name else (own,)
    if kind == "clip_benchmark":
        from kr_vlm.data.clip_benchmark import benchmark_templates

        return benchmark_templates(info)
    raise ConfigError(f"Unknown template kind {kind!r}; choose one of {', '.join(TEMPLATE_KINDS)}.")
