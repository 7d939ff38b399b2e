"""The experiment of Section 4.2 / Appendix C, one function per workflow step (``rules/llm.smk``).

theta_0 is a full fine-tune of ``llm.model``; DAUNCE fits K LoRA perturbed models on it
(:class:`daunce_core.fit.lm.LoraFitter`) in chunks, gathered, scored and judged by the shared
chunk machinery (:mod:`daunce_core.fit.chunks`); LoGra comes from dattri; each removal point
retrains from ``llm.model`` for every seed (:mod:`daunce_core.removal`).

The scripts under ``scripts/llm_*.py`` are thin entry points to these functions.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import removal, scoring, store
from ..baselines.logra_llm import logra_scores
from ..fit import chunks
from ..fit.lm import LoraFitter, write_trace
from ..lm import data, distributed, tiny
from ..lm.generation import evaluate_answers
from ..lm.hub import load_causal_lm, load_tokenizer, save_model
from ..lm.sequences import encode_examples, pad_id
from ..lm.settings import TASK_DATA, LLMSettings
from ..lm.training import finetune
from ..utils import pick_device

log = logging.getLogger(__name__)

__all__ = ["LLMSettings", "device", "prepare_data", "pretrain_tiny", "full_models", "daunce_chunk",
           "select_lr", "daunce_scores", "logra_scores_file", "removal_job"]


def device(config: dict[str, Any]):
    """The torch device of the workflow config's ``device`` key (``auto`` by default); under
    torchrun this rank's (``cuda:LOCAL_RANK``), after joining the process group."""
    return distributed.init_from_env(pick_device(config.get("device", "auto")))


def _fine_tuned(base: str, s: LLMSettings, dev, train: list, seed: int, desc: str):
    """(model, tokenizer) fully fine-tuned from ``base`` on ``train``; under torchrun the model is
    FSDP-sharded for training and then gathered into a plain model on rank 0 (None elsewhere)."""
    model, tok = _load(base, s, dev)
    enc = encode_examples(tok, train, max_length=s.finetune.max_length, template=s.template)
    info = finetune(model, enc, s.finetune, pad_id=pad_id(tok), seed=seed, desc=desc)
    if distributed.world()[1] > 1:
        model = distributed.unsharded(model, lambda: _load(base, s, dev)[0])
    return model, tok, info


def _load(path: str, s: LLMSettings, dev):
    return load_causal_lm(path, dtype=s.dtype, device=dev), load_tokenizer(path)


def _ids(examples: Sequence[dict]) -> np.ndarray:
    return np.array([e["id"] for e in examples])


def _write_json(path, info: dict[str, Any]) -> None:
    with store.atomic_path(path, suffix=".json.tmp") as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1))


def prepare_data(s: LLMSettings, train_out, query_out, pretrain_out=None) -> dict[str, int]:
    """Write the training and query sets (and the miniature's pre-training corpus) as jsonl."""
    if s.task == "synthetic":
        syn = s.data.synthetic
        task = data.synthetic_task(**syn.task_kwargs())
        train, query = task["train"], task["query"]
        if pretrain_out is not None:
            data.write_jsonl(pretrain_out, data.pretrain_corpus(syn.pretrain_n, max_operand=syn.max_operand,
                                                                seed=syn.seed))
    else:
        names = TASK_DATA[s.task]
        train, query = (data.load_task(spec.name or name, source=spec.source, n=spec.n, seed=spec.seed)
                        for spec, name in ((s.data.train, names[0]), (s.data.query, names[1])))
        if pretrain_out is not None:
            data.write_jsonl(pretrain_out, [])
    data.write_jsonl(train_out, train)
    data.write_jsonl(query_out, query)
    return {"n_train": len(train), "n_query": len(query)}


def pretrain_tiny(s: LLMSettings, pretrain_jsonl, texts_jsonl: Sequence, out_dir) -> dict[str, Any]:
    """The miniature's base model: a tokenizer trained on all task text, a tiny LM pre-trained."""
    t = s.tiny
    corpus = data.read_jsonl(pretrain_jsonl)
    texts = [e["prompt"] + e["response"] for p in [pretrain_jsonl, *texts_jsonl] for e in data.read_jsonl(p)]
    tok = tiny.train_tokenizer(texts, vocab_size=t.vocab_size)
    model, info = tiny.pretrain(
        tok, corpus, arch=t.arch, hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings, epochs=t.pretrain.epochs,
        batch_size=t.pretrain.batch_size, lr=t.pretrain.lr, seed=t.pretrain.seed)
    held = data.pretrain_corpus(200, seed=t.pretrain.seed + 1000)
    correct, _ = evaluate_answers(model, tok, "synthetic", held, max_new_tokens=4, batch_size=64, max_length=64)
    info["heldout_accuracy"] = float(correct.mean())
    save_model(model, tok, out_dir)
    return info


def full_models(s: LLMSettings, base: str, train_jsonl, query_jsonl, theta0_dir, eval_out, queries_out,
                dev) -> dict[str, Any]:
    """theta_0 and its seed siblings: full fine-tunes on the whole training set (Appendix C).

    Seed 0 is saved as theta_0. Each seed answers every query greedily; the queries correct in all
    seeds are kept, split into selection and test parts (the selection part judges the LoRA
    learning rate when the grid has several values), and the test part is capped at
    ``removal.queries`` by a seeded choice (Appendix C evaluates 2,000 MATH and 200 IFEval
    queries). The query targets for the losses are the reference responses or theta_0's own
    (correct) generations (``query_target``).
    """
    train, query = data.read_jsonl(train_jsonl), data.read_jsonl(query_jsonl)
    correct, logs, responses0 = [], [], None
    for seed in range(s.seeds):
        model, tok, info = _fine_tuned(base, s, dev, train, seed, f"full fine-tune seed {seed}")
        logs.append(info)
        if model is None:  # a rank > 0 of torchrun: rank 0 evaluates and writes
            continue
        c, resp = evaluate_answers(model, tok, s.task, query, **s.gen_kw())
        correct.append(c)
        log.info("full-data model, seed %d: %.3f of %d queries correct", seed, c.mean(), len(query))
        if seed == 0:
            save_model(model, tok, theta0_dir)
            responses0 = resp
        del model
    if distributed.world()[0] != 0:
        return {}
    correct = np.stack(correct)
    selected = removal.select_queries(correct)
    frac = s.select.fraction if len(s.lr_grid) > 1 else 0.0
    sel_q, solved_test = removal.split_queries(selected, frac, s.removal.seed)
    test_q = removal.cap_queries(solved_test, s.removal.queries, s.removal.seed)
    if s.removal.queries and len(solved_test) < s.removal.queries:
        log.warning("only %d solved test queries, fewer than llm.removal.queries = %d", len(solved_test),
                    s.removal.queries)
    ids = _ids(query)
    out_q = []
    for q, r in zip(query, responses0):
        q = dict(q)
        q["generated"] = r
        if s.query_target == "generated":
            q["response"] = r
        out_q.append(q)
    data.write_jsonl(queries_out, out_q)
    info = {"accuracy": correct.mean(axis=1).tolist(), "correct": correct.astype(int).tolist(),
            "selected": ids[selected].tolist(), "select_queries": ids[sel_q].tolist(),
            "test_queries": ids[test_q].tolist(), "solved_test_queries": len(solved_test),
            "fits": logs, "n_train": len(train)}
    _write_json(eval_out, info)
    return info


def daunce_chunk(s: LLMSettings, theta0_dir, train_jsonl, queries_jsonl, lr: float, chunk: int, out_h5,
                 dev) -> None:
    """LoRA perturbed fits of chunk ``chunk`` at ``lr`` (Algorithm 1); a losses file (or a diverged marker)
    with the fits' per-step objective terms in its ``trace`` group (:func:`daunce_core.fit.lm.read_trace`)."""
    train, query = data.read_jsonl(train_jsonl), data.read_jsonl(queries_jsonl)
    model, tok = _load(str(theta0_dir), s, dev)
    cfg = s.daunce.fit_config(lr, s.finetune.max_length)
    fitter = LoraFitter(model, encode_examples(tok, train, max_length=cfg.max_length, template=s.template),
                        encode_examples(tok, query, max_length=cfg.max_length, template=s.template), cfg,
                        pad_id=pad_id(tok), device=dev, train_ids=_ids(train), query_ids=_ids(query))
    sig = fitter.fit(chunks.chunk_models(s.K, s.chunk_size, chunk), lr)
    if sig is None:  # a rank > 0 of torchrun: its fits went to rank 0
        return
    if chunks.write_signals(out_h5, sig):
        write_trace(out_h5, sig)


def _retrainer(s: LLMSettings, base: str, train: list, queries: list, dev):
    """``retrain(keep, seed) -> correct`` for the removal harness: full fine-tune from ``base``."""
    def retrain(keep: np.ndarray, seed: int) -> np.ndarray:
        model, tok, _ = _fine_tuned(base, s, dev, [train[i] for i in keep], seed, f"retrain seed {seed}")
        if model is None:  # a rank > 0 of torchrun: placeholders, rank 0 alone writes the result
            return np.zeros(len(queries), bool)
        correct, _ = evaluate_answers(model, tok, s.task, queries, **s.gen_kw())
        return correct

    return retrain


def _json(path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def select_lr(s: LLMSettings, losses_paths: Sequence, lrs: Sequence[str], eval_json, base: str, train_jsonl,
              queries_jsonl, out_losses, out_json, dev) -> float:
    """Pick the LoRA learning rate whose scores remove the most *selection* queries' answers.

    For every lr of the grid: rank by summed scores over the selection queries (disjoint from the
    reported test queries), remove the top ``select.N``, retrain with seed 0, count the selection
    queries now wrong (the judge of :func:`daunce_core.fit.chunks.select_lr`). Diverged fits are
    skipped. With one usable lr, or no selection queries, nothing is retrained and the first
    usable lr of the grid is kept.
    """
    paths = {float(lr): p for lr, p in zip(lrs, losses_paths)}
    usable = [lr for lr in paths if not store.is_diverged(paths[lr])]
    ev = _json(eval_json)
    judged = len(usable) > 1 and bool(ev["select_queries"])
    if judged:
        train, queries = data.read_jsonl(train_jsonl), data.read_jsonl(queries_jsonl)
        pos = {q["id"]: j for j, q in enumerate(queries)}
        sel_cols = [pos[i] for i in ev["select_queries"]]
        retrain = _retrainer(s, base, train, [queries[j] for j in sel_cols], dev)
        N = min(s.select.N, len(train) - 1)

        def judge(L: store.Losses) -> float:
            L, _ = store.align_losses(L, {"train_ids": _ids(train), "query_ids": _ids(queries)},
                                      f"{train_jsonl} / {queries_jsonl}", notify=log.warning)  # join on ids
            rank = removal.ranking_from_scores(scoring.pairwise_scores(L.train, L.query, s.measure), sel_cols)
            wrong = removal.removal_effect(rank, N, [0], retrain)["mean"]
            log.info("lr %g: %.3f of the selection queries wrong after removing %d", L.attrs["config"]["lr"],
                     wrong, N)
            return wrong
    else:
        def judge(L: store.Losses) -> float:  # nothing to judge on: prefer the grid's order
            return -usable.index(float(L.attrs["config"]["lr"]))
    meta = {"variant": s.daunce.variant,
            "criterion": ("share of selection queries wrong after removing select.N (seed 0)" if judged else
                          "none to judge on (one usable lr or no selection queries): minus the lr's position "
                          "among the usable lrs of the grid"),
            "select_N": s.select.N, "measure": s.measure}
    if distributed.world()[0] != 0:  # a rank > 0 of torchrun retrains with rank 0; rank 0 alone writes
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return chunks.select_lr(paths, judge, Path(tmp) / "losses.h5", Path(tmp) / "lr.json", meta,
                                    key="wrong_select", grid_option="llm.daunce.lr_grid")
    return chunks.select_lr(paths, judge, out_losses, out_json, meta, key="wrong_select",
                            grid_option="llm.daunce.lr_grid")


def daunce_scores(s: LLMSettings, losses_path, out) -> None:
    """DAUNCE scores (equation 6): correlation or covariance across the K LoRA models' losses."""
    chunks.score(losses_path, out, s.measure, method="daunce")


def logra_scores_file(s: LLMSettings, theta0_dir, train_jsonl, queries_jsonl, out, dev) -> None:
    """LoGra (dattri) scores of theta_0 in the common scores layout."""
    train, query = data.read_jsonl(train_jsonl), data.read_jsonl(queries_jsonl)
    model, tok = _load(str(theta0_dir), s, dev)
    tr = encode_examples(tok, train, max_length=s.finetune.max_length, template=s.template)
    qu = encode_examples(tok, query, max_length=s.finetune.max_length, template=s.template)
    cfg = s.logra
    S = logra_scores(model, tr, qu, pad_id=pad_id(tok), proj_dim=cfg.proj_dim, damping=cfg.damping,
                     hessian=cfg.hessian, batch_size=cfg.batch_size, device=dev)
    store.write_scores(out, train_ids=_ids(train), query_ids=_ids(query), scores=S,
                       attrs={"method": "logra", "measure": "influence", "threshold": "none",
                              "lambda": 0.0, "proj_dim": cfg.proj_dim})


def removal_job(s: LLMSettings, method: str, N: int, scores_path, base: str, train_jsonl, queries_jsonl,
                eval_json, out, dev) -> dict[str, Any]:
    """One point of Figure 2: remove method's top N, retrain for every removal seed, share of test
    queries wrong.

    The seeds are :meth:`LLMSettings.removal_seeds`, the same for every method and N (paired).
    ``random`` draws a fresh ranking per seed; :data:`removal.NOISE_METHOD` with N = 0 retrains on
    the full data (the retraining noise).
    """
    ev = _json(eval_json)
    train, queries = data.read_jsonl(train_jsonl), data.read_jsonl(queries_jsonl)
    test_ids = ev["test_queries"]
    if method == removal.NOISE_METHOD:
        if int(N) != 0:
            raise ValueError(f"removal method {removal.NOISE_METHOD!r} is the full-data retrain: N must be 0")
        ranking = np.arange(len(train))
    elif method == "random":
        def ranking(seed: int) -> np.ndarray:
            return removal.random_ranking(len(train), (s.removal.seed, seed))
    else:
        ranking = removal.ranking_from_file(scores_path, test_ids, _ids(train), train_jsonl)
    pos = {q["id"]: j for j, q in enumerate(queries)}
    retrain = _retrainer(s, base, train, [queries[pos[i]] for i in test_ids], dev)
    res = removal.removal_effect(ranking, int(N), s.removal_seeds(), retrain)
    if distributed.world()[0] != 0:  # a rank > 0 of torchrun: rank 0 holds the answers and writes
        return res
    removal.write_result(out, res, method=method, queries=len(test_ids), n_train=len(train))
    return res
