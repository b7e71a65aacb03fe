"""The shipped miniature CLIP (`model=mini`): offline loading, its documented zero-shot accuracy, a
KRAdapter fit that improves on it, and the pretraining that produced it (kr_vlm.pretrain)."""

from __future__ import annotations

import csv
import hashlib
import json

import open_clip
import pytest
import torch

from compose_helpers import compose_config, run_state_restored
from kr_vlm import cli
from kr_vlm.data import build_dataset, get_templates
from kr_vlm.models import CLIPFineTuner, WeightsNotFoundError, load_clip
from kr_vlm.models import clip as clip_module
from kr_vlm.pretrain import MODEL_NAME, PretrainConfig, evaluate_zero_shot, pretrain, zero_shot_accuracy

WEIGHTS = clip_module.SHIPPED_WEIGHTS[(MODEL_NAME, MODEL_NAME)]
METADATA = json.loads(WEIGHTS.with_name(f"{MODEL_NAME}.metadata.json").read_text())
# fp16 weights evaluated in float32: sums in another order (another CPU, thread count) may flip an image.
TOLERANCE = 0.5  # percentage points


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


@pytest.fixture(scope="module")
def mini():
    return load_clip(MODEL_NAME, pretrained=MODEL_NAME)


def test_shipped_weights_are_small_and_the_documented_ones():
    assert WEIGHTS.stat().st_size <= 16 * 2**20
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == METADATA["weights_sha256"]
    # open_clip's whole vocabulary, so its tokenizer works: the size comes from the model config.
    assert METADATA["model_config"]["text_cfg"]["vocab_size"] == 49408
    assert METADATA["model_config"] == json.loads(
        (clip_module.MODEL_CONFIG_DIR / f"{MODEL_NAME}.json").read_text()
    )


def test_loads_offline_through_open_clips_public_registry(mini, monkeypatch):
    model, _, preprocess, tokenizer = mini
    assert MODEL_NAME in open_clip.list_models()
    assert model.token_embedding.weight.shape == (49408, 64)
    assert model.visual.transformer.resblocks[0].attn.q_proj.weight.dtype == torch.float32
    assert tokenizer(["a photo of a seven."]).shape == (1, 32)
    assert preprocess.transforms[0].size in (32, (32, 32))


def test_zero_shot_top1_on_digits_is_the_documented_one(mini):
    model, _, preprocess, tokenizer = mini
    test_set = build_dataset("digits", None, "test", transform=preprocess)
    top1 = 100 * zero_shot_accuracy(model, tokenizer, test_set, get_templates("digits", "simple"))
    assert top1 == pytest.approx(METADATA["zero_shot_top1"]["digits_test"], abs=TOLERANCE)
    assert top1 > 50  # chance is 10 %


def test_zero_shot_top1_on_held_out_font_glyphs_is_the_documented_one(mini):
    model, _, preprocess, tokenizer = mini
    test_set = build_dataset("glyphs", None, "test", transform=preprocess)
    top1 = 100 * zero_shot_accuracy(model, tokenizer, test_set, get_templates("glyphs", "simple"))
    assert top1 == pytest.approx(METADATA["zero_shot_top1"]["glyphs_test"], abs=TOLERANCE)
    assert top1 > 100 / 36 * 5


def test_missing_shipped_weights_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(clip_module.SHIPPED_WEIGHTS, (MODEL_NAME, MODEL_NAME), tmp_path / "gone.safetensors")
    with pytest.raises(WeightsNotFoundError, match="scripts/pretrain_mini.py"):
        load_clip(MODEL_NAME, pretrained=MODEL_NAME)


def test_unknown_tag_lists_the_shipped_one():
    with pytest.raises(ValueError, match="kr-vlm-mini"):
        load_clip(MODEL_NAME, pretrained="laion-nope")


def test_model_mini_composes_to_the_shipped_weights(tmp_path):
    cfg = compose_config(tmp_path, ["model=mini", "adapter=none"])
    assert (cfg.model.clip.name, cfg.model.clip.pretrained, cfg.model.logit_scale) == (
        MODEL_NAME,
        MODEL_NAME,
        None,
    )
    module = cli.build_model(cfg)
    assert isinstance(module, CLIPFineTuner)
    loaded = {
        key: value.to(torch.float16) for key, value in module.classifier.model.visual.state_dict().items()
    }
    reference = load_clip(MODEL_NAME, pretrained=str(WEIGHTS))[0].visual.state_dict()
    assert all(torch.equal(loaded[key], value.to(torch.float16)) for key, value in reference.items())


def test_a_short_kradapter_fit_improves_on_zero_shot(tmp_path):
    """The mini recipe (experiment=mini_kr_fewshot), shortened to a few steps, beats zero-shot on its classes."""

    def run(*overrides: str) -> dict:
        return cli.train(compose_config(tmp_path, ["experiment=mini_kr_fewshot", *overrides]))

    zero_shot = run("data.shots=0", f"paths.output_dir={tmp_path / 'zero_shot'}")["test"]["digits"]["top1"]
    adapted = run("trainer.max_steps=60", f"paths.output_dir={tmp_path / 'adapted'}")["test"]["digits"][
        "top1"
    ]
    documented = METADATA["zero_shot_top1"]["digits_test"] / 100
    assert zero_shot == pytest.approx(documented, abs=TOLERANCE / 100)
    assert adapted > zero_shot + 0.05


@pytest.mark.slow
def test_pretraining_writes_weights_that_load_and_a_loss_log(tmp_path):
    config = PretrainConfig(corpus_size=64, steps=2, batch_size=32, warmup_steps=1, threads=1, workers=0)
    metadata = pretrain(config, tmp_path, command="test")
    weights = tmp_path / f"{MODEL_NAME}.safetensors"
    assert json.loads((tmp_path / f"{MODEL_NAME}.metadata.json").read_text()) == metadata
    assert metadata["steps"] == 2 and metadata["config"]["corpus_size"] == 64
    assert metadata["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert metadata["zero_shot_top1"] == evaluate_zero_shot(weights)
    with (tmp_path / f"{MODEL_NAME}_log" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(float(row["train/loss"]) > 0 for row in rows if row["train/loss"])
