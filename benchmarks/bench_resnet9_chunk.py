#!/usr/bin/env python
"""Throughput of the ResNet-9 trainers on CIFAR-shaped synthetic data, and what it implies for
the paper-scale jobs. Prints figures; it is not a timed test.

Three measurements, each through the code the workflow runs (``daunce_core.ensemble``):

1. ``perturbed``: one chunk of ``--models`` perturbed ResNet-9s fine-tuned together from one
   theta_0 with ``fit_perturbed`` (torch.func.vmap over stacked parameters, BatchNorm frozen):
   one epoch over ``ratio * n`` examples at ``--batch``; images per second counted over all
   models of the chunk.
2. ``predict``: the chunk's logits on ``--n-eval`` examples (``predict``, vmapped), the step that
   records every example's loss under each model.
3. ``retrain``: one ResNet-9 trained from scratch with the base recipe (``fit_from_scratch``,
   BatchNorm in train mode, augmentation on), as theta_0 and every LDS retrain are.

Each is run once on a small slice first (warm-up: CUDA context, cuDNN autotuning) and then
timed. The rates are then applied to a paper config (``--config``, default
config/paper/cifar10.yaml) to estimate minutes per SLURM job and GPU-hours per figure. The
estimate assumes the job's time is its training and prediction (loading CIFAR-10 and writing
HDF5 are seconds) and that throughput does not change between the measured sizes and the
config's.

Run:
    .venv/bin/python benchmarks/bench_resnet9_chunk.py --tiny            # CPU, under a minute
    .venv/bin/python benchmarks/bench_resnet9_chunk.py --device cuda     # full size: the paper
        # config's chunk (50 models, batch 128, n = 50,000) and base recipe (batch 512)
Add ``--json out.json`` to keep the numbers.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daunce_core import ensemble as E  # noqa: E402
from daunce_core.config import ExperimentConfig, ModelConfig, TrainConfig  # noqa: E402
from daunce_core.models import build_model  # noqa: E402
from daunce_core.utils import pick_device, set_threads  # noqa: E402

E.tqdm = functools.partial(E.tqdm, disable=True)  # the trainers' progress bars would bury the figures

SHAPE = (3, 32, 32)  # CIFAR-10
N_CLASSES = 10
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def synthetic(n: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((n, *SHAPE), generator=g).to(device)
    y = torch.randint(0, N_CLASSES, (n,), generator=g).to(device)
    return X, y


def bench_perturbed(args, exp: ExperimentConfig, device) -> dict:
    """One chunk of perturbed fits (vmap), then its predictions."""
    mcfg = ModelConfig(arch="resnet9", width=args.width)
    net = build_model(mcfg, SHAPE, N_CLASSES).to(device)
    theta_0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    d = exp.daunce
    d.batch_size, d.epochs, d.ratio = args.batch, 1, args.ratio
    X, y = synthetic(args.n, device)
    Xe = X[: args.n_eval]
    p0, b0 = E.split_state(net, theta_0)
    logits0 = E.predict(net, E.stack_states([p0], device), E.stack_states([b0], device), X)[0]
    variant, lr = "daunce", float(d.lr_grid[0])

    # warm-up on a slice: same chunk width and batch, a few steps
    n_warm = min(args.n, max(4 * args.batch, int(math.ceil(4 * args.batch / args.ratio))))
    E.fit_perturbed(net, theta_0, X[:n_warm], y[:n_warm], list(range(args.models)), variant=variant,
                    cfg=d, lr=lr, logits0=logits0[:n_warm])
    reset_peak(device)
    (params, buffers), t_fit = timed(lambda: E.fit_perturbed(
        net, theta_0, X, y, list(range(args.models)), variant=variant, cfg=d, lr=lr, logits0=logits0), device)
    fit_peak = peak_mb(device)
    steps = int(round(args.ratio * args.n)) // min(args.batch, int(round(args.ratio * args.n)))
    images = args.models * steps * args.batch

    E.predict(net, params, buffers, Xe[: min(len(Xe), 256)])  # warm-up
    reset_peak(device)
    _, t_pred = timed(lambda: E.predict(net, params, buffers, Xe), device)
    return {
        "models": args.models, "batch": args.batch, "n": args.n, "ratio": args.ratio, "steps": steps,
        "fit_s": t_fit, "fit_images_per_s": images / t_fit, "fit_step_s": t_fit / max(1, steps),
        "fit_peak_mb": fit_peak,
        "predict_examples": len(Xe), "predict_s": t_pred,
        "predict_images_per_s": args.models * len(Xe) / t_pred, "predict_peak_mb": peak_mb(device),
    }


def bench_retrain(args, exp: ExperimentConfig, device) -> dict:
    """One ResNet-9 from scratch with the base recipe (loop mode, BatchNorm in train mode)."""
    mcfg = ModelConfig(arch="resnet9", width=args.width)
    recipe = TrainConfig(**{**exp.base.__dict__, "epochs": args.retrain_epochs,
                            "batch_size": args.retrain_batch})
    X, y = synthetic(args.n_retrain, device, seed=1)
    factory = lambda: build_model(mcfg, SHAPE, N_CLASSES)  # noqa: E731
    n_warm = min(args.n_retrain, 4 * args.retrain_batch)
    warm = TrainConfig(**{**recipe.__dict__, "epochs": 1})
    E.fit_from_scratch(factory, X, y, [np.arange(n_warm)], [(0, 0, 0, 7)], warm, augment=recipe.augment)
    reset_peak(device)
    _, t = timed(lambda: E.fit_from_scratch(factory, X, y, [np.arange(args.n_retrain)], [(0, 1, 0, 7)], recipe,
                                            augment=recipe.augment), device)
    steps = args.retrain_epochs * (args.n_retrain // min(args.retrain_batch, args.n_retrain))
    images = steps * min(args.retrain_batch, args.n_retrain)
    return {"n": args.n_retrain, "batch": args.retrain_batch, "epochs": args.retrain_epochs,
            "augment": recipe.augment, "s": t, "images_per_s": images / t, "peak_mb": peak_mb(device)}


def extrapolate(exp: ExperimentConfig, pert: dict, retr: dict) -> dict:
    """Minutes per SLURM job and GPU-hours per figure of a config, from measured rates."""
    n = exp.data.n_train or CIFAR_TRAIN
    m = exp.data.n_query or CIFAR_TEST
    d, lc, b = exp.daunce, exp.lds, exp.base
    sub = int(round(d.ratio * n))
    fit_imgs = d.chunk_size * d.epochs * (sub // min(d.batch_size, sub)) * min(d.batch_size, sub)
    pred_imgs = d.chunk_size * (n + m)
    per_lr = fit_imgs / pert["fit_images_per_s"] + pred_imgs / pert["predict_images_per_s"]
    pert_job_s = len(d.lr_grid) * per_lr
    n_pert_jobs = math.ceil(d.K / d.chunk_size)  # per variant

    def retrain_s(n_examples: int) -> float:
        bs = min(b.batch_size, n_examples)
        return b.epochs * (n_examples // bs) * bs / retr["images_per_s"]

    mask = int(math.ceil(lc.alpha * n))
    lds_job_s = lc.chunk_size * lc.seeds * retrain_s(mask)
    lds_jobs = math.ceil(lc.M / lc.chunk_size) + math.ceil(lc.M_select / lc.chunk_size)
    lds_total_s = (lc.M + lc.M_select) * lc.seeds * retrain_s(mask)
    base_s = retrain_s(n)
    wb = [v for v in d.variants if not v.endswith("_bb")]
    bb = [v for v in d.variants if v.endswith("_bb")]
    h = 1 / 3600
    shared = (base_s + lds_total_s) * h
    white = len(wb) * n_pert_jobs * pert_job_s * h
    black = len(bb) * n_pert_jobs * pert_job_s * h
    return {
        "base_job_min": base_s / 60,
        "perturbed_chunk_job_min": pert_job_s / 60,
        "perturbed_chunk_jobs": n_pert_jobs * len(d.variants),
        "lds_chunk_job_min": lds_job_s / 60,
        "lds_chunk_jobs": lds_jobs,
        "gpu_hours": {
            "base (theta_0)": base_s * h,
            "LDS ground truth (test + selection masks)": lds_total_s * h,
            f"DAUNCE white-box {wb} x {len(d.lr_grid)} lr": white,
            f"DAUNCE black-box {bb} x {len(d.lr_grid)} lr": black,
            "Figure 1a (theta_0, ground truth, white-box; baselines not included)": shared + white,
            "Figure 1b alone (theta_0, ground truth, black-box)": shared + black,
            "whole config (baselines not included)": shared + white + black,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (daunce_core.utils.pick_device)")
    ap.add_argument("--config", default=str(ROOT / "config" / "paper" / "cifar10.yaml"),
                    help="paper config to extrapolate to (and to take defaults from)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU-sized run: 2 models, width 1/8, 256 examples, batch 16, 1 thread per core")
    ap.add_argument("--models", type=int, help="models per chunk (default: the config's daunce.chunk_size)")
    ap.add_argument("--batch", type=int, help="perturbed minibatch (default: daunce.batch_size)")
    ap.add_argument("--ratio", type=float, help="subset ratio r (default: daunce.ratio)")
    ap.add_argument("--n", type=int, default=CIFAR_TRAIN, help="synthetic training examples")
    ap.add_argument("--n-eval", type=int, default=CIFAR_TEST, help="examples whose loss is predicted")
    ap.add_argument("--width", type=float, default=1.0, help="ResNet-9 channel multiplier")
    ap.add_argument("--n-retrain", type=int, help="examples of the from-scratch retrain (default alpha * n)")
    ap.add_argument("--retrain-batch", type=int, help="default: base.batch_size")
    ap.add_argument("--retrain-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    exp = ExperimentConfig.from_dict(yaml.safe_load(Path(args.config).read_text())).validate()
    if args.tiny:
        args.models = args.models or 2
        args.batch = args.batch or 16
        args.n, args.n_eval, args.width = min(args.n, 256), min(args.n_eval, 128), 0.125
        args.n_retrain = args.n_retrain or 128
        args.retrain_batch = args.retrain_batch or 32
        args.retrain_epochs = 1
        args.device = "cpu" if args.device == "auto" else args.device
        args.threads = args.threads or 1
    args.models = args.models or exp.daunce.chunk_size
    args.batch = args.batch or exp.daunce.batch_size
    args.ratio = args.ratio or exp.daunce.ratio
    args.n_retrain = args.n_retrain or int(math.ceil(exp.lds.alpha * args.n))
    args.retrain_batch = args.retrain_batch or exp.base.batch_size
    set_threads(args.threads)
    device = pick_device(args.device)

    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "width": args.width,
            "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    print(f"device {info['device']} {info['gpu'] or ''} torch {info['torch']}, {info['cpu_threads']} CPU threads; "
          f"ResNet-9 width {args.width}, synthetic {SHAPE} data", flush=True)
    pert = bench_perturbed(args, exp, device)
    print(f"perturbed fit : {pert['models']} models x {pert['steps']} steps x batch {pert['batch']}: "
          f"{pert['fit_s']:.2f} s, {pert['fit_images_per_s']:.0f} images/s, {pert['fit_step_s'] * 1e3:.1f} ms/step"
          + (f", peak {pert['fit_peak_mb']:.0f} MB" if pert["fit_peak_mb"] else ""), flush=True)
    print(f"predict       : {pert['models']} models x {pert['predict_examples']} examples: {pert['predict_s']:.2f} s, "
          f"{pert['predict_images_per_s']:.0f} images/s"
          + (f", peak {pert['predict_peak_mb']:.0f} MB" if pert["predict_peak_mb"] else ""), flush=True)
    retr = bench_retrain(args, exp, device)
    print(f"retrain       : 1 model x {retr['epochs']} epoch(s) x {retr['n']} examples, batch {retr['batch']}, "
          f"augment {retr['augment']}: {retr['s']:.2f} s, {retr['images_per_s']:.0f} images/s"
          + (f", peak {retr['peak_mb']:.0f} MB" if retr["peak_mb"] else ""), flush=True)

    est = extrapolate(exp, pert, retr)
    full = args.width == 1.0 and device.type == "cuda"
    print(f"\nEXTRAPOLATION to {Path(args.config).name} from these rates"
          + ("" if full else " (NOT meaningful: not a full-width ResNet-9 on a GPU)") + ":")
    print(f"  base job            {est['base_job_min']:8.1f} min")
    print(f"  perturbed_chunk job {est['perturbed_chunk_job_min']:8.1f} min  x {est['perturbed_chunk_jobs']} jobs")
    print(f"  lds_chunk job       {est['lds_chunk_job_min']:8.1f} min  x {est['lds_chunk_jobs']} jobs")
    for k, v in est["gpu_hours"].items():
        print(f"  {k:<72s} {v:8.2f} GPU-h")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "args": vars(args), "perturbed": pert,
                                               "retrain": retr, "estimate": est}, indent=2))


if __name__ == "__main__":
    main()
