"""Pretrain the miniature CLIP `kr-vlm-mini` from a seed: draw its corpus, train, write the weights.

The weights kr_vlm ships in src/kr_vlm/models/pretrained/ came from (README, "The miniature CLIP"):

    python scripts/pretrain_mini.py --out src/kr_vlm/models/pretrained --threads 1

It writes kr-vlm-mini.safetensors (fp16), kr-vlm-mini.metadata.json (this command, the settings,
the final loss, the zero-shot accuracies, the times) and kr-vlm-mini_log/metrics.csv (the losses)
into --out. The defaults are the shipped run's but for --threads (2 by default; the shipped run used
one thread on a CPU shared with other jobs); kr_vlm.pretrain.PretrainConfig documents each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys

from kr_vlm.errors import command_boundary
from kr_vlm.pretrain import PretrainConfig, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="logs/pretrain_mini", help="folder for the weights, losses and metadata"
    )
    defaults = PretrainConfig()
    helps = {
        "seed": "seeds the corpus, the initial weights and the batch order",
        "corpus_size": "image-caption pairs drawn",
        "steps": "optimiser steps",
        "batch_size": "pairs a step",
        "lr": "peak AdamW learning rate",
        "weight_decay": "AdamW weight decay (not on gains, biases or the logit scale)",
        "warmup_steps": "steps of linear warm-up before the cosine decay",
        "min_lr": "learning rate at the end of the cosine",
        "threads": "torch CPU threads while training",
        "workers": "processes that draw the corpus",
    }
    for field in dataclasses.fields(PretrainConfig):
        default = getattr(defaults, field.name)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(default),
            default=default,
            help=f"{helps[field.name]} (default {default})",
        )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = PretrainConfig(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(PretrainConfig)}
    )
    command = shlex.join(["python", "scripts/pretrain_mini.py", *sys.argv[1:]])
    metadata = pretrain(config, args.out, command=command)
    summary = {
        key: metadata[key] for key in ("steps", "final_loss", "logit_scale", "zero_shot_top1", "seconds")
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    with command_boundary():
        main()
