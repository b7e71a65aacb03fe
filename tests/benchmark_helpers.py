"""CLIP_benchmark in tests (importable: `from benchmark_helpers import needs_clip_benchmark, TEMPLATE_KIND_PARAMS`).

kr_vlm reads CLIP_benchmark's class names, templates and datasets from the optional `clip-benchmark`
package (`pip install -e '.[benchmark]'`); tests that need it are skipped, saying so, where it is absent.
"""

from __future__ import annotations

import importlib.util

import pytest

from kr_vlm.data.templates import TEMPLATE_KINDS

HAVE_CLIP_BENCHMARK = importlib.util.find_spec("clip_benchmark") is not None
needs_clip_benchmark = pytest.mark.skipif(
    not HAVE_CLIP_BENCHMARK, reason="the benchmark extra is not installed (pip install -e '.[benchmark]')"
)
# Every template kind, the CLIP_benchmark one skipped without its package.
TEMPLATE_KIND_PARAMS = [
    pytest.param(kind, marks=needs_clip_benchmark) if kind == "clip_benchmark" else kind
    for kind in TEMPLATE_KINDS
]
