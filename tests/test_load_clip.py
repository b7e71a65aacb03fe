"""load_clip (offline weights, QuickGELU, transforms, tokenizer) and clip_target_modules."""

from __future__ import annotations

import copy
import json
import logging

import huggingface_hub
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms import RandomHorizontalFlip, RandomResizedCrop

from kr_vlm.models.attention import SeparateQKVAttention, convert_attention
from kr_vlm.models.clip import WeightsNotFoundError, load_clip
from kr_vlm.models.targets import clip_target_modules, clip_targets

TINY = "kr-test-tiny"  # custom architecture name used with model_cfg
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hugging Face offline mode with an empty hub cache under tmp_path; downloads would fail the test.

    As a process started with these variables sees them: huggingface_hub reads them when it is imported.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))

    def no_downloads(*args, **kwargs):
        raise AssertionError("load_clip tried to download")

    monkeypatch.setattr(open_clip, "download_pretrained", no_downloads)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", no_downloads)
    return tmp_path / "hf_home" / "hub"


def _tiny_state_dict(cfg: dict, quick_gelu: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return open_clip.CLIP(**cfg, quick_gelu=quick_gelu).state_dict()


def _fake_hub_snapshot(hub_cache, repo_id: str, files: dict[str, bytes | dict]) -> None:
    """The layout huggingface_hub leaves behind: models--org--repo/{refs/main, snapshots/<commit>/...}."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for filename, content in files.items():
        if isinstance(content, dict):
            save_file({k: v.contiguous() for k, v in content.items()}, str(snapshot / filename))
        else:
            (snapshot / filename).write_bytes(content)


def _q_weight(model: nn.Module) -> torch.Tensor:
    return model.visual.transformer.resblocks[0].attn.q_proj.weight


def _check_weights_loaded(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    assert torch.equal(
        _q_weight(model), state_dict["visual.transformer.resblocks.0.attn.in_proj_weight"][:64]
    )
    assert torch.equal(model.token_embedding.weight, state_dict["token_embedding.weight"])


def test_random_init_from_model_cfg(tiny_clip_cfg):
    model, preprocess_train, preprocess_val, tokenizer = load_clip(TINY, model_cfg=tiny_clip_cfg)

    assert not model.training
    assert isinstance(model.transformer.resblocks[0].attn, SeparateQKVAttention)
    assert TINY not in open_clip.list_models()  # the custom config does not linger in open_clip's registry
    image = Image.new("RGB", (48, 40), color=(200, 30, 30))
    for transform in (preprocess_train, preprocess_val):
        assert transform(image).shape == (3, 32, 32)
    tokens = tokenizer(["a photo of a dog."])
    assert tokens.shape == (1, 77)
    with torch.no_grad():
        assert model.encode_text(tokens).shape == (1, 32)
        assert model.encode_image(preprocess_val(image).unsqueeze(0)).shape == (1, 32)


def test_random_weights_asked_for_are_said_in_one_info_line_not_a_warning(tiny_clip_cfg, caplog):
    with caplog.at_level(logging.INFO):
        load_clip(TINY, model_cfg=tiny_clip_cfg)
    assert [record.levelname for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert [record.getMessage() for record in caplog.records if record.name.startswith("kr_vlm")] == [
        f"{TINY}: random weights, as configured (pretrained is None)."
    ]
    assert logging.getLogger().filters == []  # open_clip's warnings about other models still show


def test_one_name_for_two_custom_configs_in_one_process(tiny_clip_cfg):
    wide = copy.deepcopy(tiny_clip_cfg)
    wide["vision_cfg"]["width"] = 96
    narrow_model = load_clip(TINY, model_cfg=tiny_clip_cfg)[0]
    wide_model = load_clip(TINY, model_cfg=wide)[0]
    again = load_clip(TINY, model_cfg=tiny_clip_cfg)[0]
    assert _q_weight(narrow_model).shape == _q_weight(again).shape == (64, 64)
    assert _q_weight(wide_model).shape == (96, 96)


def test_transforms_follow_clip_lora(tiny_clip_cfg):
    _, preprocess_train, preprocess_val, _ = load_clip(
        TINY, model_cfg=tiny_clip_cfg, train_crop_scale=(0.5, 1.0)
    )
    crop, flip = preprocess_train.transforms[:2]
    assert isinstance(crop, RandomResizedCrop) and crop.scale == (0.5, 1.0) and crop.size == (32, 32)
    assert crop.interpolation.value == "bicubic"
    assert isinstance(flip, RandomHorizontalFlip)
    assert preprocess_train.transforms[-1].mean == open_clip.OPENAI_DATASET_MEAN
    reference = open_clip.image_transform(32, is_train=False)
    image = Image.new("RGB", (50, 37), color=(10, 120, 240))
    assert torch.equal(preprocess_val(image), reference(image))
    _, unflipped, _, _ = load_clip(TINY, model_cfg=tiny_clip_cfg, train_flip=False)
    assert not any(isinstance(step, RandomHorizontalFlip) for step in unflipped.transforms)
    assert len(unflipped.transforms) == len(preprocess_train.transforms) - 1


def test_tokenizer_uses_the_context_length_of_the_config(tiny_clip_cfg):
    tiny_clip_cfg["text_cfg"]["context_length"] = 16
    model, _, _, tokenizer = load_clip(TINY, model_cfg=tiny_clip_cfg)
    tokens = tokenizer(["a photo of a dog."])
    assert tokens.shape == (1, 16)
    with torch.no_grad():
        assert model.encode_text(tokens).shape == (1, 32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_weights_from_a_local_file(tiny_clip_cfg, tmp_path, suffix):
    state_dict = _tiny_state_dict(tiny_clip_cfg)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    model = load_clip(TINY, pretrained=path, model_cfg=tiny_clip_cfg)[0]
    _check_weights_loaded(model, state_dict)


# torch.jit is deprecated and torch.load says it dispatches to torch.jit.load; OpenAI's files are what they are.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:'torch.load' received a zip file:UserWarning")
def test_weights_from_a_torchscript_archive(tiny_clip_cfg, tmp_path):
    # OpenAI's original checkpoints are TorchScript archives, which torch.load(weights_only=True) refuses.
    tiny_clip_cfg["text_cfg"]["no_causal_mask"] = True  # a causal mask buffer would be saved by scripting
    torch.manual_seed(123)
    reference = open_clip.CLIP(**tiny_clip_cfg).eval()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(reference).save(str(path))
    model = load_clip(TINY, pretrained=str(path), model_cfg=tiny_clip_cfg)[0]
    _check_weights_loaded(model, reference.state_dict())


def test_hf_hub_model_from_an_offline_cache(tiny_clip_cfg, offline):
    state_dict = _tiny_state_dict(tiny_clip_cfg)
    config = {"model_cfg": tiny_clip_cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    _fake_hub_snapshot(
        offline,
        "kr-test/tiny-clip",
        {"open_clip_config.json": json.dumps(config).encode(), "open_clip_model.safetensors": state_dict},
    )

    model, _, preprocess_val, tokenizer = load_clip("hf-hub:kr-test/tiny-clip")

    _check_weights_loaded(model, state_dict)
    assert tuple(preprocess_val.transforms[-1].mean) == (0.5, 0.5, 0.5)
    assert tokenizer(["a dog"]).shape == (1, 77)


def test_hf_hub_model_missing_from_the_cache(offline):
    with pytest.raises(WeightsNotFoundError) as error:
        load_clip("hf-hub:kr-test/absent-clip")
    message = str(error.value)
    assert str(offline / "models--kr-test--absent-clip") in message
    assert "HF_HUB_OFFLINE" in message
    assert "open_clip.create_model('hf-hub:kr-test/absent-clip')" in message


def _register_tag(monkeypatch, name: str, quick_gelu: bool) -> None:
    """Give the custom architecture a pretrained tag, as open_clip's table has for built-in ones."""
    tag_cfg = {"hf_hub": f"kr-test/{name}/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    if quick_gelu:
        tag_cfg["quick_gelu"] = True
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {"openai": tag_cfg})


@pytest.mark.parametrize("via_cache_dir", [False, True])
def test_pretrained_tag_from_the_hub_cache_picks_quick_gelu(
    tiny_clip_cfg, offline, tmp_path, monkeypatch, caplog, via_cache_dir
):
    _register_tag(monkeypatch, TINY, quick_gelu=True)
    hub_cache = tmp_path / "my_cache" if via_cache_dir else offline
    state_dict = _tiny_state_dict(tiny_clip_cfg, quick_gelu=True)
    _fake_hub_snapshot(hub_cache, f"kr-test/{TINY}", {"open_clip_model.safetensors": state_dict})

    with caplog.at_level(logging.INFO, logger="kr_vlm"):
        model, _, preprocess_val, _ = load_clip(
            TINY, pretrained="openai", model_cfg=tiny_clip_cfg, cache_dir=hub_cache if via_cache_dir else None
        )

    _check_weights_loaded(model, state_dict)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert "QuickGELU" in caplog.text
    assert tuple(preprocess_val.transforms[-1].mean) == (0.5, 0.5, 0.5)  # the tag's preprocessing


def test_quick_gelu_can_be_turned_off_with_a_warning(tiny_clip_cfg, offline, monkeypatch, caplog):
    _register_tag(monkeypatch, TINY, quick_gelu=True)
    _fake_hub_snapshot(
        offline, f"kr-test/{TINY}", {"open_clip_model.safetensors": _tiny_state_dict(tiny_clip_cfg)}
    )
    with caplog.at_level(logging.WARNING, logger="kr_vlm"):
        model = load_clip(TINY, pretrained="openai", model_cfg=tiny_clip_cfg, force_quick_gelu=False)[0]
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert "force_quick_gelu=False" in caplog.text


def test_tag_without_quick_gelu_keeps_gelu(tiny_clip_cfg, offline, monkeypatch):
    _register_tag(monkeypatch, TINY, quick_gelu=False)
    _fake_hub_snapshot(
        offline, f"kr-test/{TINY}", {"open_clip_model.safetensors": _tiny_state_dict(tiny_clip_cfg)}
    )
    model = load_clip(TINY, pretrained="openai", model_cfg=tiny_clip_cfg)[0]
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, nn.GELU)


def test_openai_weights_missing_offline(offline, caplog):
    with caplog.at_level(logging.INFO, logger="kr_vlm"), pytest.raises(WeightsNotFoundError) as error:
        load_clip("ViT-B-16", pretrained="openai", allow_download=True)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert "'ViT-B-16'" in message and "pretrained='openai'" in message
    assert str(offline / "models--timm--vit_base_patch16_clip_224.openai") in message
    assert "ViT-B-16.pt (open_clip URL cache)" in message
    assert "HF_HUB_OFFLINE" in message
    assert (
        """python -c "import open_clip; open_clip.create_model('ViT-B-16', pretrained='openai')\""""
        in message
    )
    # QuickGELU was chosen (and said so) before the weights were looked up.
    assert "trained with QuickGELU" in caplog.text


def _online(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_no_download_unless_allowed(monkeypatch, tmp_path):
    _online(monkeypatch)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", pytest.fail)
    monkeypatch.setattr(open_clip, "download_pretrained", pytest.fail)
    with pytest.raises(WeightsNotFoundError, match="allow_download=False") as error:
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=tmp_path)
    assert str(tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K") in str(error.value)
    assert f"cache_dir={str(tmp_path)!r}" in str(error.value)


def test_download_failure_is_reported_as_missing_weights(monkeypatch, tmp_path):
    _online(monkeypatch)

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(open_clip, "download_pretrained", unreachable)
    with pytest.raises(WeightsNotFoundError, match="no route to huggingface.co"):
        load_clip("ViT-B-32", pretrained="openai", cache_dir=tmp_path, allow_download=True)


def test_local_dir_model(tiny_clip_cfg, tmp_path):
    state_dict = _tiny_state_dict(tiny_clip_cfg)
    folder = tmp_path / "tiny_model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_clip_cfg}))
    with pytest.raises(WeightsNotFoundError, match="weights file"):
        load_clip(f"local-dir:{folder}")  # open_clip alone would return a random model here
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "open_clip_model.safetensors"))
    _check_weights_loaded(load_clip(f"local-dir:{folder}")[0], state_dict)
    # The same folder given as `pretrained` (how the Hydra model config spells it); `name` is a label.
    _check_weights_loaded(load_clip("my-tiny", pretrained=f"local-dir:{folder}")[0], state_dict)


def test_missing_local_file(tiny_clip_cfg, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_clip(TINY, pretrained=tmp_path / "absent.safetensors", model_cfg=tiny_clip_cfg)


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ValueError, match="Close matches: ViT-B-16") as error:
        load_clip("vit-b-16")
    assert "open_clip.list_models()" in str(error.value)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match="known tags: .*'openai'"):
        load_clip("ViT-B-16", pretrained="opnai")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp64"}, "precision must be one of"),
        ({"train_crop_scale": (0.9, 0.1)}, "train_crop_scale"),
        ({"pretrained": "hf-hub:org/repo"}, "leave model_cfg at None"),
    ],
)
def test_bad_arguments(tiny_clip_cfg, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_clip(TINY, model_cfg=tiny_clip_cfg, **kwargs)


def test_model_cfg_may_not_shadow_a_builtin(tiny_clip_cfg):
    with pytest.raises(ValueError, match="already defines"):
        load_clip("ViT-B-16", model_cfg=tiny_clip_cfg)
    assert open_clip.get_model_config("ViT-B-16")["embed_dim"] == 512


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("amp", torch.float32)]
)
def test_precision(tiny_clip_cfg, precision, dtype):
    model = load_clip(TINY, model_cfg=tiny_clip_cfg, precision=precision)[0]
    assert _q_weight(model).dtype == dtype


# --- clip_target_modules ------------------------------------------------------------------------


@pytest.fixture
def converted_tiny(tiny_clip):
    return convert_attention(tiny_clip)


def test_all_targets_exist_as_linears(converted_tiny):
    names = clip_target_modules(converted_tiny)
    assert len(names) == 2 * 2 * 6  # towers x blocks x layers
    assert names[0] == "visual.transformer.resblocks.0.attn.q_proj"
    assert names[-1] == "transformer.resblocks.1.mlp.c_proj"
    modules = dict(converted_tiny.named_modules())
    assert all(isinstance(modules[name], nn.Linear) for name in names)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"layers": "q", "towers": "text"},
            ["transformer.resblocks.0.attn.q_proj", "transformer.resblocks.1.attn.q_proj"],
        ),
        (
            {"layers": ["v", "q"], "towers": "vision", "blocks": "last_1"},
            ["visual.transformer.resblocks.1.attn.q_proj", "visual.transformer.resblocks.1.attn.v_proj"],
        ),
        (
            {"layers": ["o", "fc1"], "towers": "text", "blocks": [-1]},
            ["transformer.resblocks.1.attn.out_proj", "transformer.resblocks.1.mlp.c_fc"],
        ),
        (
            {"layers": ["fc2"], "blocks": "first_1"},
            ["visual.transformer.resblocks.0.mlp.c_proj", "transformer.resblocks.0.mlp.c_proj"],
        ),
        (
            {"layers": ["k"], "towers": "vision", "blocks": [1, 0, -1]},
            ["visual.transformer.resblocks.0.attn.k_proj", "visual.transformer.resblocks.1.attn.k_proj"],
        ),
    ],
)
def test_target_selection(converted_tiny, kwargs, expected):
    assert clip_target_modules(converted_tiny, **kwargs) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["q", "qkv"]}, r"subset of \['q', 'k', 'v', 'o', 'fc1', 'fc2'\]"),
        ({"layers": []}, "non-empty"),
        ({"towers": "image"}, r"one of \('vision', 'text', 'decoder', 'both', 'all'\)"),
        ({"towers": "decoder"}, "CLIP has no decoder tower"),
        ({"blocks": [2]}, r"out of range for the vision tower, which has 2 blocks \(valid: -2..1"),
        ({"blocks": "last_3"}, "has 2 blocks"),
        ({"blocks": "middle"}, "'all', 'first_N', 'last_N'"),
        ({"blocks": 1}, r"ambiguous: pass \[1\] .* 'last_1'"),
        ({"blocks": []}, "empty"),
    ],
)
def test_target_errors(converted_tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        clip_target_modules(converted_tiny, **kwargs)


def test_targets_need_converted_towers(tiny_clip):
    with pytest.raises(ValueError, match=r"not converted .*convert_towers"):
        clip_target_modules(tiny_clip, layers=["q"])


def test_targets_in_a_custom_text_clip(tiny_clip_cfg):
    model = load_clip(TINY, model_cfg={**copy.deepcopy(tiny_clip_cfg), "custom_text": True})[0]
    names = clip_target_modules(model, layers=["q"], towers="text")
    assert names == ["text.transformer.resblocks.0.attn.q_proj", "text.transformer.resblocks.1.attn.q_proj"]


def test_resnet_vision_tower_is_labelled_at_its_attention_pool(tiny_clip_cfg):
    tiny_clip_cfg["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}
    model = load_clip(TINY, model_cfg=tiny_clip_cfg)[0]
    pool = clip_targets(model, towers="vision")
    assert pool == {
        f"visual.attnpool.{proj}": {"tower": "vision", "layer": layer, "block": "pool"}
        for layer, proj in zip(("q", "k", "v", "o"), ("q_proj", "k_proj", "v_proj", "c_proj"), strict=True)
    }
    assert len(clip_target_modules(model, towers="both")) == 4 + 2 * 6
    # The pool has no blocks: a selection of blocks leaves the vision tower out (with a warning).
    assert len(clip_target_modules(model, towers="both", blocks="last_1")) == 6
