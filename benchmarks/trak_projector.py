"""TRAK's CPU projection: traker's BasicProjector at its default block size against one block.

traker's ``BasicProjector`` (its projector on CPU) draws the random matrix ``block_size`` columns
at a time (default 100) and re-draws every block for every batch it projects, so at
``proj_dim = 4000`` each batch draws 40 blocks of ``grad_dim x 100`` normals.
``baselines.trak.block_size >= proj_dim`` (daunce_core/baselines/trak.py) draws the matrix once.
This script times one batch's projection both ways, in the same run, and prints the ratio.

    .venv/bin/python benchmarks/trak_projector.py [--grad-dim 101770] [--proj-dim 4000] [--batch 250]
"""
from __future__ import annotations

import argparse
import time

import torch
from trak.projectors import BasicProjector, ProjectionType


def seconds_per_batch(grads: torch.Tensor, proj_dim: int, block_size: int, repeat: int) -> float:
    proj = BasicProjector(grads.shape[1], proj_dim, 0, ProjectionType.normal, "cpu", block_size=block_size)
    proj.project(grads, 0)  # warm-up (and, with one block, the matrix is already drawn)
    t = time.perf_counter()
    for _ in range(repeat):
        proj.project(grads, 0)
    return (time.perf_counter() - t) / repeat


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grad-dim", type=int, default=101770, help="parameters (tier 1's MLP: 101,770)")
    ap.add_argument("--proj-dim", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=250, help="baselines.batch_size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    grads = torch.randn(a.batch, a.grad_dim, generator=torch.Generator().manual_seed(0))
    ref = seconds_per_batch(grads, a.proj_dim, 100, a.repeat)
    one = seconds_per_batch(grads, a.proj_dim, a.proj_dim, a.repeat)
    print(f"grad_dim {a.grad_dim}, proj_dim {a.proj_dim}, batch {a.batch}, {a.threads} threads")
    print(f"block_size 100 (traker's default): {ref:.3f} s per batch")
    print(f"block_size {a.proj_dim} (one block): {one:.3f} s per batch, "
          f"{one / ref:.2f}x the default's time ({ref / one:.1f}x faster); "
          f"matrix held: {a.grad_dim * a.proj_dim * 4 / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
