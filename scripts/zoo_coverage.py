"""Walk open_clip's model zoo at reduced depth and write the coverage table by family.

Every config of ``open_clip.list_models()`` (or those given) is built with random weights, converted,
labelled, adapted with KRAdapter and LoRA, trained one step, merged and exported, each in a fresh process:
kr_vlm.models.zoo.check_model. Nothing is downloaded.

    python scripts/zoo_coverage.py                             # the whole zoo (hours): logs/zoo_coverage/<time>/
    python scripts/zoo_coverage.py --out docs                  # the same, refreshing docs/zoo_coverage.md
    python scripts/zoo_coverage.py --small --models ViT-B-16 RN50 EVA02-B-16

Exit status 1 when a config is neither FULL nor in the allow-list (kr_vlm.models.zoo.ALLOW_LIST).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kr_vlm.benchmarks.zoo_coverage import finish_meta, run_walk, status_of, walk_meta, write_outputs
from kr_vlm.errors import command_boundary
from kr_vlm.files import new_output_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the table (default: logs/zoo_coverage/<date>_<time>; --out docs refreshes docs/)",
    )
    parser.add_argument("--models", nargs="+", help="open_clip model names (default: all of list_models())")
    parser.add_argument("--small", action="store_true", help="narrow widths and small images (fast)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import open_clip

    names = args.models or open_clip.list_models()
    unknown = sorted(set(names) - set(open_clip.list_models()))
    if unknown:
        print(f"Unknown open_clip model names: {', '.join(unknown)}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "scripts/zoo_coverage.py", *(sys.argv[1:] if argv is None else argv)])
    out = args.out or new_output_folder("zoo_coverage")
    print(f"The table goes to {out}", flush=True)
    meta = walk_meta(command, args.small)
    records = run_walk(names, args.small)
    paths = write_outputs(out, records, finish_meta(meta))
    failed = [record["name"] for record in records if status_of(record) == "FAILED"]
    print(f"Wrote {paths['md']}; {len(records) - len(failed)}/{len(records)} FULL or allowed.")
    return 1 if failed else 0


if __name__ == "__main__":
    with command_boundary():
        sys.exit(main())
