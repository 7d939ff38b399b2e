"""The API path under faults: the local server's fault mode, and the API study
run through it -- same losses as without faults, no fine-tuning job created twice, each job
counted once in the spend ledger."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import openai
import pytest

from daunce_core import store
from daunce_core.blackbox.client import APIClient, Credentials
from daunce_core.blackbox.config import BlackboxConfig, ConfigError
from daunce_core.localapi import FaultSettings, ServerConfig, TrainSettings, serve_in_thread
from daunce_core.localapi.faults import FaultInjector
from daunce_core.steps import blackbox as study

KEY = "sk-faults-test-abcdef0123456789"
K = 3

# A busy endpoint: one request in four goes wrong, some replies are slow, the first job fails,
# and the response to the first job creation is lost after the job was made.
FAULTS = {"seed": 3, "rate_limit": 0.08, "retry_after_s": 0.05, "server_error": 0.08, "drop": 0.1,
          "slow": 0.1, "slow_s": 0.05, "fail_jobs": 1,
          "scripted": [{"method": "POST", "path": "/v1/fine_tuning/jobs", "drop": True, "after": True}]}


def api_study(faults: dict | None = None) -> BlackboxConfig:
    """The miniature API study, reduced: K=3 fine-tunes of 12 examples, 30 + 6 examples scored."""
    return BlackboxConfig.from_dict({
        "models": ["tiny-x"], "backend": "local", "access": ["api"], "K": K, "subset_size": 12,
        "prices": {"tiny-x": {"training": 2.0, "input": 0, "output": 0}},  # priced, so the ledger has USD
        "spend": True, "max_spend_usd": 100,
        "api": {"retry": {"initial_delay": 0.02, "max_delay": 0.2, "jitter": 0}},
        "data": {"source": "synthetic", "n_train": 30, "n_query_triggered": 3, "n_query_clean": 3},
        "theta0": {"hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 3}},
        "finetune": {"hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1},
                     "poll_interval_s": 0.05, "max_attempts": 2},
        "logprobs": {"top_logprobs": 5},
        "local": {"model": {"hidden_size": 32, "num_layers": 1, "vocab_size": 300}, "train": {"max_len": 384},
                  "faults": faults or {}},
    })


def run_api_study(W: Path, cfg: BlackboxConfig, label: str) -> dict:
    """theta_0 and the K perturbed fine-tunes with their losses, in ``W/label``."""
    D = W / label
    t0 = study.fit_theta0(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", D / "theta0.json",
                          work_dir=D / "theta0", base_dir=W / "base")
    study.api_losses(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", D / "theta0.json", D / "api.h5",
                     work_dir=D / "api")
    out = {"theta0": t0, "losses": store.read_losses(D / "api.h5")}
    for step in ("theta0", "api"):
        out[step + "_manifest"] = json.loads((D / step / "manifest.json").read_text())
        out[step + "_registry"] = json.loads((D / step / "server" / "registry.json").read_text())
        out[step + "_stats"] = json.loads((D / step / "server" / "stats.json").read_text())
    return out


def check_jobs(man: dict, reg: dict, entries: list[str]) -> tuple[int, int]:
    """One job per (entry, attempt) on the endpoint, one succeeded job and one model per entry, and a
    ledger that bills exactly those jobs; returns (failed jobs, billed training tokens)."""
    jobs = [j for j in reg["jobs"].values() if (j.get("metadata") or {}).get("daunce_run") == man["run_id"]]
    keys = Counter((j["metadata"]["daunce_entry"], j["metadata"]["daunce_attempt"]) for j in jobs)
    assert max(keys.values()) == 1, f"a fine-tuning job was created twice: {keys}"
    ok = {j["id"]: j for j in jobs if j["status"] == "succeeded"}
    assert sorted(j["metadata"]["daunce_entry"] for j in ok.values()) == entries  # one model per entry
    assert all(j["status"] in ("succeeded", "failed") for j in jobs)
    assert sorted(man["entries"]) == entries
    for e in man["entries"].values():
        assert e["job"]["id"] in ok and e["model"] == ok[e["job"]["id"]]["fine_tuned_model"]
    failed = [j for j in jobs if j["status"] == "failed"]
    # the ledger: every finished job once, by id; the succeeded ones billed with their tokens
    ledger = man["ledger"]
    assert sorted(ledger) == sorted(j["id"] for j in jobs)
    billed = {jid: row for jid, row in ledger.items() if row["billed"]}
    assert sorted(billed) == sorted(ok)
    assert all(row["trained_tokens"] == ok[jid]["trained_tokens"] > 0 for jid, row in billed.items())
    assert all(row["trained_tokens"] == 0 for jid, row in ledger.items() if not row["billed"])
    tokens = sum(row["trained_tokens"] for row in billed.values())
    spend = man["spend"]
    assert spend["items"][0]["requests"] == len(entries) and spend["items"][0]["training_tokens"] == tokens
    assert spend["usd"] == pytest.approx(tokens * 2.0 / 1e6)
    # no training file uploaded twice either
    names = Counter(f["filename"] for f in reg["files"].values() if man["run_id"] in f["filename"])
    assert sorted(names.values()) == [1] * len(entries)
    return len(failed), tokens


@pytest.mark.slow
def test_api_study_under_faults_matches_the_run_without(tmp_path):
    import torch

    torch.set_num_threads(1)
    W = tmp_path
    clean_cfg = api_study()
    study.make_data(clean_cfg, W / "train.jsonl", W / "query.jsonl")
    study.make_local_base(clean_cfg, W / "train.jsonl", W / "base")
    clean = run_api_study(W, clean_cfg, "clean")
    faulty = run_api_study(W, api_study(FAULTS), "faulty")

    # 1. it completes with the same losses (and the same theta_0) as the run without faults
    assert faulty["theta0"]["replies"] == clean["theta0"]["replies"]
    assert faulty["losses"].train.shape == (K, 30) and faulty["losses"].query.shape == (K, 6)
    assert np.array_equal(faulty["losses"].train, clean["losses"].train)
    assert np.array_equal(faulty["losses"].query, clean["losses"].query)

    # the faults did happen: every kind, on both steps' servers together
    seen = Counter()
    for step in ("theta0", "api"):
        assert not any(k.startswith("fault") for k in clean[step + "_stats"])
        seen.update({k: v for k, v in faulty[step + "_stats"].items() if k.startswith("fault")})
    for kind in ("fault 429", "fault 500", "fault drop", "fault drop after", "fault slow"):
        assert seen[kind] > 0, (kind, seen)

    # 2. no fine-tuning job created twice; 3. the ledger counts each job once, failed ones unbilled
    entries = [f"k{k}" for k in range(K)]
    assert check_jobs(clean["api_manifest"], clean["api_registry"], entries)[0] == 0
    n_failed, tokens = check_jobs(faulty["api_manifest"], faulty["api_registry"], entries)
    assert n_failed == 1  # fail_jobs: 1 -- k0's first attempt, retried once
    assert tokens == check_jobs(clean["api_manifest"], clean["api_registry"], entries)[1]
    assert len(faulty["api_manifest"]["entries"]["k0"]["failed_jobs"]) == 1
    assert check_jobs(faulty["theta0_manifest"], faulty["theta0_registry"], ["theta0"]) \
        == (1, check_jobs(clean["theta0_manifest"], clean["theta0_registry"], ["theta0"])[1])
    # each server lost the response to its first job creation (scripted), and the job was adopted
    assert all(faulty[step + "_stats"]["fault drop after"] >= 1 for step in ("theta0", "api"))


# --- the fault mode itself -----------------------------------------------------------------------------

def test_fault_draws_are_seeded_and_follow_the_shares():
    s = FaultSettings(seed=7, rate_limit=0.2, server_error=0.1, drop=0.1, slow=0.3, slow_s=0.5,
                      retry_after_s=2, fail_jobs=2, fail_job_share=0.5)

    def kinds(settings):
        inj = FaultInjector(settings)
        return [getattr(inj.request("GET", "/v1/models"), "kind", None) for _ in range(4000)]

    a = kinds(s)
    assert a == kinds(s)  # the same seed, the same faults
    assert a != kinds(FaultSettings(**{**s.__dict__, "seed": 8}))
    c = Counter(a)
    assert c["429"] / 4000 == pytest.approx(0.2, abs=0.03) and c["500"] / 4000 == pytest.approx(0.1, abs=0.02)
    assert (c["drop"] + c["drop after"]) / 4000 == pytest.approx(0.1, abs=0.02)
    assert c["drop"] / (c["drop"] + c["drop after"]) == pytest.approx(0.5, abs=0.1)
    assert c["slow"] / 4000 == pytest.approx(0.6 * 0.3, abs=0.03)  # slow alone (it also joins the others)
    inj = FaultInjector(s)
    f = next(f for f in (inj.request("GET", "/v1/x") for _ in range(100)) if f and f.status == 429)
    assert f.headers == {"Retry-After": "2", "retry-after-ms": "2000"} and f.code == "rate_limit_exceeded"
    inj = FaultInjector(s)
    fails = [inj.job_fails() for _ in range(400)]
    assert fails[:2] == [True, True] and np.mean(fails[2:]) == pytest.approx(0.5, abs=0.08)
    # off by default; never on the health check or the test's own stats; `paths` narrows them
    assert not FaultSettings().active and FaultInjector().request("POST", "/v1/chat/completions") is None
    always = FaultSettings(server_error=1.0, paths=["/v1/chat"])
    assert FaultInjector(always).request("GET", "/v1/daunce/stats") is None
    assert FaultInjector(always).request("GET", "/v1/models") is None
    assert FaultInjector(always).request("POST", "/v1/chat/completions").status == 500


@pytest.mark.parametrize("bad, msg", [
    ({"rate_limit": 1.5}, r"local.faults.rate_limit must be a share in \[0, 1\]"),
    ({"server_error": 0.6, "drop": 0.6}, "at most 1"),
    ({"slow_s": -1}, "local.faults.slow_s must be >= 0"),
    ({"paths": ["v1/chat"]}, "starting with '/'"),
    ({"scripted": [{"status": 500}]}, "with a 'path'"),
    ({"rate": 0.1}, r"unknown key\(s\) blackbox.local.faults.rate"),
])
def test_fault_settings_are_checked_when_the_config_is_read(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        BlackboxConfig.from_dict({"local": {"faults": bad}})


def test_fault_settings_reach_the_server_process(tmp_path):
    cfg = BlackboxConfig.from_dict({"local": {"faults": {"drop": 0.25, "fail_jobs": 1}}})
    scfg = ServerConfig(state_dir=str(tmp_path), faults=cfg.local.faults)
    scfg.write(tmp_path / "server_config.json")
    back = ServerConfig.read(tmp_path / "server_config.json").faults
    assert isinstance(back, FaultSettings) and back.drop == 0.25 and back.fail_jobs == 1


def test_a_dropped_create_makes_the_openai_clients_own_retry_launch_a_second_job(tmp_path, base, chat_jsonl):
    """Why daunce switches the openai client's retries off: after a connection is dropped once
    the server has created a job, the client's retry sends the same POST again (it sends OpenAI
    no idempotency key) and a second job is trained and billed. daunce's retry looks first."""
    drop_after = {"method": "POST", "path": "/v1/fine_tuning/jobs", "drop": True, "after": True}
    cfg = ServerConfig(state_dir=str(tmp_path / "s"), models={"tiny": base}, train=TrainSettings(max_len=64),
                       faults=FaultSettings(scripted=[dict(drop_after)]))
    with serve_in_thread(cfg, KEY) as (url, st):
        raw = openai.OpenAI(base_url=url, api_key=KEY, max_retries=2)
        f = raw.files.create(file=("t.jsonl", chat_jsonl), purpose="fine-tune")
        raw.fine_tuning.jobs.create(model="tiny", training_file=f.id, metadata={"who": "openai"})
        assert len(raw.fine_tuning.jobs.list(metadata={"who": "openai"}).data) == 2  # the duplicate
        with pytest.raises(openai.APIConnectionError):  # the drop itself, without retries
            st.faults.append(dict(drop_after))
            openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).fine_tuning.jobs.create(
                model="tiny", training_file=f.id, metadata={"who": "nobody"})

        st.faults.append(dict(drop_after))
        c = APIClient(Credentials(url, KEY), sleep=lambda s: None)
        meta = {"who": "daunce"}
        c.create_job(before_retry=lambda: next(iter(c.list_jobs(metadata=meta)), None),
                     model="tiny", training_file=f.id, metadata=meta)
        assert len(c.list_jobs(metadata=meta)) == 1
        assert st.stats["fault drop after"] == 3
