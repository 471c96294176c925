"""Compiled kernel variants keep their own entries in numba's on-disk cache."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serial_and_parallel_variants_of_one_kernel_are_cached_apart(tmp_path):
    # numba keys its cache by name and line, not by options: one shared entry would load the
    # parallel build for the serial variant (a thread team woken on every small call)
    script = ("import numpy as np\n"
              "from recsys.optim import shuffle\n"
              "a = np.arange(10); v = np.ones(10, np.float32); ids = np.arange(3)\n"
              "outs = (np.empty(3, np.int64), np.empty(3, np.int64), np.empty(3, np.float32))\n"
              "shuffle._gather_parallel(a, a, v, ids, *outs)\n"
              "shuffle._gather_serial(a, a, v, ids, *outs)\n"
              "assert outs[0].tolist() == [0, 1, 2]\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env)
    indexes = sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.nbi") if "_gather" in p.name)
    assert indexes == ["shuffle._gather__parallel", "shuffle._gather__serial"]
