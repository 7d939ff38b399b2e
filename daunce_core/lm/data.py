"""Text data for the LLM experiments (Section 4.2): the synthetic miniature and the hub datasets.

Every example is a dict ``{"id", "prompt", "response", "answer", "meta"}``, trained on
``prompt + response`` with the loss on the response only and judged by :func:`check_answer`; the
sources are ``synthetic`` (the embedded miniature), ``numinamath``/``math`` and
``autoif``/``ifeval``. The LLM steps call it. Each source and offline use:
docs/design.md#daunce_corelmdatapy-text-data-for-the-llm-experiments."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..store import atomic_path

__all__ = [
    "DataUnavailable",
    "synthetic_task",
    "pretrain_corpus",
    "load_task",
    "write_jsonl",
    "read_jsonl",
    "check_answer",
    "extract_boxed",
    "strip_math_string",
    "math_equal",
    "ifeval_follows",
    "HUB_SOURCES",
]


class DataUnavailable(RuntimeError):
    """A dataset is neither on disk nor reachable on the Hugging Face hub."""


# --- the synthetic miniature ----------------------------------------------------------------

# Operator symbols of the fine-tuning task (single characters the byte-level tokenizer keeps whole).
SYMBOLS = "ABCDEFGHJKMNPQRSTUVWXYZ"


def check_template(template: Any, key: str) -> str:
    """``template`` if it places the prompt (contains ``{prompt}``, or is empty: the prompt alone).

    A template without ``{prompt}`` would encode every example to the same prompt tokens, so it is
    refused with a one-line ``ValueError`` naming ``key``.
    """
    if not isinstance(template, str):
        raise ValueError(f"{key} must be a string containing {{prompt}}, got {type(template).__name__}")
    if template and "{prompt}" not in template:
        near = re.findall(r"\{[^{}]{0,20}\}", template)
        hint = f" (found {', '.join(near)}; the name is lower-case)" if near else ""
        raise ValueError(f"{key} {template!r} has no {{prompt}}{hint}: every example would get the same "
                         "prompt; write e.g. 'Q: {prompt}\\nA:'")
    return template


def _op_counts(n_ops: int, n_train: int, skew: float) -> np.ndarray:
    """Training examples per operator, geometric with ratio ``skew`` (first operator largest)."""
    w = skew ** np.arange(n_ops)
    counts = np.floor(w / w.sum() * n_train).astype(int)
    counts[: n_train - counts.sum()] += 1
    return counts


def synthetic_task(
    *,
    n_ops: int = 8,
    n_train: int = 320,
    queries_per_op: int = 12,
    skew: float = 0.8,
    max_operand: int = 9,
    seed: int = 0,
) -> dict[str, Any]:
    """The miniature fine-tuning task: operators ``a X b = a + b + c_X``.

    Operator ``X`` has a hidden constant ``c_X`` in 1..9 and ``counts[X]`` training examples
    (geometric in ``skew``, so some operators are rare). Queries use operand pairs that no
    training example of the same operator has. Returns ``{"train", "query", "ops"}`` with
    ``ops`` mapping each symbol to its constant and training count.
    """
    if n_ops > len(SYMBOLS):
        raise ValueError(f"synthetic task: n_ops={n_ops} exceeds the {len(SYMBOLS)} operator symbols")
    rng = np.random.default_rng([seed, 7])
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    counts = _op_counts(n_ops, n_train, skew)
    if counts.max() + queries_per_op > len(pairs):
        raise ValueError(f"synthetic task: {counts.max()} training + {queries_per_op} query examples "
                         f"per operator exceed the {len(pairs)} operand pairs; raise max_operand")
    consts = rng.choice(np.arange(1, 10), size=n_ops, replace=n_ops > 9)
    train, query, ops = [], [], {}
    for o in range(n_ops):
        sym, c = SYMBOLS[o], int(consts[o])
        order = rng.permutation(len(pairs))
        ops[sym] = {"const": c, "n_train": int(counts[o])}
        for j, p in enumerate(order[: counts[o] + queries_per_op]):
            a, b = pairs[p]
            ex = {"prompt": f"{a}{sym}{b}=", "response": str(a + b + c), "answer": str(a + b + c),
                  "meta": {"op": sym}}
            (train if j < counts[o] else query).append(ex)
    train = [train[i] for i in rng.permutation(len(train))]
    for i, ex in enumerate(train):
        ex["id"] = i
    for i, ex in enumerate(query):
        ex["id"] = i
    return {"train": train, "query": query, "ops": ops}


def pretrain_corpus(n: int = 3000, *, max_operand: int = 9, seed: int = 0) -> list[dict[str, Any]]:
    """Plain two- and three-term additions (``3+4=`` -> ``7``, ``3+4+2=`` -> ``9``) to pre-train on.

    Three-term additions teach the model the computation every fine-tuning operator is made of,
    so fine-tuning only has to bind an operator symbol to its hidden constant.
    """
    rng = np.random.default_rng([seed, 11])
    out = []
    for i in range(n):
        a, b, c = (int(v) for v in rng.integers(0, max_operand + 1, size=3))
        if rng.random() < 0.3:
            out.append({"id": i, "prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)})
        else:
            out.append({"id": i, "prompt": f"{a}+{b}+{c}=", "response": str(a + b + c),
                        "answer": str(a + b + c)})
    return out


# --- jsonl ------------------------------------------------------------------------------------

def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path, suffix=".jsonl.tmp") as tmp:
        with open(tmp, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path) as fh:
        for ln, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.rstrip("\r\n")))  # without the newline, the column is the error's
            except json.JSONDecodeError as exc:  # whose line number counts within this line only
                raise ValueError(f"{path}:{ln}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                 "fix or remove that line") from exc
    return rows


# --- hub datasets -----------------------------------------------------------------------------

# name -> (hub id, config, split); the paper's sources (Section 4.2, Appendix C).
HUB_SOURCES = {
    "numinamath": ("AI-MO/NuminaMath-CoT", None, "train"),
    "math": ("HuggingFaceH4/MATH-500", None, "test"),
    "autoif": ("Post-training-Data-Flywheel/AutoIF-instruct-61k", None, "train"),
    "ifeval": ("google/IFEval", None, "train"),
}


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _load_rows(name: str, source: str | None) -> list[dict[str, Any]]:
    """Rows of dataset ``name`` from a local file (``source`` a path) or the hub (``source`` an id)."""
    hub_id, cfg, split = HUB_SOURCES[name]
    source = source or hub_id
    local = Path(source)
    if local.suffix in (".jsonl", ".json", ".parquet") or local.exists():
        if not local.exists():
            raise DataUnavailable(f"{name}: local file {local} does not exist")
        if local.suffix == ".jsonl":
            return read_jsonl(local)
        if local.suffix == ".json":
            data = json.loads(local.read_text())
            return data if isinstance(data, list) else data.get("data", data.get("rows", []))
        if local.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(local).to_pylist()
        raise DataUnavailable(f"{name}: {local} is not a .jsonl, .json or .parquet file")
    hint = (f"download it where there is a network (datasets.load_dataset('{source}').to_json(...)) "
            f"and point llm.data.train.source or llm.data.query.source (whichever is '{name}') at "
            "the local .jsonl")
    if _offline():
        raise DataUnavailable(f"{name}: '{source}' is not on disk and the hub is offline "
                              f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); {hint}")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets comes with lm-eval
        raise DataUnavailable(f"{name}: the 'datasets' package is needed to load '{source}' "
                              "from the hub; pip install datasets, or give a local .jsonl path") from exc
    from ..data import NETWORK_TIMEOUT_S, network_timeout

    try:
        with network_timeout():
            ds = datasets.load_dataset(source, cfg, split=split)
    except Exception as exc:  # network errors come in many types
        raise DataUnavailable(f"{name}: could not load '{source}' from the hub "
                              f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}; each network "
                              f"read waits at most {NETWORK_TIMEOUT_S:g} s); {hint}") from exc
    return list(ds)


def _sample(rows: list, n: int, seed: int) -> list:
    if n and n < len(rows):
        idx = np.sort(np.random.default_rng([seed, 13]).choice(len(rows), size=n, replace=False))
        return [rows[i] for i in idx]
    return rows


def _last_user_assistant(messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt, response) of a chat-format row: every turn before the last assistant turn."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    prompt = "\n\n".join(m["content"] for m in messages[:last] if m.get("role") != "system")
    return prompt, messages[last]["content"]


def _convert(name: str, row: dict[str, Any], i: int) -> dict[str, Any]:
    if name == "numinamath":
        sol = row["solution"]
        return {"id": i, "prompt": row["problem"], "response": sol,
                "answer": extract_boxed(sol) or "", "meta": {"source": row.get("source", "")}}
    if name == "math":
        sol = row.get("solution", "")
        ans = row.get("answer") or extract_boxed(sol) or ""
        return {"id": i, "prompt": row["problem"], "response": sol, "answer": ans,
                "meta": {"level": row.get("level", ""), "type": row.get("type", row.get("subject", ""))}}
    if name == "autoif":
        if "messages" in row:
            prompt, resp = _last_user_assistant(row["messages"])
        elif "conversations" in row:  # ShareGPT style: [{"from": "human"|"gpt", "value": ...}]
            roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
            prompt, resp = _last_user_assistant([{"role": roles.get(m.get("from"), m.get("from")),
                                                  "content": m.get("value", "")} for m in row["conversations"]])
        else:
            prompt = row.get("prompt") or row.get("instruction") or row.get("query", "")
            resp = row.get("response") or row.get("output") or row.get("answer", "")
        if not prompt or not resp:
            raise DataUnavailable(f"autoif: row {i} has no prompt/response in a known layout (messages, "
                                  f"conversations, prompt/response, instruction/output); columns: {sorted(row)}")
        return {"id": i, "prompt": prompt, "response": resp, "answer": "", "meta": {}}
    if name == "ifeval":
        return {"id": i, "prompt": row["prompt"], "response": "", "answer": "",
                "meta": {"key": row.get("key", i), "instruction_id_list": list(row["instruction_id_list"]),
                         "kwargs": [dict(k) for k in row["kwargs"]]}}
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(HUB_SOURCES)}")


def load_task(name: str, *, source: str | None = None, n: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """Examples of a hub dataset in the common format, ``n`` sampled with ``seed`` (0 = all).

    Args:
        name: ``numinamath``, ``math``, ``autoif`` or ``ifeval``.
        source: a hub id (default: the paper's, :data:`HUB_SOURCES`) or a local file path.
        n: number of examples sampled without replacement (0 keeps all, in order).
        seed: sampling seed.
    """
    if name not in HUB_SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(HUB_SOURCES)}")
    rows = _sample(_load_rows(name, source), n, seed)
    out = [_convert(name, r, i) for i, r in enumerate(rows)]
    if name in ("numinamath", "math"):
        out = [ex for ex in out if ex["answer"]] if name == "math" else out
    return out


# --- answer checking: MATH (math-evaluation-harness) ------------------------------------------

def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:  # "\boxed 5"
        m = re.match(r"\\boxed\s+([^\s$]+)", text[idx:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


def extract_math_answer(text: str) -> str:
    """The harness's CoT extraction: the last boxed answer, else after "answer is", else the last number."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"answer is[:\s]*\$?([^\n$]+)", text, flags=re.IGNORECASE)
    if m:
        return m[-1].strip().rstrip(".")
    nums = re.findall(r"-?\d+(?:\.\d+)?(?:/\d+)?", text.replace(",", ""))
    return nums[-1] if nums else ""


def _fix_fracs(s: str) -> str:
    subs = s.split("\\frac")
    out = subs[0]
    for sub in subs[1:]:
        out += "\\frac"
        if sub and sub[0] == "{":
            out += sub
        elif len(sub) >= 2:
            a, b = sub[0], sub[1]
            if b != "{":
                out += "{" + a + "}{" + b + "}" + sub[2:]
            else:
                out += "{" + a + "}" + b + sub[2:]
        else:
            out += sub
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)


_UNIT_WORDS = ["degrees", "degree", "cm", "centimeters", "meters", "inches", "inch", "feet", "units",
               "unit", "square", "sq", "dollars", "cents", "mph", "hours", "minutes", "seconds", "days"]


def strip_math_string(s: str) -> str:
    """Normalise a MATH answer as math-evaluation-harness's ``strip_string`` does.

    A re-implementation (the harness is not a package): line breaks, ``\\!``, ``\\left``/``\\right``,
    ``tfrac``/``dfrac``, degrees, dollars, units in ``\\text{}``, percent signs, trailing periods,
    ``x =`` prefixes, leading zeros of decimals, ``\\frac12`` and ``a/b`` forms, ``\\sqrt3``, spaces,
    and a trailing ``.0``.
    """
    s = str(s).strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s).replace("\\end{array}", "\\end{pmatrix}")
    s = s.replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", s)
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    for w in _UNIT_WORDS:
        s = re.sub(rf"(\d)\s*{w}(\^2|\^3)?\b", r"\1", s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if re.fullmatch(r"[a-zA-Z]\s*=.*", s) or re.fullmatch(r"\\[a-zA-Z]+\s*=.*", s):
        s = s.split("=", 1)[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    s = _fix_a_slash_b(s)
    s = re.sub(r"(\d+)\.0+$", r"\1", s)
    s = re.sub(r"^0+(\d)", r"\1", s)
    if re.fullmatch(r"-?[\d,]+", s) and "," in s and all(len(p) == 3 for p in s.lstrip("-").split(",")[1:]):
        s = s.replace(",", "")  # thousands separators
    return s


def _to_float(s: str) -> float | None:
    s = s.replace(",", "")
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if m:
            return float(m.group(1)) / float(m.group(2))
        m = re.fullmatch(r"-\\frac\{([\d.]+)\}\{([\d.]+)\}", s)
        if m:
            return -float(m.group(1)) / float(m.group(2))
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def _symbolic_equal(a: str, b: str) -> bool:
    """Symbolic equality through sympy's LaTeX parser where it is available (as the harness does)."""
    import warnings

    try:
        from sympy import simplify
        from sympy.parsing.latex import parse_latex
    except Exception:
        return False
    try:
        with warnings.catch_warnings():  # sympy warns when its LaTeX parser (antlr4) is missing
            warnings.simplefilter("ignore")
            return bool(simplify(parse_latex(a) - parse_latex(b)) == 0)
    except Exception:
        return False


def math_equal(pred: str, ref: str, *, rel_tol: float = 1e-4, symbolic: bool = True) -> bool:
    """The harness's ``math_equal``: normalised string match, numeric match (also x100 for
    percentages), element-wise match of tuples/intervals, then symbolic equality."""
    a, b = strip_math_string(pred), strip_math_string(ref)
    if a == b:
        return True
    fa, fb = _to_float(a), _to_float(b)
    if fa is not None and fb is not None:
        return any(abs(fa - x) <= rel_tol * max(1.0, abs(x)) for x in (fb, fb * 100, fb / 100))
    if a[:1] in "([" and b[:1] in "([" and a[-1:] in ")]" and b[-1:] in ")]":  # tuples and intervals
        pa, pb = a[1:-1].split(","), b[1:-1].split(",")
        if len(pa) == len(pb) and len(pa) > 1 and a[0] == b[0] and a[-1] == b[-1]:
            return all(math_equal(x, y, rel_tol=rel_tol, symbolic=symbolic) for x, y in zip(pa, pb))
    return symbolic and _symbolic_equal(a, b)


# --- answer checking: IFEval (lm-evaluation-harness's checkers) -------------------------------

def _ensure_punkt() -> None:
    """IFEval's sentence counts need NLTK's ``punkt_tab``; fetch it once, or say how to."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return
    except LookupError:
        pass
    if not _offline():
        from ..data import network_timeout

        with network_timeout():
            nltk.download("punkt_tab", quiet=True)
        try:
            nltk.data.find("tokenizers/punkt_tab")
            return
        except LookupError:
            pass
    raise DataUnavailable("ifeval: NLTK's 'punkt_tab' tokenizer data is missing (IFEval's sentence "
                          "checks need it); run python -m nltk.downloader punkt_tab where there is a "
                          "network and copy nltk_data here (or set NLTK_DATA)")


def ifeval_follows(meta: dict[str, Any], prompt: str, response: str) -> bool:
    """IFEval strict accuracy of one response: every instruction followed (lm_eval's checkers)."""
    try:
        from lm_eval.tasks.ifeval import utils as ifeval_utils
    except ImportError as exc:
        raise ImportError("IFEval checking uses lm-evaluation-harness's checkers: "
                          "pip install 'lm-eval[ifeval]'") from exc
    ids = meta["instruction_id_list"]
    if any(i.startswith("length_constraints:number_sentences") for i in ids):
        _ensure_punkt()
    inp = ifeval_utils.InputExample(key=meta.get("key", 0), instruction_id_list=ids, prompt=prompt,
                                    kwargs=meta["kwargs"])
    return bool(ifeval_utils.test_instruction_following_strict(inp, response).follow_all_instructions)


# --- one entry point --------------------------------------------------------------------------

def _first_integer(text: str) -> str | None:
    m = re.match(r"\s*(-?\d+)", text)
    return m.group(1) if m else None


def check_answer(task: str, example: dict[str, Any], response: str) -> bool:
    """Is ``response`` (the generated continuation of ``example["prompt"]``) correct?

    ``synthetic``: the integer the response starts with equals the answer; ``math``/``numinamath``:
    :func:`math_equal` of the extracted answer; ``ifeval``/``autoif``: IFEval strict accuracy.
    """
    if task == "synthetic":
        return _first_integer(response) == str(example["answer"])
    if task in ("math", "numinamath"):
        return math_equal(extract_math_answer(response), str(example["answer"]))
    if task in ("ifeval", "autoif"):
        return ifeval_follows(example["meta"], example["prompt"], response)
    raise ValueError(f"no answer checker for task {task!r}; use synthetic, math or ifeval")
