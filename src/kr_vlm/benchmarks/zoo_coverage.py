"""The zoo coverage walk: ``kr_vlm.models.zoo.check_model`` over open_clip's model configs, one fresh
process a config (so each one's peak memory is its own, and a crash is a row), and its table by family.

Every config is FULL (converted exactly, every tower labelled, KRAdapter and LoRA each trained one step
with a gradient in every adapter, merged and exported exactly) or in ``kr_vlm.models.zoo.ALLOW_LIST``
with the reason; anything else is a failure of kr_vlm.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from kr_vlm.console import markdown_table
from kr_vlm.files import write_json_atomic, write_text_atomic
from kr_vlm.models.towers import KINDS, LAYERS, TOWER_ATTRIBUTES
from kr_vlm.models.zoo import ALLOW_LIST, HF_TEXT_CONFIGS, check_model, write_hf_text_config

__all__ = ["coverage_markdown", "run_walk", "status_of", "write_outputs"]


def _check_in_child(name: str, small: bool, hub_cache: str) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: every file the walk needs is local
    record = check_model(name, small=small, hub_cache=Path(hub_cache)).to_json()
    record["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def status_of(record: dict[str, Any]) -> str:
    """``FULL``, ``ALLOWED`` (failed, in the allow-list with a reason) or ``FAILED``."""
    if record["status"] == "FULL":
        return "FULL"
    return "ALLOWED" if record["name"] in ALLOW_LIST else "FAILED"


def run_walk(
    names: Sequence[str], small: bool, progress: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Check every config of ``names``, each in a fresh process, and return their records in order."""
    records = []
    with tempfile.TemporaryDirectory(prefix="kr_vlm_zoo_hub_") as hub_cache:
        for hub_name in HF_TEXT_CONFIGS:
            write_hf_text_config(Path(hub_cache), hub_name, small=small)
        context = multiprocessing.get_context("spawn")
        with context.Pool(1, maxtasksperchild=1) as pool:
            for index, name in enumerate(names, 1):
                record = pool.apply(_check_in_child, (name, small, hub_cache))
                records.append(record)
                progress(
                    f"[{index:>3}/{len(names)}] {status_of(record):7s} {name} ({record['seconds']:.0f} s, "
                    f"{record['peak_mb']:.0f} MB){' ' + record['failure'] if record['failure'] else ''}"
                )
    return records


def _family(record: dict[str, Any]) -> str:
    return " + ".join(f"{tower}: {kind}" for tower, kind in record["towers"].items()) or "not built"


def _labels_cell(layers: Sequence[str]) -> str:
    blocks = [layer for layer in layers if layer in LAYERS]
    pool = [layer.removeprefix("pool.") for layer in layers if layer.startswith("pool.")]
    return " · ".join(part for part in (" ".join(blocks), f"pool: {' '.join(pool)}" if pool else "") if part)


def _error(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def _family_table(family: str, records: Sequence[dict[str, Any]]) -> Table:
    towers = [tower for tower in TOWER_ATTRIBUTES if any(tower in record["towers"] for record in records)]
    table = Table(title=f"### {family} ({len(records)})")
    for header in ("config", "status", *towers, "conversion", "export", "s", "peak MB"):
        table.add_column(
            header, justify="right" if header in ("conversion", "export", "s", "peak MB") else "left"
        )
    for record in records:
        status = status_of(record)
        if status != "FULL":
            status += (
                f": {record['failure'] or '; '.join(v for v in record['adapters'].values() if v != 'ok')}"
            )
        table.add_row(
            record["name"],
            status,
            *(_labels_cell(record["labels"].get(tower, [])) for tower in towers),
            _error(record["conversion_error"])
            + (
                f" (fp64 {_error(record['conversion_error_fp64'])})"
                if record["conversion_error_fp64"]
                else ""
            ),
            _error(record["export_error"]),
            f"{record['seconds']:.0f}",
            f"{record['peak_mb']:.0f}",
        )
    return table


def coverage_markdown(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The generated ``zoo_coverage.md``: how it was made, the counts, one table a family, the allow-list
    and what each tower kind leaves unlabelled."""
    counts = {
        status: sum(status_of(record) == status for record in records)
        for status in ("FULL", "ALLOWED", "FAILED")
    }
    width = "narrow widths (64) and small images" if meta["small"] else "real widths"
    lines = [
        "# open_clip's zoo in kr_vlm",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; load average "
        f"{meta['load_before']} before, {meta['load_after']} after; {meta['wall_s'] / 60:.0f} min wall). "
        f"Versions: {meta['versions']}.",
        "",
        f"Every config of `open_clip.list_models()` ({len(records)} here) built with random weights at reduced "
        f"depth (2 blocks a transformer tower, 1 a stage of a staged timm tower) and {width}, vocabularies "
        "of 1000 tokens, Hugging Face text towers from a `config.json` with the hub model's published shape written "
        "into a Hugging Face cache folder (`HF_HUB_OFFLINE=1`). For each: features before and after "
        "`convert_towers` (relative difference in fp32, and in float64 where the fp32 one is above 1e-6, since "
        "there the fp32 model differs from its own float64 self by as much: *conversion*); every label of every tower selected "
        "(`clip_targets(model, towers='all')`); KRAdapter, then LoRA through peft, injected on all of them with "
        "the forward check (every adapter called), one AdamW step with a gradient in every adapter, merged "
        "outputs equal to unmerged ones, and the merged export (`fuse_qkv_state_dict`) loaded strictly by a "
        "stock open_clip / timm model with equal features (*export*: the larger relative difference of the two "
        "methods). *s* and *peak MB*: wall time and peak resident memory of the config's own process.",
        "",
        f"**{counts['FULL']} FULL**, {counts['ALLOWED']} allowed (listed below with the reason), "
        f"{counts['FAILED']} failed.",
        "",
        'Labels: `q k v o fc1 fc2` of the blocks; `pool:` those of the tower\'s pooling head (`block: "pool"`).',
        "",
    ]
    families: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        families.setdefault(_family(record), []).append(record)
    for family, members in sorted(families.items(), key=lambda item: (-len(item[1]), item[0])):
        lines += [markdown_table(_family_table(family, members)), ""]
    lines += ["## Allow-list", ""]
    lines += [f"- `{name}`: {reason}" for name, reason in ALLOW_LIST.items()] or [
        "None: every config is FULL."
    ]
    lines += ["", "## What carries no label", ""]
    lines += [f"- {kind.name}: {kind.unlabelled}." for kind in KINDS if kind.unlabelled]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Path]:
    """``zoo_coverage.md`` and ``zoo_coverage.json`` (the records and how they were made) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "zoo_coverage.md", "json": out_dir / "zoo_coverage.json"}
    write_json_atomic(paths["json"], {"meta": meta, "records": records})
    write_text_atomic(paths["md"], coverage_markdown(records, meta))
    return paths


def walk_meta(command: str, small: bool) -> dict[str, Any]:
    """How the walk is run: command, date, machine, versions, load average (``wall_s`` and
    ``load_after`` are filled in when it ends)."""
    import open_clip
    import timm
    import torch
    import transformers

    from kr_vlm.benchmarks.mini import machine_description

    machine = machine_description(workers=1)
    return {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": f"{machine['cpu']}, {machine['cores']} cores, {machine['platform']}",
        "versions": f"torch {torch.__version__}, open_clip {open_clip.__version__}, timm {timm.__version__}, "
        f"transformers {transformers.__version__}",
        "small": small,
        "load_before": " ".join(f"{load:.1f}" for load in os.getloadavg()),
        "started": time.perf_counter(),
    }


def finish_meta(meta: dict[str, Any]) -> dict[str, Any]:
    started = meta.pop("started")
    return {
        **meta,
        "wall_s": time.perf_counter() - started,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
