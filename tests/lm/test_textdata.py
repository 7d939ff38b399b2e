"""daunce_core.lm.data: the synthetic task, hub loaders (offline errors, local files), answer checks."""
import json

import numpy as np
import pytest

from daunce_core.lm import data as textdata


def test_synthetic_task_structure():
    t = textdata.synthetic_task(n_ops=5, n_train=100, queries_per_op=6, skew=0.7, seed=1)
    assert len(t["train"]) == 100 and len(t["query"]) == 30
    counts = [t["ops"][s]["n_train"] for s in textdata.SYMBOLS[:5]]
    assert counts == sorted(counts, reverse=True) and counts[0] > 2 * counts[-1]
    assert [e["id"] for e in t["train"]] == list(range(100))
    train_prompts = {e["prompt"] for e in t["train"]}
    assert not any(q["prompt"] in train_prompts for q in t["query"])  # queries are new operand pairs
    for e in t["train"] + t["query"]:
        a, b = int(e["prompt"][0]), int(e["prompt"][2])
        assert int(e["answer"]) == a + b + t["ops"][e["prompt"][1]]["const"]
    assert t == textdata.synthetic_task(n_ops=5, n_train=100, queries_per_op=6, skew=0.7, seed=1)


def test_synthetic_check():
    ex = {"answer": "12"}
    assert textdata.check_answer("synthetic", ex, "12")
    assert textdata.check_answer("synthetic", ex, " 12 and more")
    assert not textdata.check_answer("synthetic", ex, "1")
    assert not textdata.check_answer("synthetic", ex, "123")
    assert not textdata.check_answer("synthetic", ex, "")


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{a} then \boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"no box", None),
    (r"\boxed 5", "5"),
])
def test_extract_boxed(text, expected):
    assert textdata.extract_boxed(text) == expected


@pytest.mark.parametrize("pred,ref", [
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac{1}{2}", r"\frac12"),
    ("1/2", r"\frac{1}{2}"),
    (r"10^\circ", "10"),
    (r"\$5.00", "5"),
    ("x = 3", "3"),
    (r"\text{(B)}", "(B)"),
    ("1,000", "1000"),
    ("(1,2)", "(1, 2)"),
    (r"50\%", "50"),
    (r"\left(3, 4\right)", "(3,4)"),
])
def test_math_equal_accepts_equivalent_forms(pred, ref):
    assert textdata.math_equal(pred, ref)


@pytest.mark.parametrize("pred,ref", [("3", "4"), (r"\frac{1}{3}", "0.5"), ("(1,2)", "(2,1)"), ("", "1")])
def test_math_equal_rejects_different_answers(pred, ref):
    assert not textdata.math_equal(pred, ref)


def test_math_check_uses_the_last_boxed_answer():
    ex = {"answer": r"\frac{3}{4}"}
    assert textdata.check_answer("math", ex, r"First \boxed{1}. Finally the answer is \boxed{0.75}.")
    assert not textdata.check_answer("math", ex, r"\boxed{0.75} no wait \boxed{1}")
    assert textdata.check_answer("math", {"answer": "7"}, "so the answer is 7.")


def test_ifeval_uses_lm_eval_checkers():
    import lm_eval.tasks.ifeval.utils  # noqa: F401  (a declared dependency: its absence is an error)
    meta = {"key": 1, "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
            "kwargs": [{}, {"relation": "less than", "num_words": 5}]}
    ex = {"prompt": "Write without commas", "meta": meta}
    assert textdata.check_answer("ifeval", ex, "hello there friend")
    assert not textdata.check_answer("ifeval", ex, "hello, there friend")
    assert not textdata.check_answer("ifeval", ex, "one two three four five six")
    meta2 = {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
    assert textdata.check_answer("ifeval", {"prompt": "p", "meta": meta2}, "all lower case")
    assert not textdata.check_answer("ifeval", {"prompt": "p", "meta": meta2}, "Not Lower")


def test_hub_dataset_offline_error_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(textdata.DataUnavailable, match="offline.*local .jsonl") as info:
        textdata.load_task("numinamath")
    assert "\n" not in str(info.value)
    with pytest.raises(textdata.DataUnavailable, match="does not exist"):
        textdata.load_task("math", source="/nonexistent/math.jsonl")


def test_local_files_load_in_the_common_format(tmp_path):
    rows = [{"problem": f"What is {i}+1?", "solution": f"It is \\boxed{{{i + 1}}}.", "level": "Level 1",
             "type": "Algebra"} for i in range(10)]
    p = tmp_path / "math.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    exs = textdata.load_task("math", source=str(p), n=4, seed=0)
    assert len(exs) == 4 and [e["id"] for e in exs] == [0, 1, 2, 3]
    assert all(textdata.check_answer("math", e, e["response"]) for e in exs)
    numina = textdata.load_task("numinamath", source=str(p))  # same columns
    assert numina[3]["answer"] == "4"
    chat = tmp_path / "autoif.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "s"},
                                             {"role": "user", "content": "Say hi in lowercase"},
                                             {"role": "assistant", "content": "hi"}]}))
    ex = textdata.load_task("autoif", source=str(chat))[0]
    assert ex["prompt"] == "Say hi in lowercase" and ex["response"] == "hi"
    ife = tmp_path / "ifeval.jsonl"
    ife.write_text(json.dumps({"key": 7, "prompt": "Write in lowercase.", "instruction_id_list":
                               ["change_case:english_lowercase"], "kwargs": [{}]}))
    e = textdata.load_task("ifeval", source=str(ife))[0]
    assert e["meta"]["instruction_id_list"] == ["change_case:english_lowercase"]


def test_jsonl_roundtrip(tmp_path):
    rows = [{"id": i, "prompt": "p", "response": "r", "meta": {"x": [1, 2]}} for i in range(3)]
    textdata.write_jsonl(tmp_path / "a.jsonl", rows)
    assert textdata.read_jsonl(tmp_path / "a.jsonl") == rows
    assert list(tmp_path.iterdir()) == [tmp_path / "a.jsonl"]


def test_pretrain_corpus_is_correct_arithmetic():
    for e in textdata.pretrain_corpus(50):
        assert eval(e["prompt"][:-1]) == int(e["response"]) == int(e["answer"])
    assert np.mean(["+" in e["prompt"][2:] for e in textdata.pretrain_corpus(200)]) > 0.5


def test_a_malformed_jsonl_line_is_one_line_naming_the_file_and_its_line(tmp_path):
    """Audit 2, finding 7: json.loads of the bad line alone said 'line 2 column 1', no file."""
    p = tmp_path / "train.jsonl"
    rows = [json.dumps({"id": i, "prompt": "p", "response": "r"}) for i in range(24)]
    p.write_text("\n".join(rows) + "\n\n" + '{"id": 99, "prompt": "1+1=", "response": "2"\n')  # line 26 lacks '}'
    with pytest.raises(ValueError, match=r"^\S*train\.jsonl:26: not valid JSON \(Expecting ',' delimiter "
                       r"at column 45\); fix or remove that line$"):
        textdata.read_jsonl(p)


def test_saved_model_folders_follow_the_umask(tmp_path):
    """Audit 2, finding 6: mkdtemp's folder is 0700 and safetensors writes its weights 0600."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from daunce_core.lm.hub import save_model

    class Writer:  # what save_pretrained does: weights through safetensors, the rest as JSON
        def save_pretrained(self, folder):
            save_file({"w": torch.zeros(2)}, f"{folder}/model.safetensors")
            with open(f"{folder}/config.json", "w") as fh:
                fh.write("{}")

    old = os.umask(0o002)
    try:
        save_model(Writer(), Writer(), tmp_path / "model")
    finally:
        os.umask(old)
    out = tmp_path / "model"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o775
    assert {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in out.iterdir()} == {
        "model.safetensors": 0o664, "config.json": 0o664}
