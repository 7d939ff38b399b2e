#!/usr/bin/env python
"""Benchmark of the scoring engine: speed against a bare GEMM, peak memory, storage.

Prints figures; it is not a timed test. Three parts:

1. In memory: ``topk_scores`` on n x m x K random losses (default 1,000,000 x 10,000 x 200,
   top-100, correlation) against numpy's float32 GEMM of the same shapes in the same process.
   The GEMM ``A.T @ B`` (A = train [K, n], B = query [K, m]) has an n x m output (40 GB at the
   default sizes), more than this machine holds, so it is timed slab by slab (4096 rows into
   one reused buffer): the same flops and BLAS calls without 40 GB of page faults, i.e. a lower
   bound on the time of the single call, which makes the ratio conservative. ``B.T @ A`` (the
   orientation the scorer's tiles use, faster on some BLAS builds) is reported beside it.
   Repeats are interleaved and the best of each is compared, since the machine may be shared.
   Peak memory: the process's resident set, sampled while scoring, and its high-water mark.
2. ``--h5``: ``score_file`` on a 10,000,000 x 200 losses file on disk (8 GB, m = 1,000) in a
   fresh process, with the file's pages dropped from the page cache first (unless ``--warm``);
   prints throughput and peak memory. Files go under benchmarks/out/ and are deleted after.
3. Bytes per training example stored by DAUNCE against TRAK and LoGra.

Run: ``.venv/bin/python benchmarks/bench_scoring.py`` (add ``--n 100000`` for a quick look,
``--h5`` for part 2).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daunce_core import scoring, store  # noqa: E402

GiB = 2**30
OUT = ROOT / "benchmarks" / "out"
SLAB = 4096  # rows of the reference GEMM per call


class PeakRSS:
    """Highest resident set size of this process while the context is open (sampled)."""

    def __init__(self, every_s: float = 0.01):
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def maxrss() -> int:
    """Peak resident set of this process: VmHWM, where Linux has it.

    Not ``ru_maxrss`` alone: after fork and exec, Linux carries the parent's high-water mark
    into the child's ``ru_maxrss``, which would charge part 1's losses to part 2's process.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def random_losses(K: int, n: int, seed: int) -> np.ndarray:
    """[K, n] float32 losses, filled row by row (no float64 temporary of the whole array)."""
    rng = np.random.default_rng(seed)
    out = np.empty((K, n), np.float32)
    for k in range(K):
        rng.standard_normal(out=out[k], dtype=np.float32)
    # A per-model shift shared by every example, as a real perturbation would move all losses.
    out += rng.standard_normal((K, 1), dtype=np.float32)
    return out


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def gemm_AtB(A: np.ndarray, B: np.ndarray) -> None:
    """A.T @ B [n, m] in slabs of SLAB rows into one buffer."""
    n, m = A.shape[1], B.shape[1]
    out = np.empty((min(n, SLAB), m), np.float32)
    for lo in range(0, n, SLAB):
        hi = min(n, lo + SLAB)
        np.matmul(A[:, lo:hi].T, B, out=out[:hi - lo])


def gemm_BtA(A: np.ndarray, B: np.ndarray) -> None:
    """B.T @ A [m, n] in slabs of SLAB columns into one buffer."""
    n, m = A.shape[1], B.shape[1]
    out = np.empty(m * min(n, SLAB), np.float32)
    for lo in range(0, n, SLAB):
        hi = min(n, lo + SLAB)
        np.matmul(B.T, A[:, lo:hi], out=out[:m * (hi - lo)].reshape(m, hi - lo))


def check_sample(train, query, idx, val, queries, measure, tol=1e-5) -> str:
    """Exact float64 top-k of a few queries over all n, compared with the scorer's."""
    worst = 0.0
    ok_all = True
    missing = 0
    k = idx.shape[1]
    for j in queries:
        exact = np.empty(train.shape[1])
        q = query[:, j].astype(np.float64)
        q -= q.mean()
        for lo in range(0, train.shape[1], 65536):
            t = train[:, lo:lo + 65536].astype(np.float64)
            t -= t.mean(0)
            exact[lo:lo + 65536] = t.T @ q
            if measure == "correlation":
                exact[lo:lo + 65536] /= np.linalg.norm(t, axis=0) * np.linalg.norm(q)
            else:
                exact[lo:lo + 65536] /= train.shape[0] - 1
        tol_j = tol * np.abs(exact).max()  # relative to this query's scale, not compounded
        ref = np.sort(exact)[::-1][:k]
        err = max(float(np.abs(ref - val[j]).max()), float(np.abs(exact[idx[j]] - val[j]).max()))
        worst = max(worst, err)
        ok_all = ok_all and err <= tol_j
        clearly_in = np.flatnonzero(exact > ref[-1] + tol_j)
        missing += len(set(clearly_in.tolist()) - set(idx[j].tolist()))
    ok = ok_all and missing == 0
    return (f"{'OK' if ok else 'MISMATCH'}: {len(queries)} queries checked against float64, "
            f"max |error| {worst:.1e}, {missing} clear top-{k} members missed")


def part_memory(args) -> None:
    K, n, m, k = args.K, args.n, args.m, args.k
    print(f"== in memory: n={n:,} m={m:,} K={K} top-{k} {args.measure}, "
          f"memory_gb={args.memory_gb}, threads={args.threads or scoring.default_threads()}")
    scoring.topk_scores(random_losses(K, 300, 1), random_losses(K, 5, 2), 3)  # JIT / cache load
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    train = random_losses(K, n, 1)
    query = random_losses(K, m, 2)
    losses_bytes = train.nbytes + query.nbytes
    print(f"losses: {losses_bytes / GiB:.2f} GiB, generated in {time.perf_counter() - t0:.1f} s; "
          f"process before them {base / GiB:.2f} GiB")

    def daunce():
        return scoring.topk_scores(train, query, k, args.measure, memory_gb=args.memory_gb,
                                   threads=args.threads)

    rows = {"daunce": [], "A.T @ B": [], "B.T @ A": []}
    peak = 0
    result = None
    for r in range(args.repeats):
        with PeakRSS() as p:
            w0, c0 = time.perf_counter(), time.process_time()
            result = daunce()
            rows["daunce"].append((time.perf_counter() - w0, time.process_time() - c0))
        peak = max(peak, p.peak)
        if r == 0:
            peak_after_first = maxrss()
        rows["A.T @ B"].append(timed(lambda: gemm_AtB(train, query)))
        rows["B.T @ A"].append(timed(lambda: gemm_BtA(train, query)))
        done = ", ".join(f"{name} {v[-1][0]:.2f} s" for name, v in rows.items())
        print(f"  repeat {r + 1}: {done}", flush=True)
    best = {name: min(v) for name, v in rows.items()}
    for name, (w, c) in best.items():
        print(f"{name:>8}: best wall {w:7.2f} s (cpu {c:7.2f} s)  median wall "
              f"{np.median([x[0] for x in rows[name]]):7.2f} s")
    ratio = best["daunce"][0] / best["A.T @ B"][0]
    ratio_strict = best["daunce"][0] / best["B.T @ A"][0]
    cpu_ratio = best["daunce"][1] / min(c for _, c in rows["A.T @ B"] + rows["B.T @ A"])
    verdict = "met" if ratio <= 1.25 else "MISSED"
    print(f"RATIO wall, DAUNCE / (A.T @ B): {ratio:.3f}  (goal <= 1.25: {verdict})")
    print(f"      wall, DAUNCE / (B.T @ A): {ratio_strict:.3f}  (the faster GEMM orientation here: "
          f"{'met' if ratio_strict <= 1.25 else 'MISSED'})")
    print(f"      cpu time, DAUNCE / (best GEMM): {cpu_ratio:.3f}  (the steadier figure when "
          "other processes share the cores: wall times then include waiting for a core)")
    limit = losses_bytes + GiB
    print(f"PEAK memory while scoring (sampled RSS): {peak / GiB:.2f} GiB; process peak after the "
          f"first scoring (VmHWM): {peak_after_first / GiB:.2f} GiB; limit losses + 1 GiB = "
          f"{limit / GiB:.2f} GiB: {'met' if max(peak, peak_after_first) <= limit else 'MISSED'}")
    idx, val = result
    print("accuracy " + check_sample(train, query, idx, val, [0, m // 2, m - 1], args.measure))


def write_big_losses(path: Path, K: int, n: int, m: int, seed: int) -> int:
    """Losses file in the losses layout of daunce_core/store/, written block by block (never all in memory)."""
    rng = np.random.default_rng(seed)
    step = 65536
    shift = rng.standard_normal((K, 1), dtype=np.float32)
    t0 = time.perf_counter()
    with store.atomic_h5(path) as f:
        ds = f.create_dataset("train", shape=(K, n), dtype=np.float32, chunks=(K, 4096))
        buf = np.empty((K, step), np.float32)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            b = buf[:, :hi - lo]
            rng.standard_normal(out=buf, dtype=np.float32)
            b += shift
            ds[:, lo:hi] = b
        f.create_dataset("query", data=random_losses(K, m, seed + 1), chunks=(K, min(m, 4096)))
        f.create_dataset("model_index", data=np.arange(K, dtype=np.int64))
        f.create_dataset("train_ids", data=np.arange(n, dtype=np.int64))
        f.create_dataset("query_ids", data=np.arange(m, dtype=np.int64))
        f.attrs["variant"] = "daunce"
        f.attrs["signal"] = "loss"
    print(f"wrote {path} ({path.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return path.stat().st_size


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def part_h5(args) -> None:
    K, n, m, k = args.K, args.h5_n, args.h5_m, args.k
    print(f"\n== from HDF5 on disk: n={n:,} m={m:,} K={K} top-{k} {args.measure}, "
          f"memory_gb={args.memory_gb}")
    OUT.mkdir(parents=True, exist_ok=True)
    losses, scores = OUT / "bench_losses.h5", OUT / "bench_scores.h5"
    try:
        size = write_big_losses(losses, K, n, m, seed=3)
        if not args.warm:
            drop_from_page_cache(losses)
        cmd = [sys.executable, __file__, "--child-score", str(losses), str(scores),
               "--memory-gb", str(args.memory_gb), "--k", str(k), "--measure", args.measure]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                         .stdout.strip().splitlines()[-1])
        limit = K * n * 4 + m * K * 4 + GiB
        cache = "warm" if args.warm else "cold"
        print(f"score_file: {res['wall']:.1f} s wall, {res['cpu']:.1f} s cpu ({cache} page "
              f"cache), THROUGHPUT {n / res['wall']:,.0f} training examples/s")
        print(f"PEAK memory of the scoring process (VmHWM): {res['peak'] / GiB:.2f} GiB "
              f"(memory_gb {args.memory_gb}; limit losses + 1 GiB = {limit / GiB:.2f} GiB: "
              f"{'met' if res['peak'] <= limit else 'MISSED'}); file {size / 1e9:.1f} GB")
        out = store.read_scores(scores)
        print(f"output: {out['format']} indices {out['indices'].shape}, values "
              f"{out['values'].shape}")
    finally:
        if not args.keep:
            for p in (losses, scores):
                p.unlink(missing_ok=True)


def child_score(args) -> None:
    losses, scores = args.child_score
    scoring.topk_scores(random_losses(args.K, 300, 1), random_losses(args.K, 5, 2), 3)  # JIT
    t0, c0 = time.perf_counter(), time.process_time()
    scoring.score_file(losses, scores, measure=args.measure, topk=args.k,
                       memory_gb=args.memory_gb, threads=args.threads)
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                      "peak": maxrss()}))


def part_storage(K_values=(200, 100)) -> None:
    print("\n== bytes stored per training example")
    rows = [(f"DAUNCE, K={K} float32 losses (K=200: CIFAR-10 LDS; K=100: LLM removal)", 4 * K)
            for K in K_values]
    rows.append(("TRAK, paper default 20,480 dims, float16", 20_480 * 2))
    # LoGra projects each linear module's gradient to r_in x r_out = 64 x 64; q,k,v,o,gate,up,down
    # in every decoder block: 32 blocks for Llama-3.1-8B, 28 for Qwen2.5-7B (the paper's LLMs).
    for model, blocks in (("Llama-3.1-8B", 32), ("Qwen2.5-7B", 28)):
        dims = blocks * 7 * 64 * 64
        rows.append((f"LoGra, rank 64x64 per linear module, {model} ({blocks}x7 modules, "
                     f"{dims:,} dims), float16", dims * 2))
    daunce = rows[0][1]
    for name, b in rows:
        print(f"{b:>12,} B  ({b / daunce:8.1f} x DAUNCE K=200)  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="training examples (in memory)")
    ap.add_argument("--m", type=int, default=10_000, help="queries (in memory)")
    ap.add_argument("--K", type=int, default=200, help="perturbed models")
    ap.add_argument("--k", type=int, default=100, help="top-k per query")
    ap.add_argument("--measure", default="correlation", choices=scoring.MEASURES)
    ap.add_argument("--memory-gb", type=float, default=1.0, help="scorer budget")
    ap.add_argument("--threads", type=int, default=None, help="workers (default: all cores)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (best is kept)")
    ap.add_argument("--skip-memory", action="store_true", help="skip part 1")
    ap.add_argument("--h5", action="store_true", help="also run part 2 (writes 8 GB)")
    ap.add_argument("--h5-n", type=int, default=10_000_000, help="training examples on disk")
    ap.add_argument("--h5-m", type=int, default=1_000, help="queries for the on-disk run")
    ap.add_argument("--warm", action="store_true", help="keep the file in the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the files under benchmarks/out/")
    ap.add_argument("--child-score", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_score:
        child_score(args)
        return
    print(f"machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / GiB:.0f} GiB; "
          f"load average {os.getloadavg()[0]:.1f} at start; numpy {np.__version__}")
    if not args.skip_memory:
        part_memory(args)
    if args.h5:
        part_h5(args)
    part_storage()


if __name__ == "__main__":
    main()
