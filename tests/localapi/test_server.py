"""The local OpenAI-compatible server, spoken to by the real openai client over loopback HTTP."""
import json
import os
import time

import openai
import pytest

from daunce_core.localapi import LocalServer, ServerConfig, TrainSettings, build_server, serve_in_thread

KEY = "sk-server-test-abcdef0123456789"


def _wait(c, job_id, timeout=60):
    t = time.time()
    while time.time() - t < timeout:
        j = c.fine_tuning.jobs.retrieve(job_id)
        if j.status in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(0.05)
    raise TimeoutError(job_id)


def test_endpoints_with_the_openai_client(tmp_path, base, chat_jsonl):
    cfg = ServerConfig(state_dir=str(tmp_path / "s"), models={"tiny": base}, train=TrainSettings(max_len=64))
    with serve_in_thread(cfg, KEY) as (url, st):
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny"]
        f = c.files.create(file=("t.jsonl", chat_jsonl), purpose="fine-tune")
        assert f.status == "processed" and c.files.retrieve(f.id).filename == "t.jsonl"
        assert c.files.content(f.id).content == chat_jsonl
        assert [x.id for x in c.files.list(purpose="fine-tune")] == [f.id]
        job = c.fine_tuning.jobs.create(
            model="tiny", training_file=f.id, suffix="s1", seed=1, metadata={"run": "r", "k": "0"},
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4,
                                                                             "learning_rate_multiplier": 2}}})
        j = _wait(c, job.id)
        assert j.status == "succeeded" and j.fine_tuned_model.startswith("ft:tiny:") and j.trained_tokens > 0
        assert j.hyperparameters.n_epochs == 2 and j.hyperparameters.learning_rate_multiplier == 2
        other = c.fine_tuning.jobs.create(model=j.fine_tuned_model, training_file=f.id, metadata={"run": "x"})
        _wait(c, other.id)
        assert [x.id for x in c.fine_tuning.jobs.list(metadata={"run": "r"})] == [job.id]
        assert len(c.fine_tuning.jobs.list().data) == 2
        page = c.fine_tuning.jobs.list(limit=1)
        assert page.has_more and len(page.data) == 1
        assert any("Fine-tuning started" in e.message for e in c.fine_tuning.jobs.list_events(job.id).data)
        assert {m.id for m in c.models.list()} == {"tiny", j.fine_tuned_model, _wait(c, other.id).fine_tuned_model}

        r = c.chat.completions.create(model=j.fine_tuned_model, messages=[{"role": "user", "content": "hello 3"}],
                                      temperature=0, logprobs=True, top_logprobs=5, max_completion_tokens=3)
        ch = r.choices[0]
        assert ch.finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
        for e in ch.logprobs.content:
            assert len(e.top_logprobs) == 5 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
            assert e.logprob <= 0 and bytes(e.bytes).decode(errors="replace") == e.token
            assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy picks the top token
        assert "".join(e.token for e in ch.logprobs.content) == ch.message.content

        for kw, code in ((dict(model="nope"), 404), (dict(model="tiny", n=2), 400),
                         (dict(model="tiny", logprobs=True, top_logprobs=21), 400)):
            with pytest.raises(openai.APIStatusError) as err:
                c.chat.completions.create(messages=[{"role": "user", "content": "x"}], **kw)
            assert err.value.status_code == code
        with pytest.raises(openai.BadRequestError, match="context"):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 200}])
        bad = c.files.create(file=("bad.jsonl", b"{not json}\n" * 12), purpose="fine-tune")
        jb = _wait(c, c.fine_tuning.jobs.create(model="tiny", training_file=bad.id).id)
        assert jb.status == "failed" and jb.error.code == "invalid_training_file"
        with pytest.raises(openai.NotFoundError):
            c.fine_tuning.jobs.retrieve("ftjob-nope")
        assert c.files.delete(bad.id).deleted


def test_state_survives_a_restart_and_unfinished_jobs_resume(tmp_path, base, chat_jsonl):
    state = str(tmp_path / "s")
    cfg = ServerConfig(state_dir=state, models={"tiny": base}, train=TrainSettings(max_len=64))
    with serve_in_thread(cfg, KEY) as (url, st):
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        f = c.files.create(file=("t.jsonl", chat_jsonl), purpose="fine-tune")
        done = _wait(c, c.fine_tuning.jobs.create(model="tiny", training_file=f.id).id)
    # a job recorded as running when the server went away
    reg = json.loads((tmp_path / "s" / "registry.json").read_text())
    ghost = dict(reg["jobs"][done.id], id="ftjob-ghost", status="running", fine_tuned_model=None)
    reg["jobs"]["ftjob-ghost"] = ghost
    (tmp_path / "s" / "registry.json").write_text(json.dumps(reg))
    with serve_in_thread(cfg, KEY) as (url, st):
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert c.fine_tuning.jobs.retrieve(done.id).fine_tuned_model == done.fine_tuned_model
        assert c.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_completion_tokens=1,
                                         messages=[{"role": "user", "content": "hello"}]).choices
        assert _wait(c, "ftjob-ghost").status == "succeeded"


@pytest.mark.slow
def test_subprocess_server_starts_on_a_free_port_and_stops(tmp_path, base):
    srv = LocalServer(ServerConfig(state_dir=str(tmp_path / "s"), models={"tiny": base}))
    with srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        c = openai.OpenAI(base_url=srv.base_url, api_key=srv.api_key, max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key="sk-not-the-key-123456", max_retries=0).models.list()
        pid = srv.proc.pid
    assert srv.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    saved = (tmp_path / "s" / "server_config.json").read_text()
    assert srv.api_key not in saved and srv.api_key not in (tmp_path / "s" / "server.log").read_text()
    with pytest.raises(ValueError, match="no API key"):
        build_server(ServerConfig(state_dir=str(tmp_path / "t")), "")


@pytest.mark.parametrize("bad", ["foo", "=folder", "foo="])
def test_serve_refuses_a_model_without_its_folder_as_a_usage_error(bad, tmp_path, capsys):
    """``serve --model NAME`` (no ``=FOLDER``) is a command-line error naming the option, not a traceback."""
    from daunce_core.blackbox.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--state", str(tmp_path / "srv"), "--model", bad])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit_.value.code == 2 and "argument --model: expected NAME=FOLDER" in err and repr(bad) in err
    assert not (tmp_path / "srv").exists()
