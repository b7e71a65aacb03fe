"""Every ```bash, ```sh and ```python block of README.md and data/README.md, run as written, so a README
promise that breaks fails a test.

Each block runs in a fresh copy of the repository (what a clone has), with `python` (and `.venv/bin/python`)
the interpreter of this test run, `HOME` and the Hugging Face cache empty and offline: nothing is written
into the repository itself. A block that cannot run here says why in an HTML comment just before it:

    <!-- readme-test: skip reason="needs CoOp's datasets under /datasets/coop" -->
        not run; reported as skipped with the reason.
    <!-- readme-test: compose reason="needs ViT-B/16 weights and CoOp's datasets" -->
        every `python train.py|eval.py ...` line has its config composed, as `--cfg job` would (experiment
        names, config groups, keys and their types are checked; a sweep `-m key=a,b` composes every value of
        each swept key), every other `python <script> ...` line has each `--option` it uses checked
        against its `--help`; nothing is trained.
    <!-- readme-test: shorten="trainer.max_steps=2" -->
        the words are appended to every `python train.py|eval.py ...` command of the block (fewer steps or
        a smaller size, never other paths or defaults); `shorten-script="--steps 2"` does the same for
        every other `python <script> ...` command.
    <!-- readme-test: slow -->
        marked slow (it still runs in CI).

A placeholder such as `logs/demo/runs/<date>_<time>_<suffix>` becomes the newest folder there when the line
runs (in a fresh copy: the run the block made); any other placeholder becomes a glob.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_cli import repository_copy

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "data/README.md")
LANGUAGES = {"bash", "sh", "python"}
DIRECTIVE = re.compile(r"<!--\s*readme-test:(.*?)-->", re.S)
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
# `<parent>/<date>_<time>_<suffix>`: the newest entry of <parent> when the line runs; any other placeholder
# (`<task>`) a glob.
NEWEST = re.compile(r"(?P<parent>[\w.-]+(?:/[\w.-]+)*)/(?:<[a-z_]+>_?)+")
PLACEHOLDER = re.compile(r"<[a-z_]+>")
KNOWN_DIRECTIVES = {"skip", "compose", "shorten", "shorten-script", "slow", "reason"}
TIMEOUT_S = 900

# `python` on the PATH of a block: this interpreter, with the block's mode applied to `python <script>`.
SHIM = """#!/usr/bin/env bash
if [[ $# -eq 0 || "$1" == -* ]]; then exec "$KR_VLM_README_PYTHON" "$@"; fi
script="$1"
if [[ -n "$KR_VLM_README_COMPOSE" ]]; then
    case "$(basename "$script")" in
        train.py|eval.py) exec "$KR_VLM_README_PYTHON" "$KR_VLM_README_CHECKS" compose "$@" ;;
        *) exec "$KR_VLM_README_PYTHON" "$KR_VLM_README_CHECKS" options "$@" ;;
    esac
fi
case "$(basename "$script")" in
    train.py|eval.py) exec "$KR_VLM_README_PYTHON" "$@" $KR_VLM_README_SHORTEN ;;
    *) exec "$KR_VLM_README_PYTHON" "$@" $KR_VLM_README_SHORTEN_SCRIPT ;;
esac
"""

# A compose block's `python <script> <arguments>`: train.py and eval.py compose their config (each value
# of a sweep), any other script must list in its --help every --option the line uses.
CHECKS = """import re, subprocess, sys
from pathlib import Path

check, script, arguments = sys.argv[1], sys.argv[2], sys.argv[3:]
if check == "options":
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    if helped.returncode != 0:
        sys.exit(f"{script} --help failed:\\n{helped.stdout}{helped.stderr}")
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", helped.stdout))
    options = arguments[: arguments.index("--")] if "--" in arguments else arguments  # then its positionals
    unknown = [a.split("=")[0] for a in options if a.startswith("--") and a.split("=")[0] not in listed]
    if unknown:
        sys.exit(f"{script}: options the README uses that --help does not list: {unknown}")
    sys.exit(0)

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from kr_vlm import cli  # registers the config schemas and resolvers, as train.py does

arguments = [argument for argument in arguments if argument not in ("-m", "--multirun")]
base, sweeps = list(arguments), []
for index, override in enumerate(OverridesParser.create().parse_overrides(arguments)):
    if override.is_sweep_override():
        values = list(override.sweep_string_iterator())
        key = arguments[index].split("=")[0]
        base[index] = f"{key}={values[0]}"
        sweeps += [(index, f"{key}={value}") for value in values[1:]]
variants = [base] + [base[:index] + [value] + base[index + 1 :] for index, value in sweeps]
with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base="1.3"):
    for variant in variants:
        compose(config_name=Path(script).stem, overrides=variant)
print(f"{script}: {len(variants)} configs composed")
"""


@dataclass(frozen=True)
class Block:
    document: str
    heading: str
    number: int  # the block's place under its heading, from 1
    line: int
    language: str
    code: str
    directives: dict[str, str | bool]

    @property
    def name(self) -> str:
        return f"{self.document}::{self.heading}::{self.number}"


def parse_directive(text: str) -> dict[str, str | bool]:
    """`skip reason="..."` -> {"skip": True, "reason": "..."}; `shorten="a b"` -> {"shorten": "a b"}."""
    directives: dict[str, str | bool] = {}
    for word in shlex.split(text):
        key, equals, value = word.partition("=")
        directives[key] = value if equals else True
    return directives


def read_blocks(document: str) -> list[Block]:
    """The fenced code blocks of `document` in the languages that run, with the directive just before each."""
    lines = (REPO / document).read_text().splitlines()
    blocks, heading, counts, index = [], "top", {}, 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        fence = FENCE.match(line)
        if not fence:
            index += 1
            continue
        end = index + 1
        while not lines[end].strip().startswith("```"):
            end += 1
        language = fence.group(2)
        if language in LANGUAGES:
            before = index - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            directive = DIRECTIVE.fullmatch(lines[before].strip()) if before >= 0 else None
            counts[heading] = counts.get(heading, 0) + 1
            indent = len(fence.group(1))
            code = "\n".join(text[indent:] for text in lines[index + 1 : end]) + "\n"
            directives = parse_directive(directive.group(1)) if directive else {}
            blocks.append(Block(document, heading, counts[heading], index + 1, language, code, directives))
        index = end + 1
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in read_blocks(document)]


def block_parameters() -> list:
    return [
        pytest.param(block, id=block.name, marks=[pytest.mark.slow] if block.directives.get("slow") else [])
        for block in BLOCKS
    ]


def test_every_directive_is_known_and_every_skip_says_why():
    assert len(BLOCKS) > 30
    for block in BLOCKS:
        assert set(block.directives) <= KNOWN_DIRECTIVES, (block.name, block.directives)
        if block.directives.get("skip") or block.directives.get("compose"):
            assert isinstance(block.directives.get("reason"), str) and block.directives["reason"], block.name
        shortened = block.directives.get("shorten") or block.directives.get("shorten-script")
        assert not (block.directives.get("compose") and shortened), block.name
        if block.language == "python":
            assert not block.directives.get("compose") and not shortened, block.name


def environment(tmp_path: Path, repo: Path, block: Block) -> dict[str, str]:
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python").write_text(SHIM)
    (shims / "python").chmod(0o755)
    (shims / "python3").symlink_to(shims / "python")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(shims / "python")
    checks = tmp_path / "readme_checks.py"
    checks.write_text(CHECKS)
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(("KR_VLM", "HF_"))}
    return {
        **inherited,
        "PATH": f"{shims}{os.pathsep}{inherited.get('PATH', '')}",
        "PYTHONPATH": str(repo / "src"),
        "HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "home" / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HYDRA_FULL_ERROR": "0",
        "OMP_NUM_THREADS": "1",
        "KR_VLM_README_PYTHON": sys.executable,
        "KR_VLM_README_CHECKS": str(checks),
        "KR_VLM_README_COMPOSE": "1" if block.directives.get("compose") else "",
        "KR_VLM_README_SHORTEN": str(block.directives.get("shorten", "")),
        "KR_VLM_README_SHORTEN_SCRIPT": str(block.directives.get("shorten-script", "")),
    }


@pytest.mark.parametrize("block", block_parameters())
def test_readme_block_runs(block: Block, tmp_path):
    if block.directives.get("skip"):
        pytest.skip(f"{block.name} (line {block.line}): {block.directives['reason']}")
    repo = repository_copy(tmp_path)
    env = environment(tmp_path, repo, block)
    if block.language == "python":
        # Run as a module is imported: a block that ends in `if __name__ == "__main__":` is a script the
        # README runs from the command line (its own test runs it so); here it must import and register.
        (repo / "readme_block.py").write_text(block.code)
        command = [sys.executable, "-c", "import runpy; runpy.run_path('readme_block.py', run_name='readme_block')"]
    else:
        code = NEWEST.sub(lambda match: f'{match["parent"]}/"$(ls -t {match["parent"]} | head -1)"', block.code)
        command = ["bash", "-euo", "pipefail", "-c", PLACEHOLDER.sub("*", code)]
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (
        f"{block.name} (line {block.line}) failed with exit status {done.returncode}:\n{block.code}\n"
        f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-5000:]}"
    )


def test_the_mini_clip_spec_in_the_readme_is_its_metadata():
    """The README's zero-shot table of kr-vlm-mini is the shipped model's metadata, not a number typed in."""
    metadata = json.loads((REPO / "src/kr_vlm/models/pretrained/kr-vlm-mini.metadata.json").read_text())
    top1 = {name: f"{value:.1f}" for name, value in metadata["zero_shot_top1"].items()}
    readme = (REPO / "README.md").read_text()
    start = readme.index("| test set | zero-shot top-1 | chance |")
    table = readme[start : readme.index("\n\n", start)]
    shifted = " / ".join(top1[f"digits_{domain}"] for domain in ("inverted", "rotated", "noisy", "edges"))
    for expected in (
        f"| digits, test split (540) | {top1['digits_test']} %",
        f"`a photo of the number: \"{{}}\".`: {top1['digits_test_coop']} %",
        f"| digits, all 1,797 | {top1['digits_all']} %",
        f"| {shifted} %",
        f"| glyphs in the held-out fonts, test split (540) | {top1['glyphs_test']} %",
    ):
        assert expected in table, (expected, table)
