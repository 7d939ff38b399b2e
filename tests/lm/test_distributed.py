"""Several processes for the LLM steps (daunce_core.lm.distributed): FSDP2 full fine-tuning and LoRA
fits split by model, 2 gloo processes on CPU against the one-process run; SLURM's re-exec under
torchrun."""
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from daunce_core.fit.lm import LoraFitter
from daunce_core.lm import distributed, sequences, settings, training
from daunce_core.lm import tiny as tinylm

import helpers

torch.set_num_threads(1)

# batch 9 over 2 ranks with micro-batches of 4: 5 / 4 examples, so rank 1 runs a zero-weight
# pass to keep FSDP's collectives in step; the last batch (48 = 5 x 9 + 3) is 2 / 1.
FT = settings.FinetuneConfig(lr=3e-3, batch_size=9, micro_batch_size=4, epochs=1, max_length=32,
                             warmup_ratio=0.1, max_grad_norm=1.0)

LORA = settings.LoraFitConfig(variant="daunce", lr=1e-2, steps=3, batch_size=8, micro_batch_size=4, rank=4,
                              alpha=8, ratio=0.5, seed=3, eval_batch_size=32)
KS = [4, 0, 1, 7, 2]  # 3 models on rank 0 (4, 1, 2), 2 on rank 1 (0, 7)


def _tiny():
    return helpers.tiny_text_task(arch="llama", num_layers=2, seed=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        task, tok, model = _tiny()
        if job in ("finetune", "finetune_bf16"):
            if job == "finetune_bf16":
                model.to(torch.bfloat16)  # llm.dtype: bfloat16; FSDP trains fp32 master weights
            enc = sequences.encode_examples(tok, task["train"], max_length=32)
            log = training.finetune(model, enc, FT, pad_id=tok.pad_token_id, seed=0)
            sd = distributed.full_state_dict(model)
            if rank == 0:
                plain = tinylm.tiny_causal_lm(tok, arch="llama", hidden_size=32, num_layers=2, num_heads=2,
                                              max_position_embeddings=32, seed=1)
                plain.load_state_dict(sd)
                plain.save_pretrained(out_dir)
                torch.save(log, os.path.join(out_dir, "log.pt"))
        elif job == "lora":
            tr, qu = (sequences.encode_examples(tok, task[k], max_length=32) for k in ("train", "query"))
            sig = LoraFitter(model, tr, qu, LORA, pad_id=tok.pad_token_id).fit(KS, LORA.lr)
            if rank == 0:
                np.savez(os.path.join(out_dir, "signals.npz"), train=sig.train, query=sig.query,
                         k=sig.model_index, total=sig.trace["total"])
            else:
                assert sig is None  # the fitter contract: only rank 0 returns the signals
    finally:
        dist.destroy_process_group()


def _spawn(job: str, out_dir) -> None:
    # fork, not spawn: a `tests` package installed in site-packages would shadow this module in a
    # spawned child; the forked ranks start from this process's imports
    mp.start_processes(_worker, args=(2, _free_port(), str(out_dir), job), nprocs=2, join=True,
                       start_method="fork")


def test_two_gloo_processes_fine_tune_like_one(tmp_path):
    task, tok, model = _tiny()
    enc = sequences.encode_examples(tok, task["train"], max_length=32)
    log1 = training.finetune(model, enc, FT, pad_id=tok.pad_token_id, seed=0)
    _spawn("finetune", tmp_path)
    log2 = torch.load(tmp_path / "log.pt")
    assert log2["steps"] == log1["steps"] == 6
    np.testing.assert_allclose([log2["first_loss"], log2["final_loss"]], [log1["first_loss"], log1["final_loss"]],
                               rtol=1e-5)
    # the checkpoint rank 0 gathered loads back as a plain model equal to the one-process run
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    ref = model.state_dict()
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(back.state_dict()["model.embed_tokens.weight"],
                           _tiny()[2].state_dict()["model.embed_tokens.weight"])  # it trained


def test_a_bf16_model_trains_fp32_master_weights_with_one_process_as_with_two(tmp_path):
    """llm.dtype: bfloat16 with finetune.master_weights (the default): FSDP casts the shards to
    fp32, and the one-process run must do the same, or the result would depend on the number of
    processes (pure bf16 AdamW rounds most of its small steps away)."""
    task, tok, model = _tiny()
    model.to(torch.bfloat16)
    enc = sequences.encode_examples(tok, task["train"], max_length=32)
    log1 = training.finetune(model, enc, FT, pad_id=tok.pad_token_id, seed=0)
    assert next(model.parameters()).dtype == torch.bfloat16  # back to the loaded dtype
    _spawn("finetune_bf16", tmp_path)
    log2 = torch.load(tmp_path / "log.pt")
    np.testing.assert_allclose([log2["first_loss"], log2["final_loss"]], [log1["first_loss"], log1["final_loss"]],
                               rtol=1e-5)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path)  # fp32 gathered master weights
    ref = model.state_dict()
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v.to(torch.bfloat16), ref[k], rtol=1e-2, atol=1e-3, msg=k)
    # pure bf16 (master_weights: false) is another run: the two paths would not agree with it
    import dataclasses

    pure = _tiny()[2].to(torch.bfloat16)
    log3 = training.finetune(pure, enc, dataclasses.replace(FT, master_weights=False), pad_id=tok.pad_token_id,
                             seed=0)
    assert abs(log3["final_loss"] - log1["final_loss"]) > 1e-3


def test_rank_micro_batches_pad_the_short_rank():
    idx = np.arange(9)
    r0 = training._rank_micro_batches(idx, 4, 0, 2)
    r1 = training._rank_micro_batches(idx, 4, 1, 2)
    assert [list(m) for m in r0] == [[0, 1, 2, 3], [4]]
    assert [list(m) for m in r1[:1]] == [[5, 6, 7, 8]] and r1[1] is None
    assert np.array_equal(np.concatenate([*r0, r1[0]]), idx)  # every example once


def test_lora_fits_split_over_two_ranks_gather_the_one_process_signals(tmp_path):
    task, tok, model = _tiny()
    tr, qu = (sequences.encode_examples(tok, task[k], max_length=32) for k in ("train", "query"))
    one = LoraFitter(model, tr, qu, LORA, pad_id=tok.pad_token_id).fit(KS, LORA.lr)
    _spawn("lora", tmp_path)
    two = np.load(tmp_path / "signals.npz")
    np.testing.assert_array_equal(two["k"], KS)
    assert np.isfinite(two["train"]).all() and np.isfinite(two["query"]).all()
    # the same models, each fitted whole in one process: equal up to the threads' summation order
    np.testing.assert_allclose(two["train"], one.train, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["query"], one.query, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["total"], one.trace["total"], rtol=1e-5, atol=1e-7)


def test_a_slurm_job_with_several_gpus_reruns_its_script_under_torchrun():
    cmd = distributed.torchrun_command("job.py", {"SLURM_GPUS_ON_NODE": "8"})
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8", "job.py"]
    assert distributed.torchrun_command("job.py", {"SLURM_GPUS_ON_NODE": "1"}) is None  # one GPU: as it is
    assert distributed.torchrun_command("job.py", {}) is None  # outside SLURM
    # a rank of that torchrun does not launch another one
    assert distributed.torchrun_command("job.py", {"SLURM_GPUS_ON_NODE": "8", "WORLD_SIZE": "8"}) is None
    with pytest.raises(ValueError, match="SLURM_GPUS_ON_NODE"):
        distributed.gpus_on_node({"SLURM_GPUS_ON_NODE": "a100:2"})
    assert distributed.world() == (0, 1) and distributed.init_from_env("cpu") == "cpu"  # alone: unchanged


def test_generation_falls_back_to_hugging_face_without_vllm_or_cuda(monkeypatch):
    import importlib.util

    from daunce_core.lm import generation

    assert "vllm" not in sys.modules  # imported lazily, on the vLLM branch only
    assert generation.generation_backend("cpu") == "hf"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    assert generation.generation_backend("cpu") == "hf"  # vLLM needs CUDA
    assert generation.generation_backend("cuda") == "vllm"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert generation.generation_backend("cuda") == "hf"
