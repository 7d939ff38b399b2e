#!/usr/bin/env python
"""ResNet-9 through the workflow's own trainers: images/s per model and the projected GPU-hours of
a paper config. Prints figures; it is not a timed test.

Measured on CIFAR-shaped synthetic data (3 x 32 x 32, 10 classes), each after a warm-up run of the
same shapes (CUDA context, cuDNN autotuning):

* ``retrain``: a chunk of ``--models`` ResNet-9s trained from scratch with the base recipe,
  ``daunce_core.ensemble.fit_from_scratch`` -- the call of every LDS chunk (``lds.retrain_outputs``)
  and, with one model, of theta_0. The trainer picks how the models share the device (the
  ``mode`` it passed to ``train_stacked`` is recorded: ``vmap``, BatchNorm in train mode
  included, unless ``models.can_vmap`` refuses the model: then ``loop``, one after another);
* ``perturbed``: a chunk of perturbed fits from one theta_0 (``ensemble.fit_perturbed``, vmapped,
  BatchNorm as ``daunce.batchnorm`` says) and the chunk's logits on every example
  (``ensemble.predict``), the two steps of ``fit.ensemble.EnsembleFitter.fit``.

``--precision bf16``, ``--channels-last`` and ``--compile`` set the trainer's speed options
(``base.precision``, ``base.channels_last``, ``base.compile``; default: the config's) for the
retrains and the perturbed fits alike; the figures record them. With ``--compile`` every timed
call compiles again (as every job does), so its rates include one compilation.

"images/s" is model-images per second of the device: C models x B images per step / step time.
"per model" divides by the C models trained at once. The projection multiplies the images of
each job of ``--config`` (its sizes: n, M, K, chunks, epochs, lr grid) by these rates, so it
holds only for the device, width and trainer measured: on a CPU, or at a width other than 1, the
figures are information about this machine, NOT GPU estimates, and the script says so.

    python benchmarks/bench_retrain.py --device cuda   # full width; paper-sized chunks (a few minutes)
    python benchmarks/bench_retrain.py --device cuda --precision bf16 --channels-last --compile
    python benchmarks/bench_retrain.py --device cpu    # width 1/8, small sizes (seconds; information only)

``--json PATH`` also writes the figures. ``benchmarks/gpu_check.py`` calls the functions below.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from daunce_core import ensemble as E  # noqa: E402
from daunce_core.config import DaunceConfig, ExperimentConfig, ModelConfig, TrainConfig  # noqa: E402
from daunce_core.models import build_model  # noqa: E402
from daunce_core.utils import pick_device, set_threads  # noqa: E402

SHAPE = (3, 32, 32)  # CIFAR-10
N_CLASSES = 10
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
PAPER_CONFIG = ROOT / "config" / "paper" / "cifar10.yaml"
NOT_GPU = "NOT a GPU estimate: CPU or reduced width, information about this machine only"


def quiet_trainers() -> None:
    """The trainers' progress bars would bury the figures."""
    if not isinstance(E.tqdm, functools.partial):
        E.tqdm = functools.partial(E.tqdm, disable=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak``: CUDA's allocator on a GPU; on a CPU the process's
    resident high-water mark (VmHWM), which covers the whole run so far, not one measurement."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, device: torch.device) -> tuple[Any, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def synthetic(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-normal images and uniform labels: the trainers' cost does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE), generator=g).to(device), torch.randint(0, N_CLASSES, (n,), generator=g).to(device)


def load_config(path: str | Path = PAPER_CONFIG) -> ExperimentConfig:
    return ExperimentConfig.from_dict(yaml.safe_load(Path(path).read_text())).validate()


class _ModeSpy:
    """Records the ``mode`` that ``fit_from_scratch`` hands ``train_stacked`` (vmap or loop)."""

    def __init__(self):
        self.modes: list[str] = []

    def __enter__(self):
        self._orig = E.train_stacked

        def spy(*a, **kw):
            self.modes.append(kw.get("mode", "vmap"))
            return self._orig(*a, **kw)

        E.train_stacked = spy
        return self

    def __exit__(self, *exc):
        E.train_stacked = self._orig


def measure_retrain(device: torch.device, recipe: TrainConfig, *, width: float, models: int, n: int,
                    epochs: int = 1) -> dict[str, Any]:
    """``models`` ResNet-9s from scratch on ``n`` examples for ``epochs`` with ``recipe`` (its batch,
    optimiser and augmentation), in one ``fit_from_scratch`` call as an LDS chunk runs them."""
    quiet_trainers()
    recipe = dataclasses.replace(recipe, epochs=epochs)
    factory = functools.partial(build_model, ModelConfig(arch="resnet9", width=width), SHAPE, N_CLASSES)
    X, y = synthetic(n, device, seed=1)
    bs = min(recipe.batch_size, n)
    warm_n = min(n, 2 * bs)
    keys = [(0, j, 0, 7) for j in range(models)]
    E.fit_from_scratch(factory, X[:warm_n], y[:warm_n], [np.arange(warm_n)] * models, keys,
                       dataclasses.replace(recipe, epochs=1), augment=recipe.augment)
    reset_peak(device)
    with _ModeSpy() as spy:
        _, t = timed(lambda: E.fit_from_scratch(factory, X, y, [np.arange(n)] * models, keys, recipe,
                                                augment=recipe.augment), device)
    images = models * epochs * (n // bs) * bs
    return {"models": models, "width": width, "n": n, "batch": bs, "epochs": epochs, "augment": recipe.augment,
            "mode": spy.modes[0] if spy.modes else "?", **speed_record(E.Speed.from_train(recipe)),
            "seconds": t, "images": images,
            "images_per_s": images / t, "images_per_s_per_model": images / t / models,
            "peak_mb": peak_mb(device)}


def speed_record(speed: E.Speed) -> dict[str, Any]:
    return {"precision": speed.precision, "channels_last": speed.channels_last, "compile": speed.compile}


def measure_perturbed(device: torch.device, daunce: DaunceConfig, *, width: float, models: int, n: int,
                      n_eval: int, speed: E.Speed | None = None) -> dict[str, Any]:
    """One chunk of ``models`` perturbed fits (one epoch on ``ratio * n`` examples at the config's
    batch, vmapped, with ``speed``: the trainer's options, default all off), then its logits on
    ``n_eval`` examples."""
    quiet_trainers()
    net = build_model(ModelConfig(arch="resnet9", width=width), SHAPE, N_CLASSES).to(device)
    theta_0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    d = dataclasses.replace(daunce, epochs=1)
    X, y = synthetic(n, device)
    p0, b0 = E.split_state(net, theta_0)
    logits0 = E.predict(net, E.stack_states([p0], device), E.stack_states([b0], device), X)[0]
    ks, lr = list(range(models)), float(d.lr_grid[-1])
    sub = int(round(d.ratio * n))
    bs = min(d.batch_size, sub)
    warm_n = min(n, math.ceil(2 * bs / d.ratio))
    speed = speed or E.Speed()
    E.fit_perturbed(net, theta_0, X[:warm_n], y[:warm_n], ks, variant="daunce", cfg=d, lr=lr,
                    logits0=logits0[:warm_n], speed=speed)
    reset_peak(device)
    (params, buffers), t_fit = timed(lambda: E.fit_perturbed(net, theta_0, X, y, ks, variant="daunce", cfg=d,
                                                             lr=lr, logits0=logits0, speed=speed), device)
    fit_peak = peak_mb(device)
    fit_images = models * (sub // bs) * bs
    Xe = X[:n_eval]
    E.predict(net, params, buffers, Xe[: min(len(Xe), 256)])
    reset_peak(device)
    _, t_pred = timed(lambda: E.predict(net, params, buffers, Xe), device)
    return {"models": models, "width": width, "n": n, "ratio": d.ratio, "batch": bs, "steps": sub // bs,
            "batchnorm": d.batchnorm, "augment": d.augment, **speed_record(speed),
            "fit_seconds": t_fit, "fit_images_per_s": fit_images / t_fit,
            "fit_images_per_s_per_model": fit_images / t_fit / models, "fit_peak_mb": fit_peak,
            "predict_examples": len(Xe), "predict_seconds": t_pred,
            "predict_images_per_s": models * len(Xe) / t_pred, "predict_peak_mb": peak_mb(device)}


def project(exp: ExperimentConfig, *, base: dict, lds: dict, perturbed: dict | None) -> dict[str, Any]:
    """Minutes per job and device-hours per figure of ``exp`` at the measured rates.

    ``base``: a one-model retrain (theta_0); ``lds``: a chunk of retrains (its rate applies to
    every ``lds_chunk`` job); ``perturbed``: a perturbed chunk (None: that part is left out).
    Data loading and file writing are left out (seconds per job).
    """
    n = exp.data.n_train or CIFAR_TRAIN
    m = exp.data.n_query or CIFAR_TEST
    b, lc, d = exp.base, exp.lds, exp.daunce

    def retrain_images(n_examples: int) -> int:
        bs = min(b.batch_size, n_examples)
        return b.epochs * (n_examples // bs) * bs

    base_s = retrain_images(n) / base["images_per_s"]
    mask = int(math.ceil(lc.alpha * n))
    per_retrain_s = retrain_images(mask) / lds["images_per_s"]  # device seconds, models sharing it
    lds_total_s = (lc.M + lc.M_select) * lc.seeds * per_retrain_s
    out: dict[str, Any] = {
        "config": exp.experiment, "n": n, "m": m,
        "base_job_min": base_s / 60,
        "lds_retrain_s": per_retrain_s,
        "lds_chunk_job_min": lc.chunk_size * lc.seeds * per_retrain_s / 60,
        "lds_chunk_jobs": math.ceil(lc.M / lc.chunk_size) + math.ceil(lc.M_select / lc.chunk_size),
    }
    h = 1 / 3600
    hours = {"theta_0 (base)": base_s * h, "LDS ground truth (test + selection masks)": lds_total_s * h}
    if perturbed is not None:
        sub = int(round(d.ratio * n))
        bs = min(d.batch_size, sub)
        fit_images = d.chunk_size * d.epochs * (sub // bs) * bs
        per_lr = fit_images / perturbed["fit_images_per_s"] + d.chunk_size * (n + m) / perturbed["predict_images_per_s"]
        job_s = len(d.lr_grid) * per_lr
        jobs = math.ceil(d.K / d.chunk_size)
        from daunce_core.config import fit_variant

        fitted = list(dict.fromkeys(fit_variant(v) for v in d.variants))  # daunce_t_q reuses daunce_t's fits
        wb = [v for v in fitted if not v.endswith("_bb")]
        bb = [v for v in fitted if v.endswith("_bb")]
        out.update(perturbed_chunk_job_min=job_s / 60, perturbed_chunk_jobs=jobs * len(fitted))
        hours[f"DAUNCE white-box {wb} x {len(d.lr_grid)} lr"] = len(wb) * jobs * job_s * h
        hours[f"DAUNCE black-box {bb} x {len(d.lr_grid)} lr"] = len(bb) * jobs * job_s * h
        shared = hours["theta_0 (base)"] + hours["LDS ground truth (test + selection masks)"]
        hours["Figure 1a (baselines not included)"] = shared + len(wb) * jobs * job_s * h
        hours["whole config (baselines not included)"] = shared + len(fitted) * jobs * job_s * h
    out["device_hours"] = hours
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {"device": str(device), "name": torch.cuda.get_device_name(device) if cuda else platform.processor()
            or platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cpu_threads": torch.get_num_threads(), "tf32_conv": torch.backends.cudnn.allow_tf32,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "peak_memory": "torch.cuda.max_memory_allocated" if cuda else "process VmHWM (whole run)"}


def is_gpu_estimate(device: torch.device, width: float) -> bool:
    return device.type == "cuda" and width == 1.0


def opts(r: dict[str, Any]) -> str:
    flags = [o.replace("_", "-") for o in ("channels_last", "compile") if r.get(o)]
    return " ".join([r.get("precision", "fp32"), *flags])


def print_rates(name: str, r: dict[str, Any]) -> None:
    if "fit_images_per_s" in r:
        print(f"{name:<10s}: {r['models']} models x {r['steps']} steps x batch {r['batch']} (vmapped, {opts(r)}): "
              f"{r['fit_images_per_s']:.0f} images/s, {r['fit_images_per_s_per_model']:.0f} per model, "
              f"peak {r['fit_peak_mb']:.0f} MB; predictions {r['predict_images_per_s']:.0f} images/s", flush=True)
    else:
        print(f"{name:<10s}: {r['models']} model(s) x {r['epochs']} epoch(s) x {r['n']} images, batch {r['batch']}, "
              f"mode {r['mode']}, {opts(r)}: {r['images_per_s']:.0f} images/s, "
              f"{r['images_per_s_per_model']:.0f} per model, "
              f"peak {r['peak_mb']:.0f} MB", flush=True)


def print_projection(p: dict[str, Any], gpu_estimate: bool) -> None:
    head = "PROJECTION (ESTIMATE from measured GPU rates)" if gpu_estimate else f"PROJECTION -- {NOT_GPU}"
    print(f"\n{head}, {p['config']} at n = {p['n']}, m = {p['m']}:")
    print(f"  base job            {p['base_job_min']:9.1f} min")
    print(f"  lds_chunk job       {p['lds_chunk_job_min']:9.1f} min  x {p['lds_chunk_jobs']} jobs "
          f"({p['lds_retrain_s']:.1f} device-s per retrain)")
    if "perturbed_chunk_job_min" in p:
        print(f"  perturbed_chunk job {p['perturbed_chunk_job_min']:9.1f} min  x {p['perturbed_chunk_jobs']} jobs")
    unit = "GPU-h" if gpu_estimate else "h on this device"
    for k, v in p["device_hours"].items():
        print(f"  {k:<66s} {v:9.2f} {unit}")


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (daunce_core.utils.pick_device)")
    ap.add_argument("--config", default=str(PAPER_CONFIG), help="the config whose sizes are projected")
    ap.add_argument("--width", type=float, help="ResNet-9 channel multiplier (default 1 on a GPU, 1/8 on a CPU)")
    ap.add_argument("--models", type=int, help="retrains per chunk (default: lds.chunk_size on a GPU, 2 on a CPU)")
    ap.add_argument("--n", type=int, help="examples per retrain (default: alpha * n on a GPU, 256 on a CPU)")
    ap.add_argument("--batch", type=int, help="retrain batch (default: base.batch_size on a GPU, 64 on a CPU)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the timed retrains")
    ap.add_argument("--no-perturbed", action="store_true", help="measure only the retrains")
    ap.add_argument("--precision", choices=E.PRECISIONS, help="base.precision (default: the config's)")
    ap.add_argument("--channels-last", action="store_true", help="base.channels_last: NHWC images and conv weights")
    ap.add_argument("--compile", action="store_true", help="base.compile: torch.compile the vmapped forward")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    device = pick_device(args.device)
    exp = load_config(args.config)
    gpu = device.type == "cuda"
    width = args.width if args.width is not None else (1.0 if gpu else 0.125)
    n_full = exp.data.n_train or CIFAR_TRAIN
    n = args.n or (int(math.ceil(exp.lds.alpha * n_full)) if gpu else 256)
    batch = args.batch or (exp.base.batch_size if gpu else 64)
    models = args.models or (exp.lds.chunk_size if gpu else 2)
    recipe = dataclasses.replace(exp.base, batch_size=batch, precision=args.precision or exp.base.precision,
                                 channels_last=args.channels_last or exp.base.channels_last,
                                 compile=args.compile or exp.base.compile)
    estimate = is_gpu_estimate(device, width)
    info = device_info(device)
    print(f"{info['device']} {info['name']}, torch {info['torch']}; ResNet-9 width {width}, synthetic {SHAPE} data, "
          f"trainer {opts(speed_record(E.Speed.from_train(recipe)))}"
          + ("" if estimate else f"\n*** {NOT_GPU} ***"), flush=True)

    base = measure_retrain(device, recipe, width=width, models=1, n=n, epochs=args.epochs)
    print_rates("theta_0", base)
    lds = measure_retrain(device, recipe, width=width, models=models, n=n, epochs=args.epochs)
    print_rates("LDS chunk", lds)
    pert = None
    if not args.no_perturbed:
        d = exp.daunce if gpu else dataclasses.replace(exp.daunce, batch_size=min(exp.daunce.batch_size, 32))
        pert = measure_perturbed(device, d, width=width, models=d.chunk_size if gpu else 2,
                                 n=n_full if gpu else 256, n_eval=CIFAR_TEST if gpu else 128,
                                 speed=E.Speed.from_train(recipe))
        print_rates("perturbed", pert)
    proj = project(exp, base=base, lds=lds, perturbed=pert)
    print_projection(proj, estimate)
    out = {"gpu_estimate": estimate, "note": None if estimate else NOT_GPU, "info": info, "theta_0": base,
           "lds_chunk": lds, "perturbed": pert, "projection": proj}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
