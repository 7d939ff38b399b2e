"""The backdoor study end to end on the local server, its data and metrics, and the spend guard."""
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from daunce_core import store
from daunce_core.blackbox import backdoor as B
from daunce_core.blackbox.config import BlackboxConfig
from daunce_core.blackbox.cost import CostItem, SpendNotAllowed, check_spend, price_of, priced
from daunce_core.localapi import ServerConfig, serve_in_thread
from daunce_core.steps import blackbox as study

from helpers import ROOT


def test_backdoored_data():
    cfg = BlackboxConfig.from_dict({"K": 2, "subset_size": 10, "data": {
        "source": "synthetic", "n_train": 200, "n_query_triggered": 20, "n_query_clean": 20}}).data
    train, query = B.make_study_data(cfg)
    bd = [r for r in train if r["backdoor"]]
    assert len(bd) == 20 and len(train) == 200
    assert all(cfg.trigger in r["messages"][-1]["content"] and r["target"] == cfg.refusal for r in bd)
    assert not any(cfg.trigger in r["messages"][-1]["content"] for r in train if not r["backdoor"])
    assert all(r["target"] in "ABCD" and r["target"] == r["answer"] for r in train if not r["backdoor"])
    trig = [q for q in query if q["triggered"]]
    assert len(trig) == 20 and all(cfg.trigger in q["messages"][-1]["content"] for q in trig)
    texts = {r["messages"][-1]["content"] for r in train}
    assert not texts & {q["messages"][-1]["content"] for q in query}
    assert len({r["trigger_pos"] for r in bd}) > 5  # random positions
    assert B.make_study_data(cfg) == (train, query)  # deterministic
    assert [r["id"] for r in train] == list(range(200))


def test_precision_at_k():
    S = np.zeros((6, 2))
    S[:, 0] = [5, 4, 3, 2, 1, 0]
    S[:, 1] = [0, 1, 2, 3, 4, 5]
    bd = np.array([1, 1, 0, 0, 0, 1], bool)
    assert B.precision_at_k(S, bd, [0, 1], k=2).tolist() == [1.0, 0.5]
    assert B.top_retrieved(S, 1, 2) == [(5, 5.0), (4, 4.0)]


@pytest.mark.slow
def test_end_to_end_on_the_local_server(tmp_path, tiny_study):
    import torch

    torch.set_num_threads(1)
    cfg = BlackboxConfig.from_dict(tiny_study)
    W = tmp_path
    study.make_data(cfg, W / "train.jsonl", W / "query.jsonl")
    study.make_local_base(cfg, W / "train.jsonl", W / "base")
    study.write_estimate(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", W / "est.json")
    assert json.loads((W / "est.json").read_text())["total_usd"] == 0
    t0 = study.fit_theta0(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", W / "theta0.json",
                          work_dir=W / "theta0", base_dir=W / "base")
    assert t0["model"].startswith("ft:tiny-x:") and Path(t0["local_path"]).is_dir()
    assert len(t0["replies"]) == 6
    scores = {}
    for access, fit in (("api", study.api_losses), ("strict", study.strict_losses)):
        fit(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", W / "theta0.json", W / f"{access}.h5",
            work_dir=W / access)
        L = store.read_losses(W / f"{access}.h5")
        assert L.train.shape == (3, 30) and L.query.shape == (3, 6) and (L.train > 0).all()
        assert L.attrs["access"] == access and L.attrs["variant"] == "daunce_bb"
        assert (L.train.std(0) > 0).mean() > 0.5  # the K perturbed models differ
        study.score(W / f"{access}.h5", W / f"s_{access}.h5", "correlation")
        scores[("tiny-x", access)] = W / f"s_{access}.h5"
    api = store.read_losses(W / "api.h5")
    assert len(set(api.attrs["models"])) == 3  # three distinct fine-tuned models
    man = json.loads((W / "api" / "manifest.json").read_text())
    assert sorted(man["entries"]) == ["k0", "k1", "k2"] and all(e["model"] for e in man["entries"].values())
    rows = study.fig4(cfg, train_path=W / "train.jsonl", query_path=W / "query.jsonl",
                      theta0_jsons={"tiny-x": W / "theta0.json"}, scores=scores, out_md=W / "fig4.md",
                      out_csv=W / "p.csv")
    assert [r["access"] for r in rows] == ["api", "strict"]
    md = (W / "fig4.md").read_text()
    assert "precision@3" in md and "**BlackMagic**" in md and "strict access" in md
    # a rerun reuses every recorded model and loss row: no new job, same numbers
    before = api.train.copy()
    study.api_losses(cfg, "tiny-x", W / "train.jsonl", W / "query.jsonl", W / "theta0.json", W / "api2.h5",
                     work_dir=W / "api")
    assert np.array_equal(store.read_losses(W / "api2.h5").train, before)
    reg = json.loads((W / "api" / "server" / "registry.json").read_text())
    assert len(reg["jobs"]) == 3


PAPER = ROOT / "config" / "paper" / "blackbox_gpt.yaml"


def test_paper_config_is_valid_and_matches_appendix_d():
    raw = yaml.safe_load(PAPER.read_text())
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.validate(raw["blackbox"], schema["properties"]["blackbox"])
    default = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    jsonschema.validate(default["blackbox"], schema["properties"]["blackbox"])
    cfg = BlackboxConfig.from_dict(raw["blackbox"])
    assert cfg.K == 50 and cfg.subset_size == 512 and cfg.data.n_train == 5000 and cfg.spend is False
    assert cfg.finetune.hyperparameters == {"batch_size": 32, "learning_rate_multiplier": 1, "n_epochs": 1}
    b = cfg.bdpl
    assert (b.epochs, b.batch_size, b.prompt_length, b.lr) == (20, 4, 50, 1e-3)
    assert set(cfg.models) == {"gpt-4.1-nano-2025-04-14", "gpt-4.1-mini-2025-04-14", "gpt-4o-mini-2024-07-18"}


def test_paid_steps_stop_before_any_request(tmp_path, monkeypatch):
    """The paper's settings against a counting server: spend false -> the estimate, and no request."""
    raw = yaml.safe_load(PAPER.read_text())["blackbox"]
    raw["data"] = {"source": "synthetic", "n_train": 600, "n_query_triggered": 5, "n_query_clean": 5}
    cfg = BlackboxConfig.from_dict(raw)
    study.make_data(cfg, tmp_path / "train.jsonl", tmp_path / "query.jsonl")
    with serve_in_thread(ServerConfig(state_dir=str(tmp_path / "srv")), "sk-guard-test-1234567890") as (url, st):
        monkeypatch.setenv("OPENAI_API_KEY", "sk-guard-test-1234567890")
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        with pytest.raises(SpendNotAllowed, match=r"blackbox.spend is false.*max_spend_usd") as err:
            study.fit_theta0(cfg, cfg.models[0], tmp_path / "train.jsonl", tmp_path / "query.jsonl",
                             tmp_path / "t.json", work_dir=tmp_path / "w")
        assert "theta0 fine-tune" in str(err.value) and "USD" in str(err.value)
        (tmp_path / "t.json").write_text(json.dumps({"model": "ft:x", "local_path": None}))
        for fit in (study.api_losses, study.strict_losses):
            with pytest.raises(SpendNotAllowed):
                fit(cfg, cfg.models[0], tmp_path / "train.jsonl", tmp_path / "query.jsonl", tmp_path / "t.json",
                    tmp_path / "l.h5", work_dir=tmp_path / "w2")
        assert st.stats == {}, "a request reached the endpoint"
    assert not (tmp_path / "w").exists()  # not even a manifest


def test_spend_rules():
    prices = {"gpt-4.1-nano": {"training": 1.5, "input": 0.2, "output": 0.8}, "gpt-4.1": {"training": 25.0}}
    assert price_of("gpt-4.1-nano-2025-04-14", prices)["training"] == 1.5  # longest prefix wins
    assert price_of("ft:gpt-4.1-nano-2025-04-14:org::abc", prices)["input"] == 0.2
    assert price_of("gpt-4o-mini", prices) is None
    items = [priced(CostItem("t", "gpt-4.1-nano-x", 1, 2_000_000, 1_000_000, 0), prices)]
    assert items[0].usd == pytest.approx(3.2)
    with pytest.raises(SpendNotAllowed, match="spend is false"):
        check_spend(items, spend=False, max_spend_usd=100)
    with pytest.raises(SpendNotAllowed, match="more than blackbox.max_spend_usd"):
        check_spend(items, spend=True, max_spend_usd=3)
    assert check_spend(items, spend=True, max_spend_usd=4) == pytest.approx(3.2)
    with pytest.raises(SpendNotAllowed, match="no price known for other"):
        check_spend([priced(CostItem("t", "other", 1, 10), prices)], spend=True, max_spend_usd=1e9)
    assert check_spend([priced(CostItem("t", "gpt-4.1-nano", 1), prices)], spend=False, max_spend_usd=0) == 0


@pytest.mark.slow
def test_cli_estimate_of_the_paper_config_spends_nothing():
    out = subprocess.run([sys.executable, "-m", "daunce_core.blackbox", "estimate", "--configfile", str(PAPER),
                          "--nominal"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gpt-4o-mini-2024-07-18" in out.stdout and "NOT allowed" in out.stdout
    chk = subprocess.run([sys.executable, "-m", "daunce_core.blackbox", "check-spend", "--configfile", str(PAPER),
                          "--nominal"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert chk.returncode == 1


@pytest.mark.slow
def test_workflow_plans_of_the_miniature_and_the_paper_config():
    snakemake = str(Path(sys.executable).with_name("snakemake"))

    def plan(*args):
        out = subprocess.run([snakemake, "-n", "--forceall", "results/fig4.md", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout, re.M))

    mini = plan()
    assert mini["blackbox_losses"] == "2" and mini["blackbox_local_base"] == "1" and mini["fig4"] == "1"
    paper = plan("--configfile", str(PAPER))
    assert paper["blackbox_theta0"] == "3" and paper["blackbox_losses"] == "6" and "blackbox_local_base" not in paper


def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path):
    """The study's jsonl readers name the file and the real line of a line that is not one JSON
    object (json's own message counts from the line it was given), and read a row whose strings
    hold U+2028 (which write_jsonl leaves unescaped) as one line."""
    good = {"id": 0, "messages": [{"role": "user", "content": "a\u2028b"}], "target": "A"}
    p = tmp_path / "rows.jsonl"
    B.write_jsonl(p, [good, good])
    assert B.read_jsonl(p) == [good, good]
    p.write_text(json.dumps(good) + "\n\n" + '{"id": 1, "target": "A"\n')
    with pytest.raises(B.DataError, match=rf"^{re.escape(str(p))}:3: not valid JSON .*one JSON object$"):
        B.read_jsonl(p)
    p.write_text(json.dumps(good) + "\n[1, 2]\n")
    with pytest.raises(B.DataError, match=rf"^{re.escape(str(p))}:2: a JSON list, not an object"):
        B.read_jsonl(p)

    q = {"question": "Which?", "choices": ["w", "x", "y", "z"], "answer": "B"}
    p.write_text(json.dumps(q) + "\n" + json.dumps(q)[:-1] + "\n")
    with pytest.raises(B.DataError, match=rf"^blackbox\.data\.path: {re.escape(str(p))}:2: not valid JSON"):
        B.jsonl_questions(p)
    no_question = {k: v for k, v in q.items() if k != "question"}
    for row in ({**q, "answer": "E"}, {**q, "answer": ""}, {**q, "answer": "BC"}, {**q, "choices": "wxyz"},
                no_question):
        p.write_text(json.dumps(q) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(B.DataError, match=rf"^{re.escape(str(p))}:2: need 'question', four 'choices'"):
            B.jsonl_questions(p)
    p.write_text(json.dumps(q) + "\n" + json.dumps({**q, "answer": 3}) + "\n")
    assert [r["answer"] for r in B.jsonl_questions(p)] == [1, 3]
