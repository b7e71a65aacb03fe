"""The bar of DESIGN.md's rooms: only `kr_vlm.models` holds the module names of CLIP models in code; every other
room asks `kr_vlm.models` (docstrings, comments and messages may name them)."""

from __future__ import annotations

import ast
from pathlib import Path

import kr_vlm

PACKAGE = Path(kr_vlm.__file__).parent
# Submodules and parameters of open_clip's CLIP, CustomTextCLIP and their towers.
CLIP_NAMES = {
    "visual", "transformer", "resblocks", "attn", "in_proj_weight", "in_proj_bias", "out_proj", "text_projection",
    "token_embedding", "positional_embedding", "ln_final", "ln_pre", "ln_post", "logit_scale", "logit_bias",
    "conv1", "class_embedding", "attn_mask", "proj", "c_fc", "c_proj", "trunk", "image_size",
}  # fmt: skip


def clip_names_in_code(source: str) -> list[tuple[int, str]]:
    """`(line, name)` of every attribute access or plain string (not a docstring, a part of an f-string
    message or a record's key) that names a CLIP module or parameter."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    in_messages = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    # The keys of a record written out (metrics.json, provenance) are names of its fields, not lookups.
    record_keys = {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in CLIP_NAMES:
            found.append((node.lineno, node.attr))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings | in_messages | record_keys
            and set(node.value.split(".")) & CLIP_NAMES
        ):
            found.append((node.lineno, node.value))
    return found


def test_no_room_but_models_names_clip_modules_in_code():
    found = {
        f"{path.relative_to(PACKAGE)}:{line}": name
        for path in sorted(PACKAGE.rglob("*.py"))
        if "models" not in path.relative_to(PACKAGE).parts
        for line, name in clip_names_in_code(path.read_text(encoding="utf-8"))
    }
    assert not found, f"CLIP module names outside kr_vlm.models (ask kr_vlm.models instead): {found}"


def test_the_check_sees_attribute_access_and_strings_but_not_docstrings():
    source = '"""model.visual is documented."""\nx = model.visual.conv1\nkeep = "logit_scale" in name\n'
    assert clip_names_in_code(source) == [(2, "conv1"), (2, "visual"), (3, "logit_scale")]
