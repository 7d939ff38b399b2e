"""Which BLAS survives the exact influence function's p x p float64 algebra? (docs/trust.md)

    .venv/bin/python benchmarks/exact_if_blas.py [--p 12000 17098] [--cols 1280] [--threads 2]
        [--out benchmarks/out/exact_if_blas.json]

For each p it runs, each in a fresh subprocess (a native crash kills only that one), the two
operations of ``daunce_core/baselines/exact.py`` on random data of the exact IF's shapes:

* ``syrk``: accumulating the Gauss-Newton curvature, two blocks of ``--cols`` rows of R
  (``--cols`` = batch 128 x 10 classes) into a p x p float64 matrix;
* ``cholesky``: factorising a p x p symmetric positive definite float64 matrix;

each through scipy's OpenBLAS (``scipy.linalg.blas.dsyrk``, ``scipy.linalg.cho_factor``: what
exact.py used), numpy's OpenBLAS (``R.T @ R``, ``np.linalg.cholesky``) and torch
(``addmm_``, ``torch.linalg.cholesky``: what exact.py uses now), with ``--threads`` BLAS
threads. It writes the exit status of each (-11: SIGSEGV) and its time, and prints a table. Needs
about 3 p^2 x 8 bytes of memory (7 GB at p = 17,098).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CODE = {
    ("scipy", "syrk"): """
        from scipy.linalg.blas import dsyrk
        H = np.zeros((p, p), order="F")
        for _ in range(2):
            R = rng.standard_normal((cols, p))
            H = dsyrk(1.0, R.T, beta=1.0, c=H, overwrite_c=1)
    """,
    ("numpy", "syrk"): """
        H = np.zeros((p, p))
        for _ in range(2):
            R = rng.standard_normal((cols, p))
            H += R.T @ R
    """,
    ("torch", "syrk"): """
        import torch
        H = torch.zeros((p, p), dtype=torch.float64)
        for _ in range(2):
            R = torch.from_numpy(rng.standard_normal((cols, p)))
            H.addmm_(R.T, R)
    """,
    ("scipy", "cholesky"): """
        import scipy.linalg
        scipy.linalg.cho_factor(spd(), lower=True, overwrite_a=True, check_finite=False)
    """,
    ("numpy", "cholesky"): """
        np.linalg.cholesky(spd())
    """,
    ("torch", "cholesky"): """
        import torch
        torch.linalg.cholesky(torch.from_numpy(spd()))
    """,
}

PRELUDE = """
import sys, numpy as np
p, cols = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
def spd():
    A = rng.random((p, p)); A += A.T; A[np.diag_indices(p)] += 2 * p
    return A
"""


def run(library: str, op: str, p: int, cols: int, threads: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    code = PRELUDE + textwrap.dedent(CODE[library, op])
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, str(p), str(cols)], env=env, capture_output=True,
                         text=True)
    return {"library": library, "op": op, "p": p, "cols": cols, "threads": threads,
            "exit": res.returncode, "seconds": round(time.perf_counter() - t, 2),
            "stderr": res.stderr.strip().splitlines()[-1:] if res.returncode else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", type=int, nargs="+", default=[12000, 17098])
    ap.add_argument("--cols", type=int, default=1280)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/exact_if_blas.json")
    args = ap.parse_args()
    rows = [run(lib, op, p, args.cols, args.threads) for p in args.p for op in ("syrk", "cholesky")
            for lib in ("scipy", "numpy", "torch")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    import numpy
    import scipy
    import torch
    print(f"numpy {numpy.__version__}, scipy {scipy.__version__}, torch {torch.__version__}, "
          f"{args.threads} BLAS threads")
    for r in rows:
        status = "ok" if r["exit"] == 0 else f"exit {r['exit']}" + (" (SIGSEGV)" if r["exit"] == -11 else "")
        print(f"p={r['p']:>6} {r['op']:>9} {r['library']:>6}: {status:>16} {r['seconds']:7.1f} s")


if __name__ == "__main__":
    main()
