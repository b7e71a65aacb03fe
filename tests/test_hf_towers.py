"""Hugging Face text towers and tokenizers offline: built from a config and tokenizer files in a (fake)
Hugging Face cache or a local folder, random weights for pretrained=None, nothing downloaded, and a clear
error naming the missing files and the command that fetches them."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from kr_vlm.models import HubFilesNotFoundError, load_clip
from kr_vlm.models.targets import clip_targets
from kr_vlm.models.zoo import build_model, shrunk_config, write_hf_text_config

HUB_NAME = "xlm-roberta-base"
WORDS = ["<s>", "<pad>", "</s>", "<unk>", "a", "photo", "of", "the", "cat", "dog"]


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache under tmp_path, offline mode on; any download fails the test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_downloads(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr("kr_vlm.models.hf_offline.snapshot_download", no_downloads)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_downloads)
    return cache


def write_tokenizer(folder) -> None:
    """A word-level tokenizer (tokenizer.json + tokenizer_config.json), as save_pretrained writes them."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)


def xlmr_cfg() -> dict:
    """xlm-roberta-base-ViT-B-32 at reduced depth and width (its text tower keeps the hub name)."""
    return shrunk_config("xlm-roberta-base-ViT-B-32", small=True)


def test_hf_text_tower_and_tokenizer_from_the_cache_with_random_weights(hub_cache):
    config = write_hf_text_config(hub_cache, HUB_NAME, small=True)
    write_tokenizer(config.parent)
    torch.manual_seed(0)
    model, _, _, tokenizer = load_clip("kr-test-xlmr", model_cfg=xlmr_cfg())
    torch.manual_seed(1)
    other = load_clip("kr-test-xlmr", model_cfg=xlmr_cfg())[0]
    assert type(model.text.transformer).__name__ == "XLMRobertaModel"
    assert model.text.config.num_hidden_layers == 2
    assert not torch.equal(  # random weights, drawn afresh (no pretrained text weights were loaded)
        model.text.transformer.encoder.layer[0].attention.self.query.weight,
        other.text.transformer.encoder.layer[0].attention.self.query.weight,
    )
    tokens = tokenizer(["a photo of the cat"])
    assert tokens[0, :5].tolist() == [4, 5, 6, 7, 8]
    with torch.no_grad():
        assert model.encode_text(tokens).shape == (1, 64)
    labels = clip_targets(model, towers="text", blocks=[0])
    assert labels["text.transformer.encoder.layer.0.attention.self.query"] == {
        "tower": "text",
        "layer": "q",
        "block": 0,
    }
    assert labels["text.transformer.encoder.layer.0.output.dense"]["layer"] == "fc2"


def test_hf_text_tower_from_a_local_folder(hub_cache, tmp_path):
    folder = write_hf_text_config(tmp_path / "elsewhere", HUB_NAME, small=True).parent
    write_tokenizer(folder)
    cfg = xlmr_cfg()
    cfg["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder))
    model = load_clip("kr-test-xlmr-local", model_cfg=cfg)[0]
    assert model.text.config.hidden_size == 64


def test_missing_hf_config_names_the_files_and_the_fetch_command(hub_cache):
    with pytest.raises(HubFilesNotFoundError) as raised:
        load_clip("kr-test-xlmr", model_cfg=xlmr_cfg(), allow_download=True)
    message = str(raised.value)
    assert "The Hugging Face config 'xlm-roberta-base' of the text tower" in message
    assert "text_cfg.hf_model_name" in message and str(hub_cache / "models--xlm-roberta-base") in message
    assert "config.json" in message and "HF_HUB_OFFLINE is set" in message
    assert "snapshot_download('xlm-roberta-base', allow_patterns=['config.json'])" in message


def test_missing_tokenizer_is_named_too(hub_cache, monkeypatch):
    write_hf_text_config(hub_cache, HUB_NAME, small=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(
        HubFilesNotFoundError, match=r"(?s)The tokenizer 'xlm-roberta-base' .*allow_download=true"
    ):
        load_clip("kr-test-xlmr", model_cfg=xlmr_cfg())


def test_siglip_tokenizer_from_the_cache(hub_cache):
    cfg = shrunk_config("ViT-B-16-SigLIP", small=True)
    repo = hub_cache / "models--timm--ViT-B-16-SigLIP"
    write_tokenizer(repo / "snapshots" / ("1" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    model, _, _, tokenizer = load_clip("kr-test-siglip", model_cfg=cfg)
    assert tokenizer(["a cat"]).shape == (1, cfg["text_cfg"]["context_length"])
    assert "visual.trunk.blocks.0.attn.qkv.q_proj" in clip_targets(model)


def test_a_local_dir_model_with_an_hf_text_tower(hub_cache, tmp_path):
    write_hf_text_config(hub_cache, HUB_NAME, small=True)
    folder = tmp_path / "model"
    folder.mkdir()
    cfg = xlmr_cfg()
    write_tokenizer(folder)  # open_clip reads a local-dir model's tokenizer from its folder
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    built = build_model("xlm-roberta-base-ViT-B-32", cfg, hub_cache)
    torch.save(built.state_dict(), folder / "open_clip_pytorch_model.bin")
    model = load_clip(f"local-dir:{folder}")[0]
    query = "text.transformer.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(model.state_dict()[query], built.state_dict()[query])


def test_a_siglip_named_model_without_a_tokenizer_name_is_refused_offline(hub_cache):
    cfg = shrunk_config("ViT-B-16-SigLIP", small=True)
    del cfg["text_cfg"]["hf_tokenizer_name"]
    with pytest.raises(HubFilesNotFoundError, match="downloads SigLIP's tokenizer vocabulary"):
        load_clip("my-siglip", model_cfg=cfg)


def test_a_missing_local_folder_is_named(hub_cache, tmp_path):
    cfg = xlmr_cfg()
    cfg["text_cfg"]["hf_model_name"] = str(tmp_path / "no" / "such" / "folder")
    with pytest.raises(HubFilesNotFoundError, match=r"is neither a folder nor a Hugging Face hub name"):
        load_clip("kr-test-xlmr-missing", model_cfg=cfg)
