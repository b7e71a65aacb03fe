"""Fine-tune a Hugging Face causal LM with KRAdapter through ``transformers.Trainer``.

A tiny Llama built from a config (random weights: no download) learns a small text task, sums written out
("3 plus 4 is 7."), with KRAdapter on every linear layer but the output head. Checkpoints hold the adapters
only (``save_adapters``: kr_vlm's adapter folder, plus the Trainer's optimizer, scheduler and RNG state);
running the same command again resumes from the last checkpoint, exactly; the end of the run writes the
merged model, a stock transformers model, to ``<output dir>/merged``; run again once finished, it says so
and changes nothing:

    pip install -e '.[hf]'
    python examples/hf_trainer_kradapter.py --output-dir logs/hf_trainer --max-steps 200 --save-steps 50

The learning rate is constant, so a finished run continues exactly with a larger ``--max-steps``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers.trainer_utils import get_last_checkpoint

from kr_vlm.adapters import (
    AdapterConfig,
    inject_adapters,
    load_adapters,
    merge_and_unload,
    print_trainable_parameters,
    save_adapters,
)
from kr_vlm.errors import command_boundary

# A character vocabulary: index 0 pads.
PAD = "_"
VOCAB = PAD + " .0123456789abcdefghijklmnopqrstuvwxyz"
LENGTH = 16  # characters per example, padding included: "9 plus 9 is 18." is 15


class KRAdapterTrainer(transformers.Trainer):
    """A Trainer whose checkpoints (and ``save_model``) hold the adapters only, read back on resume."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.args.should_save:
            save_adapters(self.model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        # The Trainer's own loader expects full model weights or a peft.PeftModel; these are kr_vlm adapters.
        load_adapters(model or self.model, resume_from_checkpoint)


def encode(text: str) -> list[int]:
    return [VOCAB.index(character) for character in text]


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids).rstrip(PAD)


def sums_dataset(pairs: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """One example a sum, padded to ``LENGTH``; the loss ignores the padding."""
    examples = []
    for a, b in pairs:
        ids = encode(f"{a} plus {b} is {a + b}.")
        input_ids = torch.tensor(ids + [0] * (LENGTH - len(ids)))
        labels = torch.tensor(ids + [-100] * (LENGTH - len(ids)))
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=VOCAB.index("."),
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints and the merged model")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--save-steps", type=int, default=50, help="an adapter-only checkpoint every N steps")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def finished_step(output_dir: Path, max_steps: int) -> int | None:
    """The step of the last checkpoint in ``output_dir`` when it is ``max_steps`` or beyond (the run is
    finished), else None. The Trainer itself, resumed from its final checkpoint, would train a step more."""
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is None:
        return None
    step = transformers.TrainerState.load_from_json(str(Path(last) / "trainer_state.json")).global_step
    return step if step >= max_steps else None


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    done = finished_step(args.output_dir, args.max_steps)
    if done is not None:
        print(
            f"{args.output_dir} holds a finished run (step {done}, --max-steps {args.max_steps}): nothing to "
            "train, and nothing written. Give a larger --max-steps to train on, or another --output-dir."
        )
        return
    pairs = [(a, b) for a in range(10) for b in range(10)]
    held_out = pairs[7::10]  # 10 sums the model never trains on
    train = sums_dataset([pair for pair in pairs if pair not in held_out])
    evaluation = sums_dataset(held_out)

    model = inject_adapters(tiny_llama(args.seed), AdapterConfig("kradapter", "all-linear"))
    print_trainable_parameters(model)
    training_args = transformers.TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.save_steps // 5),
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator; without one it only warns
    )
    trainer = KRAdapterTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation)
    before = trainer.evaluate()["eval_loss"]
    last = get_last_checkpoint(str(args.output_dir)) if args.output_dir.is_dir() else None
    if last is not None:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss: {before:.3f} before training, {after:.3f} after")

    merged = merge_and_unload(model).eval()
    merged.save_pretrained(args.output_dir / "merged")
    prompt = torch.tensor([encode("3 plus 4 is")], device=merged.device)
    completion = merged.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    print(
        f"merged model written to {args.output_dir / 'merged'}; it completes '3 plus 4 is' as "
        f"{decode(completion[0].tolist())!r}"
    )


if __name__ == "__main__":
    with command_boundary():
        main()
