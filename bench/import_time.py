"""How long ``import dlx`` takes once torch is imported (issue 2: well under a second).

Each measurement is a fresh interpreter: ``import torch`` first, then ``import dlx`` timed with
``perf_counter``. Prints the median and range of ``--runs`` interpreters.

Usage: python bench/import_time.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CODE = "import time, torch; t = time.perf_counter(); import dlx; print(time.perf_counter() - t)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    ms = [1e3 * float(subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                                     check=True).stdout) for _ in range(args.runs)]
    print(f"import dlx after torch: median {statistics.median(ms):.1f} ms, min {min(ms):.1f}, max {max(ms):.1f} "
          f"({args.runs} interpreters)")


if __name__ == "__main__":
    main()
