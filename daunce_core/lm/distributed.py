"""Several processes (torchrun) for the LLM steps: FSDP2 full fine-tuning, LoRA fits split by model.

Without torchrun (``WORLD_SIZE`` unset or 1) nothing here changes what the single process does
(:func:`world` is ``(0, 1)``). Under torchrun full fine-tuning shards the model with FSDP2, each
rank takes a slice of every batch (:func:`rank_slice`), the LoRA fits are split by model and
gathered on rank 0 (:func:`gather_rows`), and a SLURM job with several GPUs re-executes itself
under torchrun (:func:`relaunch`). The LLM steps call it. Details:
docs/gpu.md#several-processes-daunce_corelmdistributedpy."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["world", "init_from_env", "rank_slice", "shard_model", "unsharded", "full_state_dict", "barrier",
           "all_sum", "gather_rows", "gpus_on_node", "torchrun_command", "relaunch"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device=None) -> torch.device | None:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU).

    Returns this rank's device (``cuda:LOCAL_RANK`` on CUDA), or ``device`` unchanged when the
    process runs alone.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def rank_slice(idx: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous slice of a global batch (``np.array_split``: the first ranks take
    one more example when the batch does not divide)."""
    return np.array_split(np.asarray(idx), world_size)[rank]


def _layer_classes(model) -> tuple[type, ...]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def shard_model(model, device, *, master_weights: bool = True) -> Any:
    """``fully_shard`` every decoder layer (the classes of the model's ``_no_split_modules``), then
    the root; bf16 compute over fp32 master weights on CUDA, plain fp32 on CPU.

    A model loaded in bf16 (``llm.dtype: bfloat16``, half the host memory per rank) is cast to
    fp32 on its device first: the sharded fp32 weights are the master copy the optimiser updates.
    ``master_weights=False`` (``llm.finetune.master_weights``) shards the loaded dtype as it is and
    computes in it.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dev = torch.device(device)
    if master_weights and any(p.dtype != torch.float32 for p in model.parameters()):
        model.to(device=dev, dtype=torch.float32)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if master_weights and dev.type == "cuda" else MixedPrecisionPolicy())
    layers = _layer_classes(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
                         "cannot shard it layer by layer")
    for m in model.modules():
        if isinstance(m, layers):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unsharded(model, load_base) -> Any:
    """After FSDP fine-tuning: on rank 0 a plain model (``load_base()``, then the gathered weights)
    for evaluation and saving; None on the other ranks. Every rank must call it."""
    sd = full_state_dict(model)
    if sd is None:
        return None
    plain = load_base()
    dtype = next(plain.parameters()).dtype
    plain.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return plain


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on CPU on rank 0 (None on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if world()[0] == 0 else None


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def all_sum(values: Sequence[float], device) -> np.ndarray:
    """Element-wise sum of ``values`` over the ranks (float64 on the way)."""
    t = torch.as_tensor(np.asarray(values, np.float64), device=device)
    if world()[1] > 1:
        dist.all_reduce(t)
    return t.cpu().numpy()


def gather_rows(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (any picklable) in rank order on rank 0, None on the other ranks."""
    rank, ws = world()
    if ws == 1:
        return [obj]
    out = [None] * ws if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# --- SLURM: one job, one torchrun -------------------------------------------------------------

def gpus_on_node(env=None) -> int:
    """GPUs SLURM gave this job on its node (``SLURM_GPUS_ON_NODE``; 0 outside SLURM)."""
    env = os.environ if env is None else env
    raw = env.get("SLURM_GPUS_ON_NODE", "").strip()
    try:
        return int(raw) if raw else 0
    except ValueError:
        raise ValueError(f"SLURM_GPUS_ON_NODE={raw!r} is not a number of GPUs") from None


def torchrun_command(script: str, env=None) -> list[str] | None:
    """``torchrun --standalone --nproc-per-node=<gpus> <script>`` when the job has several GPUs and
    is not under torchrun already; None otherwise (the script then runs as it is)."""
    env = os.environ if env is None else env
    gpus = gpus_on_node(env)
    if gpus <= 1 or "WORLD_SIZE" in env:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", script]


def relaunch(script: str | None = None) -> bool:
    """Re-execute the running script under torchrun when :func:`torchrun_command` says so; True
    when it did (the caller then returns), raising when the ranks failed.

    ``script`` defaults to ``sys.argv[0]``: for a Snakemake ``script:`` that is the temporary copy
    Snakemake runs, which carries the job's ``snakemake`` object, so every rank sees the same job.
    """
    cmd = torchrun_command(script or sys.argv[0])
    if cmd is None:
        return False
    subprocess.run(cmd, check=True)
    return True
