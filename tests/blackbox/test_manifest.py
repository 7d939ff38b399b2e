"""The fine-tuning manifest: a killed run is resumed without launching any job twice."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from daunce_core.blackbox.client import APIClient, BlackboxError, Credentials
from daunce_core.blackbox.config import FinetuneConfig
from daunce_core.blackbox.finetune import run_finetunes
from daunce_core.blackbox.manifest import Manifest, ManifestError
from daunce_core.localapi import ServerConfig, TrainSettings, serve_in_thread

from helpers import ROOT

KEY = "sk-manifest-test-abcdef0123456789"

# Shared by this process and the client subprocess that gets killed.
SPECS = '''
from daunce_core.blackbox.finetune import FinetuneSpec
def make_specs(n_models=4, n_examples=12):
    specs = []
    for k in range(n_models):
        ex = [{"messages": [{"role": "user", "content": f"question {k} {i}"},
                            {"role": "assistant", "content": "A" if (i + k) % 2 else "B"}]}
              for i in range(n_examples)]
        specs.append(FinetuneSpec(f"k{k}", "tiny", ex, {"n_epochs": 25, "batch_size": 4,
                                                        "learning_rate_multiplier": 1}, seed=k))
    return specs
'''
ns: dict = {}
exec(SPECS, ns)
make_specs = ns["make_specs"]
FP = {"test": 1}


@pytest.fixture(scope="module")
def base(tiny_lm):
    """The tiny LM, its tokenizer trained on this module's questions (tests/conftest.py)."""
    return tiny_lm("<|user|>\nquestion 1 2\n<|assistant|>\nA\n")


@pytest.fixture()
def server(tmp_path, base):
    cfg = ServerConfig(state_dir=str(tmp_path / "server"), models={"tiny": base}, train=TrainSettings(max_len=64))
    with serve_in_thread(cfg, KEY) as (url, st):
        yield url, st


def _client(url):
    return APIClient(Credentials(url, KEY), sleep=lambda s: None)


def _jobs(url, run_id):
    return _client(url).list_jobs(metadata={"daunce_run": run_id})


FAST = FinetuneConfig(max_active=1, poll_interval_s=0.05, max_attempts=2)


def test_killed_run_is_resumed_without_duplicate_jobs(server, tmp_path):
    url, st = server
    man_path = tmp_path / "manifest.json"
    code = SPECS + f'''
import os, json
from daunce_core.blackbox.client import APIClient, Credentials
from daunce_core.blackbox.config import FinetuneConfig
from daunce_core.blackbox.finetune import run_finetunes
from daunce_core.blackbox.manifest import Manifest
c = APIClient(Credentials(os.environ["T_URL"], os.environ["T_KEY"]))
run_finetunes(c, Manifest({str(man_path)!r}, {FP!r}), make_specs(),
              FinetuneConfig(max_active=1, poll_interval_s=0.05))
'''
    env = dict(os.environ, T_URL=url, T_KEY=KEY, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if man_path.exists():
                ent = json.loads(man_path.read_text())["entries"]
                if (ent.get("k1", {}).get("job") or {}).get("id"):
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the client never created the second job")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    ent = json.loads(man_path.read_text())["entries"]
    assert "model" not in ent.get("k3", {}), "killed too late to test a resume"
    created_before = st.stats.get("POST /v1/fine_tuning/jobs", 0)
    assert created_before >= 2

    man = Manifest(man_path, FP)
    models = run_finetunes(_client(url), man, make_specs(), FAST)
    jobs = _jobs(url, man.run_id)
    assert sorted(j.metadata["daunce_entry"] for j in jobs) == ["k0", "k1", "k2", "k3"]  # one job each
    assert all(j.status == "succeeded" for j in jobs)
    assert st.stats["POST /v1/fine_tuning/jobs"] == 4
    assert models == {f"k{k}": man.entry(f"k{k}")["model"] for k in range(4)}
    # a third run launches nothing and returns the same models
    assert run_finetunes(_client(url), Manifest(man_path, FP), make_specs(), FAST) == models
    assert st.stats["POST /v1/fine_tuning/jobs"] == 4
    assert st.stats["POST /v1/files"] == 4  # uploads are reused too


def test_lost_create_response_is_adopted_not_repeated(server, tmp_path):
    url, st = server
    st.faults.append({"method": "POST", "path": "/v1/fine_tuning/jobs", "status": 502, "count": 1, "after": True})
    man = Manifest(tmp_path / "m.json", FP)
    run_finetunes(_client(url), man, make_specs(1), FAST)
    jobs = _jobs(url, man.run_id)
    assert len(jobs) == 1 and jobs[0].status == "succeeded"
    assert st.stats["POST /v1/fine_tuning/jobs"] == 1  # the retry found the job instead of re-sending


def test_crash_between_create_and_record_is_adopted(server, tmp_path):
    url, st = server
    man = Manifest(tmp_path / "m.json", FP)
    spec = make_specs(1)[0]
    c = _client(url)
    f = c.upload("x.jsonl", spec.jsonl())
    job = c.create_job(model="tiny", training_file=f.id, metadata={"daunce_run": man.run_id,
                                                                 "daunce_entry": "k0", "daunce_attempt": "1"})
    man.update("k0", job={"state": "creating", "attempt": 1, "id": None})  # the id never made it to disk
    out = run_finetunes(c, man, [spec], FAST)
    assert man.entry("k0")["job"]["id"] == job.id
    assert st.stats["POST /v1/fine_tuning/jobs"] == 1 and out["k0"].startswith("ft:tiny:")


def test_failed_jobs_are_retried_then_reported_and_finished_ones_kept(server, tmp_path):
    url, st = server
    specs = make_specs(2)
    specs[1].examples = specs[1].examples[:3]  # fewer than 10 examples: the endpoint fails the job
    man = Manifest(tmp_path / "m.json", FP)
    with pytest.raises(BlackboxError, match="k1.*invalid_training_file|1 fine-tune"):
        run_finetunes(_client(url), man, specs, FAST)
    assert man.entry("k0")["model"]
    assert len(man.entry("k1")["failed_jobs"]) == 2  # max_attempts = 2
    assert st.stats["POST /v1/fine_tuning/jobs"] == 3


def test_manifest_refuses_other_settings_and_never_replaces_a_model(tmp_path):
    m = Manifest(tmp_path / "m.json", {"a": 1})
    m.update("k0", model="ft:x")
    with pytest.raises(ManifestError, match="differs in: a"):
        Manifest(tmp_path / "m.json", {"a": 2})
    with pytest.raises(ManifestError, match="refusing to replace"):
        Manifest(tmp_path / "m.json", {"a": 1}).update("k0", model="ft:y")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="never overwritten"):
        Manifest(tmp_path / "bad.json", {"a": 1})
    assert (tmp_path / "bad.json").read_text() == "{not json"


def test_api_fitter_checks_lr_against_the_configured_multiplier(tmp_path):
    """An API job's rate is the configured multiplier (part of the manifest's fingerprint): fit
    refuses another lr before sending anything."""
    import numpy as np

    from daunce_core.blackbox.config import LogprobConfig
    from daunce_core.fit import Fitter
    from daunce_core.fit.endpoint import APIFitter, configured_lr

    assert configured_lr({"learning_rate_multiplier": 2}) == 2.0
    assert np.isnan(configured_lr({"learning_rate_multiplier": "auto"})) and np.isnan(configured_lr({}))
    man = Manifest(tmp_path / "manifest.json", {"t": 1})
    for mult, bad in ((1, 2.0), ("auto", 1.0)):
        f = APIFitter(None, man, theta0="m", train=[], query=[], training_examples=[], subsets=[],
                      hyperparameters={"learning_rate_multiplier": mult}, finetune=FinetuneConfig(),
                      logprobs=LogprobConfig(), work_dir=tmp_path)
        assert isinstance(f, Fitter)
        with pytest.raises(ValueError, match="learning_rate_multiplier"):
            f.fit([0], lr=bad)


class _LossEndpoint:
    """A chat endpoint whose NLL of the target ("A") depends on the model and the user's text."""

    def __init__(self):
        self.calls = 0

    def chat(self, **kw):
        from types import SimpleNamespace

        self.calls += 1
        user = next(m["content"] for m in kw["messages"] if m["role"] == "user")
        nll = 0.1 * len(user) + (0.5 if kw["model"].endswith("k1") else 0.0)
        entry = {"token": "A", "logprob": -nll, "bytes": [65], "top_logprobs": []}
        return SimpleNamespace(choices=[SimpleNamespace(logprobs=SimpleNamespace(content=[entry]),
                                                        finish_reason="stop")])


def test_api_loss_cache_is_keyed_by_the_rows_it_scored(tmp_path):
    """The per-model loss cache (work/losses/k*.npz) serves a rerun only for the same model, the
    same rows (messages and targets, in order) and the same logprob settings: a query set that
    changed while the training set (hence the fine-tunes) stayed is scored again, not relabelled."""
    import numpy as np

    from daunce_core.blackbox.config import LogprobConfig
    from daunce_core.fit.endpoint import APIFitter

    def row(i, text):
        return {"id": i, "messages": [{"role": "user", "content": text}], "target": "A"}

    train = [row(i, f"t{i}") for i in range(4)]
    query_a = [row(10, "clean question"), row(11, "q")]
    query_b = [row(10, "BlackMagic clean question"), row(11, "q")]  # same ids and count, row 10 changed
    man = Manifest(tmp_path / "manifest.json", {"t": 1})
    for k in (0, 1):  # finished fine-tunes: fit only reads losses
        man.update(f"k{k}", model=f"ft:tiny:k{k}")
    fake = _LossEndpoint()

    def fit(query, work, lp=None):
        lp = lp or LogprobConfig(concurrency=1)
        f = APIFitter(fake, man, theta0="t0", train=train, query=query, training_examples=train,
                      subsets=[np.array([0, 1]), np.array([2, 3])],
                      hyperparameters={"learning_rate_multiplier": 1}, finetune=FAST, logprobs=lp, work_dir=work)
        return f.fit([0, 1], lr=1.0)

    a = fit(query_a, tmp_path / "work")
    assert fake.calls == 2 * 6
    b = fit(query_b, tmp_path / "work")  # the rows changed: scored again
    assert fake.calls == 2 * 12
    fresh = fit(query_b, tmp_path / "fresh")
    assert np.array_equal(b.query, fresh.query) and not np.array_equal(a.query, b.query)
    assert np.array_equal(b.train, a.train)
    calls = fake.calls
    again = fit(query_b, tmp_path / "work")  # nothing changed: every loss from the cache
    assert fake.calls == calls and np.array_equal(again.query, b.query) and np.array_equal(again.train, b.train)
    fit(query_b, tmp_path / "work", LogprobConfig(concurrency=4))  # concurrency does not change a score
    assert fake.calls == calls
    fit(query_b, tmp_path / "work", LogprobConfig(concurrency=1, top_logprobs=5))  # a setting that does
    assert fake.calls == calls + 2 * 6


@pytest.mark.parametrize("text, what", [
    ("[]", "a JSON array, not an object"),
    ('"x"', "a JSON string, not an object"),
    ("null", "a JSON null, not an object"),
    ('{"fingerprint": {"a": 1}, "entries": {}}', "missing or malformed: run_id"),
    ('{"run_id": "r", "fingerprint": {"a": 1}, "entries": []}', "missing or malformed: entries"),
])
def test_json_that_is_not_a_manifest_is_refused_naming_the_file(tmp_path, text, what):
    path = tmp_path / "m.json"
    path.write_text(text)
    msg = rf"^{re.escape(str(path))}: not a daunce manifest \({what}.*never overwritten"
    with pytest.raises(ManifestError, match=msg):
        Manifest(path, {"a": 1})
    assert path.read_text() == text


def test_a_manifest_without_usage_still_records_it(tmp_path):
    path = tmp_path / "m.json"
    Manifest(path, {"a": 1})
    data = json.loads(path.read_text())
    del data["usage"]
    path.write_text(json.dumps(data))
    m = Manifest(path, {"a": 1})
    m.set_usage("api", {"requests": 1})
    assert json.loads(path.read_text())["usage"] == {"api": {"requests": 1}}
