"""The Triton cast kernels under the Triton interpreter on the CPU (CI); on the GPU in test_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_quantize_rebase_kernel_is_bit_exact_under_the_interpreter() -> None:
    # TRITON_INTERPRET must be set before the kernels are defined: a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "kernel_cases.py", "cpu"], cwd=Path(__file__).parent,
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "all bit-exact", done.stdout
