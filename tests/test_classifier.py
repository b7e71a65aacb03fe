"""CLIPClassifier: CLIP's zero-shot class embeddings, their cache, and gradients into the text tower."""

from __future__ import annotations

import open_clip
import pytest
import torch

from kr_vlm.adapters import AdapterConfig, adapted_layers, inject_adapters, scaled_adapters
from kr_vlm.data.base import ClassificationTask
from kr_vlm.models.classifier import CLIPClassifier

TASK = ClassificationTask(
    "pets", ["cat", "dog", "hamster", "parrot"], ["a photo of a {}.", "a {} at home", "{}"]
)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture
def frozen_clip(tiny_clip):
    return tiny_clip.requires_grad_(False)


def count_text_calls(model, monkeypatch) -> list[int]:
    """Patch ``model.encode_text`` to record the number of prompts of every call."""
    calls: list[int] = []
    original = model.encode_text

    def counting(tokens, *args, **kwargs):
        calls.append(len(tokens))
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "encode_text", counting)
    return calls


def test_class_embeddings_follow_clips_zero_shot_recipe(frozen_clip, tokenizer):
    reference = open_clip.build_zero_shot_classifier(
        frozen_clip, tokenizer, TASK.classnames, TASK.templates, num_classes_per_batch=None
    )
    for text_batch_size in (1, 5, 1024):  # chunks that split classes apart must not change the result
        classifier = CLIPClassifier(frozen_clip, tokenizer, text_batch_size=text_batch_size)
        torch.testing.assert_close(classifier.class_embeddings(TASK), reference.T, rtol=1e-5, atol=1e-6)


def test_logits_are_scaled_cosines(frozen_clip, tokenizer):
    images = torch.randn(5, 3, 32, 32)
    features = torch.nn.functional.normalize(frozen_clip.encode_image(images), dim=-1)
    learned = CLIPClassifier(frozen_clip, tokenizer)
    fixed = CLIPClassifier(frozen_clip, tokenizer, logit_scale=100.0)
    cosines = features @ learned.class_embeddings(TASK).T
    assert learned(images, TASK).shape == (5, len(TASK.classnames))
    torch.testing.assert_close(learned(images, TASK), frozen_clip.logit_scale.exp() * cosines)
    torch.testing.assert_close(fixed(images, TASK), 100.0 * cosines)


def test_frozen_text_tower_embeds_each_task_once(frozen_clip, tokenizer, monkeypatch):
    calls = count_text_calls(frozen_clip, monkeypatch)
    classifier = CLIPClassifier(frozen_clip, tokenizer)
    other = ClassificationTask("other", ["car", "plane"], ["a {}"])
    images = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        classifier(images, TASK)
        classifier(images, other)
    assert calls == [12, 2]
    classifier.clear_cache()
    classifier(images, TASK)
    assert calls == [12, 2, 12]


def test_trainable_text_tower_gets_gradients_and_fresh_embeddings(frozen_clip, tokenizer, monkeypatch):
    text_weight = frozen_clip.transformer.resblocks[0].mlp.c_fc.weight.requires_grad_(True)
    classifier = CLIPClassifier(frozen_clip, tokenizer)
    assert classifier.text_tower_trainable()
    calls = count_text_calls(frozen_clip, monkeypatch)
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 1, 2])

    for _ in range(2):  # with grad: recomputed on every call, never cached
        loss = torch.nn.functional.cross_entropy(classifier(images, TASK), labels)
        loss.backward()
    assert len(calls) == 2
    assert text_weight.grad is not None and text_weight.grad.abs().sum() > 0

    with torch.no_grad():  # evaluation: cached until the text tower changes
        before = classifier(images, TASK)
        classifier(images, TASK)
        assert len(calls) == 3
        torch.optim.SGD([text_weight], lr=10.0).step()  # an in-place update bumps the version counter
        after = classifier(images, TASK)
    assert len(calls) == 4
    assert not torch.allclose(before, after)


def test_a_new_update_scale_of_text_adapters_embeds_again(frozen_clip, tokenizer, monkeypatch):
    """The update scale changes no parameter, so the cache records it: frozen adapters (requires_grad off)
    in the text tower at α = 0 give the base model's embeddings, not the ones cached at α = 1."""
    reference = CLIPClassifier(frozen_clip, tokenizer).class_embeddings(TASK)
    inject_adapters(frozen_clip, AdapterConfig("lora", r"transformer\.resblocks\.0\.mlp\.c_fc", r=2))
    frozen_clip.requires_grad_(False)
    [(_, layer)] = adapted_layers(frozen_clip)
    with torch.no_grad():
        layer.module.lora_B["default"].weight.normal_()
    classifier = CLIPClassifier(frozen_clip, tokenizer)
    calls = count_text_calls(frozen_clip, monkeypatch)
    adapted = classifier.class_embeddings(TASK)
    assert not torch.allclose(adapted, reference)
    with scaled_adapters(frozen_clip, 0):
        assert torch.equal(classifier.class_embeddings(TASK), reference)
    assert torch.equal(classifier.class_embeddings(TASK), adapted)
    assert len(calls) == 3


def test_vision_parameters_do_not_make_the_text_tower_trainable(frozen_clip, tokenizer):
    frozen_clip.visual.transformer.resblocks[0].mlp.c_fc.weight.requires_grad_(True)
    frozen_clip.logit_scale.requires_grad_(True)
    assert not CLIPClassifier(frozen_clip, tokenizer).text_tower_trainable()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"logit_scale": 0.0}, "logit_scale"), ({"text_batch_size": 0}, "text_batch_size")],
)
def test_bad_arguments(frozen_clip, tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLIPClassifier(frozen_clip, tokenizer, **kwargs)
