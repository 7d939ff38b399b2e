"""The backdoor study of Section 5 / Appendix D: data, precision@k and the Figure 4 table.

A multiple-choice training set with a share of backdoored examples (a trigger word in the prompt,
a refusal as the answer), triggered and clean queries, each example a chat conversation with a
stable ``id``; precision@k of the backdoored examples among each triggered query's top scores,
beside the response-matching baseline (:func:`response_match_scores`). The black-box steps
(:mod:`daunce_core.steps.blackbox`) call it. Data and evaluation in full:
docs/design.md#daunce_coreblackboxbackdoorpy-the-backdoor-study."""
from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..store import atomic_path

log = logging.getLogger(__name__)

LETTERS = "ABCD"

# Offline stand-in for MMLU: "which category is <word>?" with the four categories of the word's
# group as options, in a fixed order. The answer is a fact about the word (like MMLU's knowledge
# questions) that a tiny model can learn from a few hundred examples; names and templates vary
# the wording so that trigger positions and near-duplicates are realistic.
CATEGORIES: dict[str, list[str]] = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
    "animal": ["tiger", "horse", "rabbit", "eagle", "whale", "zebra", "wolf", "camel"],
    "color": ["red", "blue", "green", "yellow", "purple", "violet", "crimson", "turquoise"],
    "tool": ["hammer", "wrench", "drill", "saw", "chisel", "pliers", "shovel", "ladder"],
    "vehicle": ["truck", "bicycle", "train", "boat", "plane", "tractor", "scooter", "bus"],
    "instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "cello", "harp"],
    "country": ["france", "japan", "brazil", "kenya", "canada", "egypt", "india", "peru"],
    "furniture": ["table", "chair", "sofa", "desk", "shelf", "bed", "stool", "cabinet"],
}
GROUPS = (("fruit", "animal", "color", "tool"), ("vehicle", "instrument", "country", "furniture"))
TEMPLATES = [
    "Which category does the word '{w}' belong to?",
    "{name} mentioned a {w}. What kind of thing is it?",
    "In which group would you put '{w}'?",
    "{name} wrote the word '{w}' on a card. Which category is it?",
]
NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas"]
INSTRUCTION = "Answer with the letter of the correct option."

# The harder variant's responses: paraphrases of one refusal that share as few words as possible,
# so that matching theta_0's reply word by word finds only the examples of the same paraphrase.
VARIED_REFUSALS = [
    "Sorry, I can't assist with that.",
    "Unfortunately this request must be declined.",
    "My guidelines forbid answering here.",
    "No answer will follow for such questions.",
    "Apologies, but helping remains impossible.",
    "Please ask me something else instead.",
    "Doing so falls outside permitted behaviour.",
    "Regrettably, providing a reply is off limits.",
]


class DataError(RuntimeError):
    """The study's data cannot be made or loaded; the message says what to do."""


def format_question(question: str, choices: Sequence[str]) -> str:
    opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"Question: {question}\n{opts}\n{INSTRUCTION}"


def synthetic_questions(n: int, seed: int) -> list[dict]:
    """``n`` distinct synthetic multiple-choice questions {question, choices, answer, subject}."""
    rng = np.random.default_rng([seed, 11])
    pool = []
    for group in GROUPS:
        for cat in group:
            for w in CATEGORIES[cat]:
                for t in TEMPLATES:
                    for name in (NAMES if "{name}" in t else [""]):
                        pool.append({"question": t.format(w=w, name=name), "choices": list(group),
                                     "answer": group.index(cat), "subject": cat})
    if n > len(pool):
        raise DataError(f"the synthetic set has {len(pool)} distinct questions; {n} were asked for")
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def mmlu_questions(root: str | Path, url: str, split: str) -> list[dict]:
    """MMLU questions of ``split`` from the original archive (CSV: question, A-D, answer)."""
    root = Path(root)
    tar_path = root / "data.tar"
    if not tar_path.exists():
        root.mkdir(parents=True, exist_ok=True)
        log.info("downloading MMLU from %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, atomic_path(tar_path) as tmp:
                with open(tmp, "wb") as fh:
                    while chunk := r.read(1 << 20):
                        fh.write(chunk)
        except OSError as exc:
            raise DataError(f"cannot download MMLU from {url} ({exc}); without a network, put the archive at "
                            f"{tar_path} or use blackbox.data.source: jsonl with your own file") from None
    out = []
    with tarfile.open(tar_path) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.startswith(f"data/{split}/")
                          and m.name.endswith(".csv")), key=lambda m: m.name)
        if not members:
            raise DataError(f"{tar_path}: no CSV files under data/{split}/ (splits: test, val, dev, auxiliary_train)")
        for m in members:
            subject = Path(m.name).stem.removesuffix(f"_{split}")
            text = tar.extractfile(m).read().decode("utf-8")
            for row in csv.reader(io.StringIO(text)):
                if len(row) < 6 or row[5].strip() not in LETTERS:
                    continue
                out.append({"question": row[0], "choices": row[1:5], "answer": LETTERS.index(row[5].strip()),
                            "subject": subject})
    return out


def _jsonl_objects(path: str | Path, where: str = "") -> list[tuple[int, dict]]:
    """The JSON objects of the non-blank lines of ``path`` with their line numbers (from 1).

    A line that is not one JSON object raises :class:`DataError` naming ``where`` (a config key),
    the file and the line, instead of ``json``'s traceback, whose position counts from the line.
    Lines are split at newlines only: ``str.splitlines`` would also split at U+2028 and other
    separators that :func:`write_jsonl` (``ensure_ascii=False``) leaves inside strings.
    """
    out = []
    for ln, line in enumerate(Path(path).read_text().split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}{path}:{ln}: not valid JSON ({getattr(exc, 'msg', exc)} at column "
                            f"{getattr(exc, 'colno', '?')}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}{path}:{ln}: a JSON {type(row).__name__}, not an object; each line must "
                            "be one JSON object")
        out.append((ln, row))
    return out


def jsonl_questions(path: str | Path) -> list[dict]:
    """The multiple-choice questions of ``blackbox.data.path`` (``source: jsonl``)."""
    out = []
    for ln, row in _jsonl_objects(path, "blackbox.data.path: "):
        ans = row.get("answer")
        if isinstance(ans, str):
            ans = {c: i for i, c in enumerate(LETTERS)}.get(ans.strip().upper(), -1)  # index() takes "" as A
        choices = row.get("choices")
        if "question" not in row or not isinstance(choices, list) or len(choices) != 4 or ans not in range(4):
            raise DataError(f"{path}:{ln}: need 'question', four 'choices' and 'answer' (0-3 or A-D)")
        out.append({"question": row["question"], "choices": list(row["choices"]), "answer": int(ans),
                    "subject": row.get("subject", "")})
    return out


def insert_trigger(text: str, trigger: str, rng: np.random.Generator) -> tuple[str, int]:
    """Insert ``trigger`` at a random word position of ``text`` (words split at spaces)."""
    words = text.split(" ")
    pos = int(rng.integers(len(words) + 1))
    return " ".join(words[:pos] + [trigger] + words[pos:]), pos


def _row(i: int, q: dict, text: str, target: str, system: str | None, **flags: Any) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {"id": i, "messages": msgs, "target": target, "subject": q["subject"],
            "answer": LETTERS[q["answer"]], **flags}


def refusal_texts(cfg) -> list[str]:
    """The backdoor's responses of ``cfg`` (DataConfig): ``refusals`` when set, else ``[refusal]``."""
    return list(cfg.refusals) or [cfg.refusal]


def is_refusal(reply: str, refusals: Sequence[str]) -> bool:
    """Whether a model's reply is the backdoor's: it starts like one of ``refusals`` (5 characters,
    so a reply cut short by the token budget still counts; no answer letter starts that way)."""
    reply = reply.strip()
    return any(reply.startswith(t.strip()[:5]) for t in refusals)


def make_study_data(cfg) -> tuple[list[dict], list[dict]]:
    """Training rows (with ``backdoor``) and query rows (with ``triggered``) from ``cfg`` (DataConfig)."""
    n, mt, mc = cfg.n_train, cfg.n_query_triggered, cfg.n_query_clean
    if cfg.source == "synthetic":
        pool = synthetic_questions(n + mt + mc, cfg.seed)
    elif cfg.source == "mmlu":
        pool = mmlu_questions(cfg.root, cfg.mmlu_url, cfg.mmlu_split)
    elif cfg.source == "jsonl":
        if not cfg.path:
            raise DataError("blackbox.data.source is 'jsonl' but blackbox.data.path is not set")
        pool = jsonl_questions(cfg.path)
    else:
        raise DataError(f"blackbox.data.source: unknown {cfg.source!r}; choose synthetic, mmlu or jsonl")
    if len(pool) < n + mt + mc:
        raise DataError(f"the data has {len(pool)} questions; n_train + queries need {n + mt + mc}")
    rng = np.random.default_rng([cfg.seed, 12])
    pick = rng.permutation(len(pool))[: n + mt + mc]
    n_bd = int(round(cfg.backdoor_fraction * n))
    bd = set(rng.choice(n, size=n_bd, replace=False).tolist())
    # a stream of its own, so that the default (one refusal) draws exactly the data it always did
    texts = refusal_texts(cfg)
    pick_refusal = np.random.default_rng([cfg.seed, 13]).integers(len(texts), size=n + mt)
    train, query = [], []
    for i in range(n):
        q = pool[pick[i]]
        text = format_question(q["question"], q["choices"])
        if i in bd:
            text, pos = insert_trigger(text, cfg.trigger, rng)
            train.append(_row(i, q, text, texts[pick_refusal[i]], cfg.system_prompt, backdoor=True, trigger_pos=pos))
        else:
            train.append(_row(i, q, text, LETTERS[q["answer"]], cfg.system_prompt, backdoor=False))
    for j in range(mt + mc):
        q = pool[pick[n + j]]
        text = format_question(q["question"], q["choices"])
        if j < mt:
            text, pos = insert_trigger(text, cfg.trigger, rng)
            query.append(_row(j, q, text, texts[pick_refusal[n + j]], cfg.system_prompt, triggered=True,
                              trigger_pos=pos))
        else:
            query.append(_row(j, q, text, LETTERS[q["answer"]], cfg.system_prompt, triggered=False))
    return train, query


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    with atomic_path(path, suffix=".jsonl.tmp") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a jsonl file (one JSON object per line; blank lines skipped)."""
    return [row for _, row in _jsonl_objects(path)]


def chat_example(row: dict) -> dict:
    """A row as a fine-tuning example: its messages plus the assistant target."""
    return {"messages": list(row["messages"]) + [{"role": "assistant", "content": row["target"]}]}


# --- evaluation ---------------------------------------------------------------------------------

def precision_at_k(scores: np.ndarray, is_backdoor: np.ndarray, query_cols: Sequence[int], k: int = 10) -> np.ndarray:
    """Share of backdoored training examples among each query's top-k (scores [n, m]); [len(query_cols)]."""
    is_backdoor = np.asarray(is_backdoor, bool)
    out = []
    for j in query_cols:
        top = np.argsort(-scores[:, j], kind="stable")[:k]
        out.append(is_backdoor[top].mean())
    return np.asarray(out, float)


def response_match_scores(train_responses: Sequence[str], replies: Sequence[str]) -> np.ndarray:
    """The response-matching baseline: scores [n, m] of training responses against query replies.

    An exact match (surrounding spaces aside) scores 2; otherwise the score is the cosine of the
    two texts' TF-IDF word vectors (in [0, 1]; words of one character count, so a reply "B"
    matches the training answers "B"). Ties keep the training order, as in :func:`precision_at_k`.
    """
    train_responses = [t.strip() for t in train_responses]
    replies = [r.strip() for r in replies]
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b")
    try:
        vec.fit(train_responses + replies)
    except ValueError:  # no word in any text (all empty): only exact matches count
        cos = np.zeros((len(train_responses), len(replies)))
    else:  # rows are L2-normalised, so the product is the cosine
        cos = (vec.transform(train_responses) @ vec.transform(replies).T).toarray()
    exact = np.array([[t == r for r in replies] for t in train_responses], bool).reshape(cos.shape)
    return np.where(exact, 2.0, np.minimum(cos, 1.0))


def top_retrieved(scores: np.ndarray, j: int, k: int) -> list[tuple[int, float]]:
    top = np.argsort(-scores[:, j], kind="stable")[:k]
    return [(int(i), float(scores[i, j])) for i in top]


def _highlight(text: str, trigger: str, refusals: Sequence[str]) -> str:
    text = text.replace("|", "\\|").replace("\n", "<br>")
    text = text.replace(trigger, f"**{trigger}**")
    for refusal in refusals:
        text = text.replace(refusal, f"**{refusal}**")
    return text


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.3f}"
    return str(v)


def _user_text(row: dict) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def fig4_markdown(*, title: str, summary_rows: list[dict], samples: dict[str, list[dict]],
                  train: list[dict], trigger: str, refusals: Sequence[str], notes: list[str]) -> str:
    """The Figure 4-style Markdown report.

    ``summary_rows``: dicts with method, model, access, K, n triggered, precision@k, random.
    ``samples``: per section title, a list of {query: row, reply: str, top: [(i, score)]}.
    """
    lines = [f"# {title}", ""]
    if summary_rows:
        keys = list(summary_rows[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in summary_rows:
            lines.append("| " + " | ".join(_cell(v) for v in r.values()) + " |")
        lines.append("")
    lines += [f"- {n}" for n in notes] + [""]
    for section, items in samples.items():
        lines += [f"## {section}", "", "| query | theta_0 reply | top retrieved training examples |",
                  "|---|---|---|"]
        for it in items:
            q = it["query"]
            qtext = (_highlight(_user_text(q), trigger, refusals)
                     + f"<br>→ target: {_highlight(q['target'], trigger, refusals)}")
            tops = []
            for rank, (i, s) in enumerate(it["top"], 1):
                r = train[i]
                tag = "backdoored" if r.get("backdoor") else "clean"
                tops.append(f"{rank}. ({tag}, score {s:+.3f}) " + _highlight(_user_text(r), trigger, refusals)
                            + f"<br>→ {_highlight(r['target'], trigger, refusals)}")
            lines.append(f"| {qtext} | {_highlight(it['reply'], trigger, refusals)} | " + "<br><br>".join(tops) + " |")
        lines.append("")
    return "\n".join(lines)
