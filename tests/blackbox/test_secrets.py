"""The API key never appears in logs or files, and configs cannot carry keys.

The whole black-box study runs through the OpenAI code path (key and base URL from environment
variables) against a local server with a distinctive key, with every logger at DEBUG; then every
file it wrote, the log and the error messages are searched for the key.
"""
import logging

import pytest

from daunce_core.blackbox.client import AuthError
from daunce_core.blackbox.config import BlackboxConfig, ConfigError
from daunce_core.localapi import ServerConfig, TrainSettings, serve_in_thread
from daunce_core.steps import blackbox as study

KEY = "sk-proj-SECRETdaunceTEST-7f3a9c1e5b2d4f60a8c3e1b7d9f2a4c6"


def test_key_never_written_to_logs_or_files(tmp_path, monkeypatch, caplog, tiny_study):
    import torch

    torch.set_num_threads(1)
    log_file = tmp_path / "run.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in ("openai", "httpx2"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    try:
        # the miniature study (tests/conftest.py) through the OpenAI code path, K=2, fast retries
        cfg = BlackboxConfig.from_dict(tiny_study | {
            "backend": "openai", "K": 2, "api": {"retry": {"initial_delay": 0.01, "max_delay": 0.05}},
            "theta0": {"hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 3}}})
        W = tmp_path / "results"
        study.make_data(cfg, W / "train.jsonl", W / "query.jsonl")
        study.make_local_base(cfg, W / "train.jsonl", W / "base")
        scfg = ServerConfig(state_dir=str(W / "server"), models={"tiny-x": str(W / "base")},
                            train=TrainSettings(max_len=384))
        with serve_in_thread(scfg, KEY) as (url, st):
            monkeypatch.setenv("OPENAI_API_KEY", KEY)
            monkeypatch.setenv("OPENAI_BASE_URL", url)
            st.faults.append({"path": "/v1/chat/completions", "status": 429, "count": 2,
                              "headers": {"Retry-After": "0.01"}})  # retries get logged too
            study.write_estimate(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", W / "estimate.json")
            study.fit_theta0(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", W / "theta0.json",
                             work_dir=W / "work" / "theta0")
            for access, fit in (("api", study.api_losses), ("strict", study.strict_losses)):
                fit(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", W / "theta0.json",
                    W / "losses" / f"{access}.h5", work_dir=W / "work" / access)
                study.score(W / "losses" / f"{access}.h5", W / "scores" / f"{access}.h5", "correlation")
            study.fig4(cfg, train_path=W / "train.jsonl", query_path=W / "query.jsonl",
                       theta0_jsons={"tiny-x": W / "theta0.json"},
                       scores={("tiny-x", a): W / "scores" / f"{a}.h5" for a in ("api", "strict")},
                       out_md=W / "fig4.md", out_csv=W / "p.csv")
            assert "retry" in caplog.text
            # a rejected key: the error names the variable, not the key
            monkeypatch.setenv("OPENAI_API_KEY", KEY[:-4] + "0000")
            with pytest.raises(AuthError) as err:
                study.api_losses(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", W / "theta0.json",
                                 W / "losses" / "again.h5", work_dir=W / "work" / "again")
            logging.getLogger("daunce_core").error("failed: %s", err.value)
            assert "OPENAI_API_KEY" in str(err.value)
            # the redaction filter is live: a key logged by mistake is masked
            logging.getLogger("some.library").warning("oops, logging the key %s", KEY)
            assert "oops, logging the key [REDACTED]" in caplog.text
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        for name in ("openai", "httpx2"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert (W / "fig4.md").exists() and (W / "work" / "api" / "manifest.json").exists()
    needles = [KEY.encode(), KEY[8:30].encode(), (KEY[:-4] + "0000").encode()]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n not in data, f"the key leaked into {p}"
    text = log_file.read_text() + caplog.text + str(err.value)
    assert "HTTP" in text or "chat completion" in text  # the log did record requests
    for n in needles:
        assert n.decode() not in text


def test_config_refuses_keys():
    with pytest.raises(ConfigError, match="environment variable"):
        BlackboxConfig.from_dict({"api": {"api_key": "abc"}})
    with pytest.raises(ConfigError, match="looks like an API key"):
        BlackboxConfig.from_dict({"api": {"base_url": KEY}})
    with pytest.raises(ConfigError, match="unknown key"):
        BlackboxConfig.from_dict({"spnd": True})


def test_command_line_strings_are_read_as_values_and_nested_typos_named():
    """``--config 'blackbox={"spend": "true", ...}'`` delivers strings; every section, down to the
    local server's training settings, refuses unknown keys and wrong types by dotted name."""
    cfg = BlackboxConfig.from_dict({"spend": "true", "max_spend_usd": "300", "K": "4"})
    assert cfg.spend is True and cfg.max_spend_usd == 300.0 and cfg.K == 4
    with pytest.raises(ConfigError, match="blackbox.spend must be a bool"):
        BlackboxConfig.from_dict({"spend": "maybe"})
    with pytest.raises(ConfigError, match=r"blackbox\.local\.train\.max_lenn"):
        BlackboxConfig.from_dict({"local": {"train": {"max_lenn": 64}}})
    with pytest.raises(ConfigError, match=r"blackbox\.api\.retry\.jitter must be a float"):
        BlackboxConfig.from_dict({"api": {"retry": {"jitter": [1]}}})
    assert BlackboxConfig.from_dict({"local": {"train": {"max_len": 64}}}).local.train.max_len == 64
