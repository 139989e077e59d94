"""``benchmarks/extract.py --quick`` end to end: every stage and ratio is printed (not timings)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import re
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "extract.py"


def _run(argv):
    spec = importlib.util.spec_from_file_location("extract_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert module.main(argv) == 0
    return module, out.getvalue()


def test_quick_benchmark_prints_every_stage_and_finite_ratios(one_thread):
    module, text = _run(["--quick", "--no-baseline", "--rounds", "1", "--threads", "1"])
    tables = text.split("== stages: ")[1:]
    modes = re.findall(r"== stages: (\S+), (\w+) ", text)
    assert {config for config, _ in modes} == {"R-50-grid", "R-50-updn"}
    assert {"exact", "fast"} <= {mode for _, mode in modes}
    for table in tables:
        for stage in module.STAGES + ("total",):
            assert re.search(rf"^  {re.escape(stage)}\s", table, re.M), (stage, table[:200])
    # Stages that run in every region kind have a time; compute stages a FLOP count.
    grid_table = tables[0]
    assert re.search(r"^  backbone stem\.\.res4\s+[\d.]+\s+[\d.]+", grid_table, re.M)
    assert re.search(r"^  score filter \+ per-class NMS\s+-\s+[\d.]+", grid_table, re.M)
    throughput = text.split("== throughput")[1].split("== quality")[0]
    rows = re.findall(r"^  (R-50-\w+)\s+(grid|region-d2|region-bu)\s+(.+)$", throughput, re.M)
    assert len(rows) == 6
    for _, _, values in rows:
        numbers = [float(v) for v in values.split()]
        assert numbers and all(math.isfinite(v) and v > 0 for v in numbers)
    quality = text.split("== quality")[1]
    assert "fast  region-d2" in quality and "matched" in quality and "grid cosine" in quality
