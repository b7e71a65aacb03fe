"""Pretrain the miniature CLIP `kr-vlm-mini` contrastively on the glyph corpus, and measure it zero-shot.

The architecture is open_clip's own CLIP, configured by `kr_vlm/models/model_configs/kr-vlm-mini.json`;
the loss is open_clip's `ClipLoss`; the corpus is `kr_vlm.data.corpus` (characters in matplotlib's
fonts with captions, never scikit-learn's digits). `pretrain` draws the corpus, trains with
Lightning, writes the weights as fp16 safetensors, a `metrics.csv` of the losses and a metadata JSON
(the command, the settings, the final loss and the zero-shot accuracies of the written weights,
loaded back through `kr_vlm.models.load_clip`) into one folder. `scripts/pretrain_mini.py` is the
command line; the weights kr_vlm ships came from it (README, "The miniature CLIP").

This is a module of its own rather than part of `models/` or `data/`: it uses both (the corpus and
open_clip), and neither should depend on it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kr_vlm.data import ClassificationTask, build_dataset, get_templates
from kr_vlm.data.corpus import GlyphCorpus
from kr_vlm.data.digits import DOMAINS as DIGIT_DOMAINS
from kr_vlm.data.glyphs import HELD_OUT_STEMS, PRETRAINING_FACES
from kr_vlm.files import write_file_atomic, write_json_atomic
from kr_vlm.models.classifier import CLIPClassifier
from kr_vlm.models.clip import MODEL_CONFIG_DIR, load_clip
from kr_vlm.models.pretraining import ContrastivePretraining

log = logging.getLogger(__name__)

MODEL_NAME = "kr-vlm-mini"
# open_clip's training clamps the learned temperature at 100 (open_clip_train/train.py).
# The final loss reported is the mean over this many last steps (one step's loss is noisy).
FINAL_LOSS_STEPS = 50


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run (defaults: those of the run that produced the shipped weights,
    but for `threads`: that run used one, on a CPU shared with other jobs; see its metadata JSON).

    Attributes:
        seed: seeds the corpus, the model's initial weights and the batch order.
        corpus_size: samples drawn (each seen `steps * batch_size / corpus_size` times).
        steps: optimiser steps.
        batch_size: image-caption pairs a step (the contrastive loss's negatives).
        lr, weight_decay, warmup_steps, min_lr: AdamW (betas 0.9, 0.98, eps 1e-6 as open_clip's ViT
            recipe) with a linear warm-up and a cosine down to `min_lr`; no decay on gains, biases
            and the logit scale.
        threads: torch's CPU threads while training.
        workers: processes that draw the corpus.
    """

    seed: int = 0
    corpus_size: int = 120_000
    steps: int = 3_000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 150
    min_lr: float = 1e-5
    threads: int = 2
    workers: int = 2


def model_config() -> dict[str, Any]:
    """The open_clip model config of `kr-vlm-mini` (the JSON file open_clip registered)."""
    return json.loads((MODEL_CONFIG_DIR / f"{MODEL_NAME}.json").read_text())


def draw_corpus(
    size: int, seed: int, transform: Callable[[Any], Tensor], tokenizer: Callable[..., Tensor], workers: int
) -> TensorDataset:
    """The corpus as tensors: images through `transform` (stored as float16) and tokenized captions."""
    loader = DataLoader(GlyphCorpus(size, seed, transform), batch_size=1024, num_workers=workers)
    images, captions = [], []
    for batch_images, batch_captions in loader:
        images.append(batch_images.to(torch.float16))
        captions.extend(batch_captions)
    return TensorDataset(torch.cat(images), tokenizer(captions))


def fp16_state_dict_bytes(model: nn.Module) -> bytes:
    """`model`'s state dict as safetensors bytes, floating tensors in float16 (half the size)."""
    state = {
        key: (value.to(torch.float16) if value.is_floating_point() else value).contiguous()
        for key, value in model.state_dict().items()
    }
    return safetensors_bytes(state)


def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],
    dataset: Dataset,
    templates: Sequence[str],
    batch_size: int = 256,
) -> float:
    """Top-1 of `model` on `dataset` (which yields transformed images), classes embedded with `templates`."""
    classifier = CLIPClassifier(model.eval(), tokenizer)
    task = ClassificationTask("zero-shot", dataset.classnames, templates)
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            correct += (classifier(images, task).argmax(dim=-1) == labels).sum().item()
    return correct / len(dataset)


def evaluate_zero_shot(weights: str | Path) -> dict[str, float]:
    """Zero-shot top-1 (%) of the weights file on the digits and the held-out-font glyphs.

    The model is loaded through `load_clip`, as `model=mini` loads it; images are drawn by the
    datasets and go through the model's eval transform. Keys: `digits_test` (the test split, 540
    images, with the `simple` template "a photo of a {}."), `digits_test_coop` (the digits' own
    prompt 'a photo of the number: "{}".'), `digits_all` (all 1797 images, simple template),
    `digits_val`, `digits_<domain>` for the shifted test sets, and `glyphs_test`.
    """
    model, _, preprocess, tokenizer = load_clip(MODEL_NAME, pretrained=str(weights))

    def top1(name: str, split: str, kind: str = "simple", **options: Any) -> tuple[float, int]:
        dataset = build_dataset(name, None, split, transform=preprocess, **options)
        return zero_shot_accuracy(model, tokenizer, dataset, get_templates(name, kind)), len(dataset)

    def percent(fraction: float) -> float:
        return round(100.0 * fraction, 2)

    digits = {split: top1("digits", split) for split in ("train", "val", "test")}
    everything = sum(top1 * size for top1, size in digits.values()) / sum(size for _, size in digits.values())
    results = {
        "digits_test": percent(digits["test"][0]),
        "digits_test_coop": percent(top1("digits", "test", "coop")[0]),
        "digits_val": percent(digits["val"][0]),
        "digits_all": percent(everything),
    }
    for domain in DIGIT_DOMAINS[1:]:
        results[f"digits_{domain}"] = percent(top1("digits", "test", domain=domain)[0])
    results["glyphs_test"] = percent(top1("glyphs", "test")[0])
    return results


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(item.ru_utime + item.ru_stime for item in usage)


def pretrain(config: PretrainConfig, out_dir: str | Path, command: str = "") -> dict[str, Any]:
    """Draw the corpus, pretrain `kr-vlm-mini`, write its weights, losses and metadata into `out_dir`.

    Writes `kr-vlm-mini.safetensors`, `kr-vlm-mini.metadata.json` and `kr-vlm-mini_log/metrics.csv`
    (loss and logit scale per logged step); returns the metadata.
    """
    out_dir = Path(out_dir)
    start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
    torch.set_num_threads(config.threads)
    seed_everything(config.seed, verbose=False)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)

    corpus = draw_corpus(config.corpus_size, config.seed, preprocess, tokenizer, config.workers)
    corpus_seconds = time.perf_counter() - start_wall
    log.info("Drew %d corpus samples in %.0f s", config.corpus_size, corpus_seconds)
    loader = DataLoader(
        corpus,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    module = ContrastivePretraining(model, config)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=config.steps,
        logger=CSVLogger(out_dir, name=f"{MODEL_NAME}_log", version=""),
        log_every_n_steps=min(10, config.steps),
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, loader)
    train_seconds = time.perf_counter() - start_wall - corpus_seconds

    weights = out_dir / f"{MODEL_NAME}.safetensors"
    data = fp16_state_dict_bytes(model)
    write_file_atomic(weights, lambda handle: handle.write(data))
    zero_shot = evaluate_zero_shot(weights)
    metadata = {
        "model": MODEL_NAME,
        "pretrained": MODEL_NAME,
        "command": command,
        "date": datetime.date.today().isoformat(),
        "config": asdict(config),
        "model_config": model_config(),
        "corpus": {
            "generator": "kr_vlm.data.corpus",
            "size": config.corpus_size,
            "seed": config.seed,
            "pretraining_fonts": [face.stem for face in PRETRAINING_FACES],
            "held_out_fonts": list(HELD_OUT_STEMS),
        },
        "steps": trainer.global_step,
        "samples_seen": trainer.global_step * config.batch_size,
        "final_loss": round(
            sum(module.losses[-FINAL_LOSS_STEPS:]) / len(module.losses[-FINAL_LOSS_STEPS:]), 4
        ),
        "logit_scale": round(module.temperature(), 2),
        "zero_shot_top1": zero_shot,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "weights_bytes": len(data),
        "seconds": {
            "corpus": round(corpus_seconds, 1),
            "training": round(train_seconds, 1),
            "total_wall": round(time.perf_counter() - start_wall, 1),
            "total_cpu": round(_cpu_seconds() - start_cpu, 1),
        },
    }
    write_json_atomic(out_dir / f"{MODEL_NAME}.metadata.json", metadata)
    return metadata
