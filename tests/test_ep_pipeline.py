"""benchmarks/ep_pipeline.py's dry run: 2 gloo ranks through torchrun on the CPU, tiny shapes.
The GPU numbers come from the same script under torchrun with NCCL (benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ep_workers import free_port

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_dry_run_prints_the_table_with_sane_numbers() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "ep_pipeline.py", "--dry-run"],
        cwd=BENCHMARKS, capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| tiny \| 256 \| (\w+) \(\d+%\) \|.*\| ([\d.]+)x \| - \| ([\d.]+)x \| ([\d.]+) / ([\d.]+) / ([\d.]+) \|$",
                      done.stdout, re.MULTILINE)
    # each case printed as it finishes, then the whole table: uniform and skewed twice
    assert [r[0] for r in rows] == ["uniform", "skewed", "uniform", "skewed"], done.stdout
    for routing, speedup, wire, out, input_grad, weights in rows:
        # the dispatch and the combine backward cross as MXFP8 (264 of 512 B a row), the other two bf16
        assert float(wire) == 0.76, (routing, wire)
        # SiLU-gated experts in MX against bf16: the layer floors of tests/test_hoist_quantize.py
        assert float(out) >= 23 and float(input_grad) >= 23 and float(weights) >= 21, (routing, out, input_grad, weights)
