"""The steps of the black-box backdoor study (Section 5, Appendix D) as functions.

Each function is one workflow rule's science (``make_data``, ``make_local_base``,
``write_estimate``, ``fit_theta0``, ``api_losses``, ``strict_losses``, ``score``, ``fig4``); the
Snakemake scripts only unpack paths. The same functions run against the local server and against
any OpenAI-compatible endpoint; every step that can cost money first calls
:func:`daunce_core.blackbox.cost.check_spend`, and every paid result is recorded as soon as it
exists. What each step writes: docs/design.md#daunce_corestepsblackboxpy-the-black-box-studys-steps."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import store
from ..blackbox import backdoor as B
from ..blackbox.bdpl import candidate_ngrams
from ..blackbox.client import APIClient, Credentials, credentials_from_env
from ..blackbox.config import BlackboxConfig
from ..blackbox.cost import (
    CostItem,
    SpendMeter,
    TokenEstimator,
    check_spend,
    format_estimate,
    ledger_items,
    priced,
    total_usd,
)
from ..blackbox.finetune import AUTO_EPOCHS, FinetuneSpec, run_finetunes
from ..blackbox.logprobs import budget_for
from ..blackbox.manifest import Manifest
from ..fit import chunks
from ..fit.bdpl import BDPLFitter
from ..fit.endpoint import APIFitter, configured_lr
from ..perturb import subset_and_xi

log = logging.getLogger(__name__)

ACCESS_LABEL = {"api": "API-based access (fine-tuning API)", "strict": "strict access (BDPL prompts)"}


def estimated_epochs(hyperparameters: dict) -> int:
    """The epochs the estimate charges for a job with ``hyperparameters``: a missing ``n_epochs``
    is not sent, so the endpoint applies its default, ``"auto"`` (as config.validate reads it)."""
    ep = hyperparameters.get("n_epochs", "auto")
    return AUTO_EPOCHS if ep == "auto" else int(ep)  # AUTO_EPOCHS: .finetune's, so both agree


def load_config(config: dict) -> BlackboxConfig:
    """The ``blackbox`` section of a (Snakemake) config as typed settings."""
    return BlackboxConfig.from_dict(config.get("blackbox", {}))


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _user(row: dict) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def endpoint_id(cfg: BlackboxConfig) -> str:
    return "local" if cfg.backend == "local" else (cfg.api.base_url or f"env:{cfg.api.base_url_env}|openai")


# --- data ----------------------------------------------------------------------------------------

def make_data(cfg: BlackboxConfig, out_train: str | Path, out_query: str | Path) -> None:
    train, query = B.make_study_data(cfg.data)
    B.write_jsonl(out_train, train)
    B.write_jsonl(out_query, query)
    log.info("data: %d training examples (%d backdoored), %d queries (%d triggered)", len(train),
             sum(r["backdoor"] for r in train), len(query), sum(r["triggered"] for r in query))


def make_local_base(cfg: BlackboxConfig, train_path: str | Path, out_dir: str | Path) -> None:
    """The local server's "pretrained" model: a tokenizer trained on the prompts and a tiny LM."""
    from ..lm.tiny import tiny_causal_lm, train_tokenizer
    from ..localapi.model import render_chat

    train = B.read_jsonl(train_path)
    texts = ["".join(t for t, _ in render_chat(B.chat_example(r)["messages"])) for r in train]
    m = cfg.local.model
    tok = train_tokenizer(texts, m.vocab_size)
    model = tiny_causal_lm(tok, arch=m.arch, hidden_size=m.hidden_size, num_layers=m.num_layers, seed=m.seed,
                           max_position_embeddings=max(256, cfg.local.train.max_len))
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("local base model: %d parameters, vocabulary %d, saved to %s",
             sum(p.numel() for p in model.parameters()), len(tok), out)


# --- the endpoint --------------------------------------------------------------------------------

@contextlib.contextmanager
def endpoint(cfg: BlackboxConfig, *, models: dict[str, str] | None = None, state_dir: str | Path,
             log_path: str | Path | None = None) -> Iterator[APIClient]:
    """An :class:`APIClient` for the configured endpoint; for ``backend: local`` a server is started
    (serving ``models``: name -> folder) on a free loopback port and stopped on exit."""
    a = cfg.api
    retry = a.retry
    if cfg.backend == "local":
        from ..localapi import LocalServer, ServerConfig

        scfg = ServerConfig(state_dir=str(state_dir), models=dict(models or {}), train=cfg.local.train,
                            threads=cfg.local.threads, device=cfg.local.device, faults=cfg.local.faults)
        with LocalServer(scfg, log_path=log_path) as srv:
            yield _metered(APIClient(Credentials(srv.base_url, srv.api_key, "local server"), retry=retry,
                                     timeout=a.timeout_s), cfg)
    else:
        creds = credentials_from_env(a.api_key_env, a.base_url_env, a.base_url)
        log.info("endpoint %s (key from %s)", creds.base_url or "https://api.openai.com/v1", creds.source)
        yield _metered(APIClient(creds, retry=retry, timeout=a.timeout_s), cfg)


def _metered(client: APIClient, cfg: BlackboxConfig) -> APIClient:
    """``client`` with a :class:`.cost.SpendMeter` when any price is set: every paid call is then
    checked against ``max_spend_usd`` before it is sent (the spend of this step)."""
    if cfg.prices:
        client.meter = SpendMeter(cfg.prices, cfg.max_spend_usd,
                                  TokenEstimator(cfg.cost.chars_per_token, cfg.cost.safety_factor,
                                                 cfg.cost.message_overhead))
    return client


def subsets(cfg: BlackboxConfig, n: int) -> list[np.ndarray]:
    """``D^k`` of every perturbed model: ``subset_and_xi(seed, k, n, r)`` with ``r = |D^k| / n``."""
    return [subset_and_xi(cfg.seed, k, n, cfg.subset_size / n)[0] for k in range(cfg.K)]


# --- cost -----------------------------------------------------------------------------------------

def estimate(cfg: BlackboxConfig, model: str, train: Sequence[dict], query: Sequence[dict]) -> list[CostItem]:
    """Tokens and USD of the whole study for one base model (theta_0, then each access setting)."""
    te = TokenEstimator(cfg.cost.chars_per_token, cfg.cost.safety_factor, cfg.cost.message_overhead)
    extra = cfg.logprobs.extra_tokens
    tok_ex = np.array([te.messages(B.chat_example(r)["messages"]) for r in train])
    rows = list(train) + list(query)
    tok_in = np.array([te.messages(r["messages"]) for r in rows])
    tok_out = np.array([int(np.ceil(budget_for(r["target"], extra) * 1.0)) for r in rows])
    ft = f"ft:{model}:estimate"
    ep0 = estimated_epochs(cfg.theta0.hyperparameters)
    m = len(query)
    items = [CostItem("theta0 fine-tune", model, 1, int(tok_ex.sum() * ep0)),
             CostItem("theta0 replies to queries", ft, m, 0, int(tok_in[len(train):].sum()),
                      int(tok_out[len(train):].sum()))]
    subs = subsets(cfg, len(train))
    n_all = len(rows)
    if "api" in cfg.access:
        ep = estimated_epochs(cfg.finetune.hyperparameters)
        items.append(CostItem(f"api: {cfg.K} fine-tunes", model, cfg.K,
                              int(sum(tok_ex[s].sum() for s in subs) * ep)))
        items.append(CostItem(f"api: losses ({cfg.K} x {n_all})", ft, cfg.K * n_all, 0,
                              int(tok_in.sum() * cfg.K), int(tok_out.sum() * cfg.K)))
    if "strict" in cfg.access:
        b = cfg.bdpl
        try:
            cands = candidate_ngrams([_user(r) for r in train], b.search_space, exclude=b.exclude)
            cand_chars = float(np.mean([len(c) for c in cands]))
        except ValueError:  # nominal rows: assume one-to-two-word n-grams
            cand_chars = 8.0
        prompt_tok = b.prompt_length * (cand_chars + 1) / te.cpt * te.safety
        calls = sum(len(s) for s in subs) * b.epochs * b.sample_size
        tin = sum(float(tok_in[s].sum()) for s in subs) * b.epochs * b.sample_size + calls * prompt_tok
        tout = sum(float(tok_out[s].sum()) for s in subs) * b.epochs * b.sample_size
        items.append(CostItem(f"strict: BDPL ({cfg.K} prompts)", ft, int(calls), 0, int(tin), int(tout)))
        items.append(CostItem(f"strict: losses ({cfg.K} x {n_all})", ft, cfg.K * n_all, 0,
                              int((tok_in.sum() + n_all * prompt_tok) * cfg.K), int(tok_out.sum() * cfg.K)))
    return [priced(i, cfg.prices) for i in items]


def write_estimate(cfg: BlackboxConfig, model: str, train_path, query_path, out_json) -> list[CostItem]:
    train, query = B.read_jsonl(train_path), B.read_jsonl(query_path)
    items = estimate(cfg, model, train, query)
    table = format_estimate(items)
    tot, grand = total_usd(items), total_usd(estimate_all(cfg, train, query))
    allowed = "free" if grand == 0 else (
        "ALLOWED" if cfg.spend and grand is not None and grand <= cfg.max_spend_usd else
        f"NOT allowed: all models together ${grand if grand is not None else float('nan'):,.2f}, "
        f"blackbox.spend={cfg.spend}, max_spend_usd={cfg.max_spend_usd}")
    log.info("cost estimate for %s (%s):\n%s", model, allowed, table)
    print(f"daunce black-box cost estimate for {model}: {allowed}\n{table}", flush=True)
    with store.atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps({"model": model, "total_usd": tot, "all_models_usd": grand, "spend": cfg.spend,
                                   "max_spend_usd": cfg.max_spend_usd, "items": [i.as_dict() for i in items],
                                   "table": table}, indent=1))
    return items


def estimate_all(cfg: BlackboxConfig, train, query) -> list[CostItem]:
    """The estimate of the whole configuration: every base model's study."""
    return [i for m in cfg.models for i in estimate(cfg, m, train, query)]


def guard(cfg: BlackboxConfig, model: str, train, query, what: str) -> float:
    """Refuse to go on unless the whole configuration's estimate (all models) may be spent."""
    return check_spend(estimate_all(cfg, train, query), spend=cfg.spend, max_spend_usd=cfg.max_spend_usd,
                       what=what)


def _record_spend(man: Manifest, cfg: BlackboxConfig) -> None:
    """Price the manifest's spend ledger (each finished job once) and record it beside the ledger."""
    items = ledger_items(man.ledger(), cfg.prices)
    usd = total_usd(items)
    man.set_spend({"usd": usd, "items": [i.as_dict() for i in items]})
    log.info("fine-tuning spend recorded in %s: %d billed job(s), %s", man.path, sum(i.requests for i in items),
             "unknown USD (no price)" if usd is None else f"${usd:,.2f}")


# --- theta_0 --------------------------------------------------------------------------------------

def fit_theta0(cfg: BlackboxConfig, model: str, train_path, query_path, out_json, *, work_dir,
               base_dir=None, server_log=None) -> dict:
    """theta_0 = the base model fine-tuned on the whole poisoned training set; its query replies."""
    train, query = B.read_jsonl(train_path), B.read_jsonl(query_path)
    usd = guard(cfg, model, train, query, f"theta_0 of {model}")
    work = Path(work_dir)
    man = Manifest(work / "manifest.json", {"endpoint": endpoint_id(cfg), "base_model": model,
                                            "hyperparameters": cfg.theta0.hyperparameters,
                                            "data": _sha(train_path), "seed": cfg.seed})
    spec = FinetuneSpec("theta0", model, [B.chat_example(r) for r in train], dict(cfg.theta0.hyperparameters),
                        seed=cfg.seed)
    models = {model: str(base_dir)} if base_dir else {}
    with endpoint(cfg, models=models, state_dir=work / "server", log_path=server_log) as client:
        theta0 = run_finetunes(client, man, [spec], cfg.finetune)["theta0"]
        replies = _greedy_replies(client, theta0, query, cfg)
        man.set_usage("theta0", client.usage.as_dict())
    _record_spend(man, cfg)
    local_path = None
    if cfg.backend == "local":
        from ..localapi import registered_model_path

        local_path = registered_model_path(work / "server", theta0)
    trig = [r["triggered"] for r in query]
    refused = [B.is_refusal(rep, B.refusal_texts(cfg.data)) for rep in replies]
    correct = [rep.strip() == r["target"] for rep, r in zip(replies, query)]
    metrics = {
        "backdoor_success": float(np.mean([f for f, t in zip(refused, trig) if t])) if any(trig) else None,
        "clean_accuracy": float(np.mean([c for c, t in zip(correct, trig) if not t])) if not all(trig) else None,
        "clean_false_refusal": float(np.mean([f for f, t in zip(refused, trig) if not t])) if not all(trig) else None,
    }
    out = {"model": theta0, "base_model": model, "local_path": local_path, "metrics": metrics,
           "replies": replies, "estimated_usd": usd, "manifest": str(man.path)}
    with store.atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    log.info("theta_0 %s: %s", theta0, metrics)
    return out


def _greedy_replies(client: APIClient, model: str, rows: Sequence[dict], cfg: BlackboxConfig) -> list[str]:
    budget = max(budget_for(r["target"], cfg.logprobs.extra_tokens) for r in rows) + 4
    out = []
    for r in rows:
        kw: dict[str, Any] = dict(model=model, messages=r["messages"], temperature=0, max_completion_tokens=budget)
        if cfg.logprobs.seed is not None:
            kw["seed"] = cfg.logprobs.seed
        out.append(client.chat(**kw).choices[0].message.content or "")
    return out


def _theta0_models(cfg: BlackboxConfig, theta0: dict) -> dict[str, str]:
    return {theta0["model"]: theta0["local_path"]} if cfg.backend == "local" else {}


# --- losses of K perturbed models -----------------------------------------------------------------

def _loss_attrs(cfg: BlackboxConfig, access: str, extra: dict) -> dict:
    return {"variant": cfg.variant, "signal": "loss" if cfg.variant != "daunce_t_bb" else "margin",
            "seed": cfg.seed, "config": cfg.to_dict(), "access": access, **extra}


def _perturbation_inputs(cfg: BlackboxConfig, model: str, train_path, query_path, theta0_json,
                         what: str) -> tuple[list[dict], list[dict], dict]:
    """What both access settings start from: the training and query rows and theta_0's record,
    once the spend guard has let ``what`` (the priced work, named in its refusal) go ahead."""
    train, query = B.read_jsonl(train_path), B.read_jsonl(query_path)
    theta0 = json.loads(Path(theta0_json).read_text())
    guard(cfg, model, train, query, what)
    return train, query, theta0


def api_losses(cfg: BlackboxConfig, model: str, train_path, query_path, theta0_json, out_h5, *, work_dir,
               server_log=None) -> None:
    """API-based access: K fine-tunes of theta_0 on D^k, then every example's NLL under each."""
    train, query, theta0 = _perturbation_inputs(cfg, model, train_path, query_path, theta0_json,
                                                f"API-based perturbed fine-tunes of {model}")
    work = Path(work_dir)
    hp = dict(cfg.finetune.hyperparameters)
    man = Manifest(work / "manifest.json", {"endpoint": endpoint_id(cfg), "theta0": theta0["model"],
                                            "hyperparameters": hp, "subset_size": cfg.subset_size,
                                            "seed": cfg.seed, "data": _sha(train_path)})
    with endpoint(cfg, models=_theta0_models(cfg, theta0), state_dir=work / "server", log_path=server_log) as client:
        fitter = APIFitter(client, man, theta0=theta0["model"], train=train, query=query,
                           training_examples=[B.chat_example(r) for r in train], subsets=subsets(cfg, len(train)),
                           hyperparameters=hp, finetune=cfg.finetune, logprobs=cfg.logprobs, variant=cfg.variant,
                           seed=cfg.seed, work_dir=work)
        signals = fitter.fit(range(cfg.K), lr=configured_lr(hp))
        man.set_usage("api", client.usage.as_dict())
    _record_spend(man, cfg)
    chunks.write_signals(out_h5, signals, _loss_attrs(cfg, "api", {"model": model, "theta0": theta0["model"]}))


def strict_losses(cfg: BlackboxConfig, model: str, train_path, query_path, theta0_json, out_h5, *, work_dir,
                  server_log=None) -> None:
    """Strict access: K BDPL prompts learned on D^k against theta_0; every example's NLL under each."""
    train, query, theta0 = _perturbation_inputs(cfg, model, train_path, query_path, theta0_json,
                                                f"strict (BDPL) perturbations of {model}")
    work = Path(work_dir)
    b = cfg.bdpl
    cands = candidate_ngrams([_user(r) for r in train], b.search_space, exclude=b.exclude)
    # the fingerprint of manifests written before the settings layer: the learner's settings,
    # without ``exclude`` (its effect is in ``candidates``)
    learner = {k: v for k, v in dataclasses.asdict(b).items() if k != "exclude"}
    man = Manifest(work / "manifest.json", {"endpoint": endpoint_id(cfg), "theta0": theta0["model"],
                                            "bdpl": learner, "candidates": cands, "variant": cfg.variant,
                                            "subset_size": cfg.subset_size, "seed": cfg.seed,
                                            "data": _sha(train_path)})
    with endpoint(cfg, models=_theta0_models(cfg, theta0), state_dir=work / "server", log_path=server_log) as client:
        fitter = BDPLFitter(client, man, theta0=theta0["model"], candidates=cands, train=train, query=query,
                            subsets=subsets(cfg, len(train)), bdpl=b, logprobs=cfg.logprobs, variant=cfg.variant,
                            seed=cfg.seed, work_dir=work)
        signals = fitter.fit(range(cfg.K), lr=b.lr)
        man.set_usage("strict", client.usage.as_dict())
    chunks.write_signals(out_h5, signals, _loss_attrs(cfg, "strict", {"model": model, "theta0": theta0["model"]}))


# --- scores and Figure 4 ----------------------------------------------------------------------------

def score(losses_h5, out_h5, measure: str) -> None:
    """DAUNCE scores of one access setting's losses (method ``<variant>_<access>``)."""
    attrs = store.read_losses(losses_h5).attrs
    chunks.score(losses_h5, out_h5, measure, method=f"{attrs.get('variant')}_{attrs.get('access')}")


def fig4(cfg: BlackboxConfig, *, train_path, query_path, theta0_jsons: dict[str, str],
         scores: dict[tuple[str, str], str], out_md, out_csv) -> list[dict]:
    """precision@k of backdoored examples for triggered queries, and the Figure 4 table.

    ``out_csv`` and ``out_md`` hold a row per (model, access) for DAUNCE and, per model, one for the
    response-matching baseline (method ``response_match``); the DAUNCE rows are returned."""
    train, query = B.read_jsonl(train_path), B.read_jsonl(query_path)
    is_bd = np.array([r["backdoor"] for r in train])
    trig = [j for j, r in enumerate(query) if r["triggered"]]
    clean = [j for j, r in enumerate(query) if not r["triggered"]]
    k = cfg.figure.k
    rng = np.random.default_rng([cfg.figure.seed, 5])
    def pick(pool: list[int], n: int) -> list[int]:
        return sorted(rng.choice(pool, size=min(n, len(pool)), replace=False).tolist()) if pool else []

    show_t, show_c = pick(trig, cfg.figure.n_show_triggered), pick(clean, cfg.figure.n_show_clean)
    refusals = B.refusal_texts(cfg.data)
    summary, samples = [], {}
    ids = {"train_ids": [r["id"] for r in train], "query_ids": [r["id"] for r in query]}

    def precision_row(method: str, model: str, access: str, K: Any, S: np.ndarray, fired: list[int]) -> dict:
        p_all = B.precision_at_k(S, is_bd, trig, k)
        p_fired = B.precision_at_k(S, is_bd, fired, k) if fired else np.array([])
        return {"method": method, "model": model, "access": access, "K": K, "triggered queries": len(trig),
                "backdoor fired (theta_0)": len(fired),
                f"precision@{k} (fired)": float(p_fired.mean()) if fired else float("nan"),
                f"precision@{k} (all triggered)": float(p_all.mean()) if trig else float("nan"),
                "random": float(is_bd.mean())}

    baselines = {}
    for (model, access), path in scores.items():
        S, meta = store.dense_scores(path)
        S, _ = store.align_scores(S, meta, ids, path, f"{train_path} / {query_path}", notify=log.warning)  # on ids
        t0 = json.loads(Path(theta0_jsons[model]).read_text())
        replies = t0["replies"]
        fired = [j for j in trig if B.is_refusal(replies[j], refusals)]
        summary.append(precision_row(cfg.variant, model, access, cfg.K, S, fired))
        if model not in baselines:  # needs theta_0's replies only: one row per model, no access setting
            S_text = B.response_match_scores([r["target"] for r in train], replies)
            baselines[model] = precision_row("response_match", model, "none", "", S_text, fired)
        items = [{"query": query[j], "reply": replies[j], "top": B.top_retrieved(S, j, cfg.figure.top)}
                 for j in show_t + show_c]
        samples[f"{model} — {ACCESS_LABEL[access]}"] = items
    daunce_rows = list(summary)
    summary += baselines.values()
    t0metrics = {m: json.loads(Path(p).read_text())["metrics"] for m, p in theta0_jsons.items()}
    notes = [
        f"Training set: {len(train)} multiple-choice examples ({cfg.data.source}), {int(is_bd.sum())} backdoored "
        f"(trigger '{cfg.data.trigger}' at a random position, answer replaced by "
        + (f"'{refusals[0]}'" if len(refusals) == 1 else
           f"one of {len(refusals)} paraphrased refusals, drawn per example") + "); "
        f"{len(trig)} triggered and {len(clean)} clean held-out queries.",
        f"Scores: {cfg.variant} ({cfg.measure} of per-example NLL across K = {cfg.K} perturbed models, "
        f"|D^k| = {cfg.subset_size}). precision@{k}: share of backdoored examples among a triggered query's "
        f"top {k} (random retrieval: {is_bd.mean():.2f}); 'fired' = queries whose theta_0 reply is a refusal.",
        "response_match: the baseline that reads no loss, only theta_0's reply: training examples ranked "
        "by their response's match to it (exact match first, then TF-IDF word cosine). With a single "
        "refusal text every backdoored example matches a fired reply exactly; blackbox.data.refusals "
        "varies the responses, to test whether text matching still suffices.",
        "theta_0 (greedy replies to the queries): " + "; ".join(
            f"{m}: backdoor success {_fmt(v['backdoor_success'])}, clean accuracy {_fmt(v['clean_accuracy'])}, "
            f"false refusals {_fmt(v['clean_false_refusal'])}" for m, v in t0metrics.items()),
        "Endpoint: " + ("local OpenAI-compatible server (loopback) with a tiny transformers model"
                        if cfg.backend == "local" else "OpenAI-compatible API") + "; "
        "losses read from chat-completion logprobs (see daunce_core/blackbox/logprobs.py).",
    ]
    md = B.fig4_markdown(title="Figure 4 — backdoor attribution with black-box access", summary_rows=summary,
                         samples=samples, train=train, trigger=cfg.data.trigger, refusals=refusals,
                         notes=notes)
    with store.atomic_path(out_md, suffix=".md.tmp") as tmp:
        tmp.write_text(md)
    import csv

    with store.atomic_path(out_csv, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary)
    return daunce_rows

