"""Compare two results trees of the workflow array by array.

``compare_runs.py A/results B/results [--map old=new ...]`` walks both trees and compares every
HDF5 dataset and attribute (h5py), npz array, safetensors tensor, torch checkpoint tensor, JSON /
JSONL / YAML value, CSV cell and Markdown table cell (numbers parsed, compared exactly; NaN equals
NaN). It prints one line per file: identical, differs (the dataset or key, the largest absolute
difference and how many elements differ) or missing on one side, then the classes of content it
ignored as run-specific with their counts. Exit status: 0 when every compared file is identical
and none is missing, 1 otherwise, 2 on bad arguments.

``--map old=new`` (paths relative to the results roots; repeatable) compares A's ``old`` (a file
or a folder) with B's ``new``, for outputs that moved between the runs; the same rewrite is
applied to ``results/old`` inside A's strings (attributes, JSON values) so recorded paths match.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Each class of run-specific content the comparison leaves out: (name, what, why).
IGNORED = [
    ("logs", "any file under a logs/ folder", "process output: timings, PIDs, progress"),
    ("benchmark-tsv", "*.tsv under a benchmarks/ folder", "Snakemake benchmark: timings and memory"),
    ("report-html", "report.html", "Snakemake report: embeds timings and run dates"),
    ("pdf-bytes", "*.pdf (checked present on both sides only)",
     "matplotlib writes the creation date into the bytes"),
    ("snakemake-timestamp", ".snakemake_timestamp", "Snakemake's marker of a directory output"),
    ("timing-keys", "JSON keys and HDF5 attributes named *_at, estimated_finish, seconds*, "
     "*_seconds, wall*, elapsed*",
     "wall-clock timestamps and durations"),
    ("cost-timings", "in cost*.md: table columns whose header names a time or RSS, numbers "
     "followed by ' s' and 'N MB ... RSS' in its text",
     "wall time, CPU time and memory of the run's jobs"),
    ("poll-counts", "'GET /v1/fine_tuning/jobs/{id}' in the local fine-tuning server's stats.json",
     "how often the client polled a job depends on timing"),
    ("absolute-paths", "absolute path prefixes before 'results/' in strings",
     "where the run's checkout lay"),
    ("random-ids", "file-<24 hex>, ftjob-<24 hex> (in file names and strings) and the 8-hex job "
     "suffix of a fine-tuned model name",
     "the local fine-tuning server draws them at random; files under such names are paired by "
     "content"),
]

TIMING_KEY = re.compile(r"(_at$|^estimated_finish$|^seconds|_seconds$|^wall|^elapsed)")
POLL_KEYS = {"GET /v1/fine_tuning/jobs/{id}"}
RANDOM_ID = re.compile(r"\b(file|ftjob)-[0-9a-f]{24}\b")
MODEL_SUFFIX = re.compile(r"(daunce-local:[0-9a-f]{6}-[\w.-]+?):[0-9a-f]{8}\b")
ABS_PREFIX = re.compile(r"(?<![\w.<>])/[^\s\"',;:]*?/(?=results/)")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|\bnan\b|[-+]?\binf\b", re.I)
COST_TIME_COL = re.compile(r"time|rss|\(s\)", re.I)
COST_TEXT = re.compile(r"[-+]?\d+(?:\.\d+)?\s*s\b|\d+(?:\.\d+)?\s*[kMG]B(?:\s+peak)?\s+RSS")


@dataclass
class Diff:
    """What differs inside one file: the first differences and the largest absolute one."""
    items: list[str] = field(default_factory=list)
    max_abs: float = 0.0
    n: int = 0
    ignored: dict[str, int] = field(default_factory=dict)

    def add(self, where: str, what: str, abs_diff: float | None = None) -> None:
        self.n += 1
        if abs_diff is not None and not math.isnan(abs_diff):
            self.max_abs = max(self.max_abs, abs_diff)
        if len(self.items) < 5:
            self.items.append(f"{where}: {what}")

    def ignore(self, cls: str) -> None:
        self.ignored[cls] = self.ignored.get(cls, 0) + 1


class Normaliser:
    """Rewrites the run-specific parts of strings so two runs' strings can be compared."""

    def __init__(self, maps: list[tuple[str, str]], side_a: bool):
        self.maps = maps if side_a else []

    def __call__(self, s: str, diff: Diff) -> str:
        t = s
        for old, new in self.maps:
            t = re.sub(rf"results/{re.escape(old)}(?![\w.-])", lambda _m, n=new: f"results/{n}", t)
        for rx, sub in ((RANDOM_ID, r"\1-<id>"), (MODEL_SUFFIX, r"\1:<id>"), (ABS_PREFIX, "<abs>/")):
            t2 = rx.sub(sub, t)
            if t2 != t:
                diff.ignore({RANDOM_ID: "random-ids", MODEL_SUFFIX: "random-ids",
                             ABS_PREFIX: "absolute-paths"}[rx])
            t = t2
        return t


def compare_arrays(a, b, where: str, diff: Diff) -> None:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        diff.add(where, f"shape {a.shape} vs {b.shape}")
        return
    if a.dtype != b.dtype:
        diff.add(where, f"dtype {a.dtype} vs {b.dtype}")
        return
    if a.dtype.kind in "fc":
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        if not same.all():
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.abs(a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)
                           - b.astype(np.complex128 if a.dtype.kind == "c" else np.float64))
            d = d[~same]
            m = float(np.nanmax(d)) if np.isfinite(d).any() or np.isinf(d).any() else float("nan")
            diff.add(where, f"{int((~same).sum())} of {a.size} elements differ, max |diff| {m:.3g}", m)
    elif a.dtype.kind in "iub":
        if not np.array_equal(a, b):
            ne = a != b
            m = float(np.max(np.abs(a[ne].astype(np.float64) - b[ne].astype(np.float64))))
            diff.add(where, f"{int(ne.sum())} of {a.size} elements differ, max |diff| {m:.3g}", m)
    elif not np.array_equal(a, b):
        diff.add(where, f"{int(np.sum(a != b))} of {a.size} elements differ")


def compare_values(a, b, where: str, diff: Diff, norm_a: Normaliser, norm_b: Normaliser) -> None:
    """Nested comparison of parsed JSON-like values (dicts, lists, numbers, strings, arrays)."""
    if isinstance(a, dict) and isinstance(b, dict):
        ka = {norm_a(str(x), Diff()): x for x in a}
        kb = {norm_b(str(x), Diff()): x for x in b}
        for k in sorted(set(ka) | set(kb)):
            sub = f"{where}/{k}"
            last = re.split(r"[/@]", k)[-1]
            if TIMING_KEY.search(last):
                diff.ignore("timing-keys")
                continue
            if k in POLL_KEYS:
                diff.ignore("poll-counts")
                continue
            if k not in ka or k not in kb:
                diff.add(sub, "only in " + ("A" if k in ka else "B"))
                continue
            compare_values(a[ka[k]], b[kb[k]], sub, diff, norm_a, norm_b)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            diff.add(where, f"length {len(a)} vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            compare_values(x, y, f"{where}[{i}]", diff, norm_a, norm_b)
        return
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or _is_tensor(a) or _is_tensor(b):
        compare_arrays(_to_numpy(a), _to_numpy(b), where, diff)
        return
    if isinstance(a, bytes):
        a = a.decode("utf-8", "replace")
    if isinstance(b, bytes):
        b = b.decode("utf-8", "replace")
    if isinstance(a, str) and isinstance(b, str):
        ja, jb = _maybe_json(a), _maybe_json(b)
        if ja is not None and jb is not None:
            compare_values(ja, jb, where, diff, norm_a, norm_b)
            return
        na, nb = norm_a(a, diff), norm_b(b, diff)
        if na != nb:
            la, lb = na.splitlines(), nb.splitlines()
            i = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
            x, y = (la[i] if i < len(la) else "<end>"), (lb[i] if i < len(lb) else "<end>")
            j = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            at = f" (line {i + 1})" if len(la) > 1 or len(lb) > 1 else ""
            diff.add(where + at, f"{_short(x[max(0, j - 20):])!r} vs {_short(y[max(0, j - 20):])!r}")
        return
    if _is_number(a) and _is_number(b):
        fa, fb = float(a), float(b)
        same = fa == fb or (math.isnan(fa) and math.isnan(fb))
        if not same or isinstance(a, (bool, np.bool_)) != isinstance(b, (bool, np.bool_)):
            diff.add(where, f"{a!r} vs {b!r}", abs(fa - fb))
        return
    if a != b:
        diff.add(where, f"{_short(repr(a))} vs {_short(repr(b))}")


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating, np.bool_)) and not isinstance(x, str)


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_numpy(x):
    if _is_tensor(x):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import torch

            x = x.to(torch.float32)  # exact: every bfloat16 is a float32
        return x.numpy()
    return np.asarray(x)


def _maybe_json(s: str):
    s2 = s.strip()
    if s2[:1] in "{[" and s2[-1:] in "}]":
        try:
            return json.loads(s2)
        except ValueError:
            return None
    return None


def _parse_cell(s: str):
    try:
        return float(s) if NUMBER.fullmatch(s.strip() or "x") else s
    except ValueError:
        return s


# ----- per-format readers: each returns a comparable nested value ---------------------------


def read_h5(path: Path):
    import h5py

    out = {}
    with h5py.File(path, "r") as h:
        def attrs(obj, name):
            for k, v in obj.attrs.items():
                out[f"{name}@{k}"] = v.tolist() if isinstance(v, np.ndarray) and v.dtype.kind == "O" else v

        attrs(h, "")

        def visit(name, obj):
            attrs(obj, name)
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        h.visititems(visit)
    return out


def read_npz(path: Path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_safetensors(path: Path):
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def read_pt(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_json(path: Path):
    return json.loads(path.read_text())


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())


def read_csv(path: Path):
    rows = list(csv.reader(io.StringIO(path.read_text())))
    return [[_parse_cell(c) for c in r] for r in rows]


def read_text_tokens(path: Path, diff: Diff):
    """Text as (words, numbers); cost*.md loses its timing columns and timing numbers first."""
    text = path.read_text()
    if path.name.startswith("cost") and path.suffix == ".md":
        text = _strip_cost_timings(text, diff)
    words = NUMBER.sub("#", text)
    nums = [float(m) for m in NUMBER.findall(text)]
    return {"text": words, "numbers": np.array(nums, dtype=np.float64)}


def _strip_cost_timings(text: str, diff: Diff) -> str:
    out, drop = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            if not set(line.replace("|", "").strip()) <= set("-: "):
                if not drop or not out or not out[-1].startswith("|"):
                    drop = [i for i, c in enumerate(cells) if COST_TIME_COL.search(c)] \
                        if any(COST_TIME_COL.search(c) for c in cells) else []
            for i in drop:
                if i < len(cells):
                    cells[i] = "<timing>"
                    diff.ignore("cost-timings")
            line = "|" + "|".join(cells) + "|"
        else:
            drop = []
        n = len(COST_TEXT.findall(line))
        if n:
            for _ in range(n):
                diff.ignore("cost-timings")
            line = COST_TEXT.sub("<timing>", line)
        out.append(line)
    return "\n".join(out)


READERS = {".h5": read_h5, ".hdf5": read_h5, ".npz": read_npz, ".safetensors": read_safetensors,
           ".pt": read_pt, ".json": read_json, ".jsonl": read_jsonl, ".yaml": read_yaml,
           ".yml": read_yaml, ".csv": read_csv}
TEXT = {".md", ".txt", ".tex"}


def ignored_class(rel: str) -> str | None:
    parts = rel.split("/")
    name = parts[-1]
    if "logs" in parts[:-1]:
        return "logs"
    if name.endswith(".tsv") and "benchmarks" in parts[:-1]:
        return "benchmark-tsv"
    if name == "report.html":
        return "report-html"
    if name == ".snakemake_timestamp":
        return "snakemake-timestamp"
    return None


def compare_file(pa: Path, pb: Path, norm_a: Normaliser, norm_b: Normaliser) -> Diff:
    diff = Diff()
    suf = pa.suffix.lower()
    if suf == ".pdf":
        diff.ignore("pdf-bytes")
        return diff
    try:
        if suf in READERS:
            va, vb = READERS[suf](pa), READERS[suf](pb)
        elif suf in TEXT:
            va, vb = read_text_tokens(pa, diff), read_text_tokens(pb, Diff())
        else:
            ba, bb = pa.read_bytes(), pb.read_bytes()
            if ba != bb:
                try:
                    va, vb = ba.decode(), bb.decode()
                except UnicodeDecodeError:
                    diff.add("bytes", f"{len(ba)} vs {len(bb)} bytes, contents differ")
                    return diff
            else:
                return diff
    except Exception as e:  # noqa: BLE001 - an unreadable file is a difference, reported as such
        diff.add("read", f"{type(e).__name__}: {e}")
        return diff
    compare_values(va, vb, "", diff, norm_a, norm_b)
    return diff


def list_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or
                  (p.is_symlink() and not p.is_dir()))


def apply_map(rel: str, maps: list[tuple[str, str]]) -> str:
    for old, new in maps:
        if rel == old or rel.startswith(old.rstrip("/") + "/"):
            return new.rstrip("/") + rel[len(old.rstrip("/")):]
    return rel


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def pair_files(root_a: Path, root_b: Path, maps: list[tuple[str, str]]):
    """Yield (key, path_a or None, path_b or None, ignored class or None)."""
    groups: dict[str, tuple[list[Path], list[Path]]] = {}
    for side, root in ((0, root_a), (1, root_b)):
        for rel in list_files(root):
            key = apply_map(rel, maps) if side == 0 else rel
            key = RANDOM_ID.sub(r"\1-<id>", key)
            groups.setdefault(key, ([], []))[side].append(root / rel)
    for key in sorted(groups):
        la, lb = groups[key]
        cls = ignored_class(key)
        if len(la) <= 1 and len(lb) <= 1:
            yield key, la[0] if la else None, lb[0] if lb else None, cls
            continue
        # files named by random ids: pair identical contents, then the rest in digest order
        da = sorted((_digest(p), p) for p in la)
        db = sorted((_digest(p), p) for p in lb)
        hb = {}
        for d, p in db:
            hb.setdefault(d, []).append(p)
        rest_a = []
        for d, p in da:
            if hb.get(d):
                yield key, p, hb[d].pop(0), cls
            else:
                rest_a.append(p)
        rest_b = [p for d in sorted(hb) for p in hb[d]]
        for i in range(max(len(rest_a), len(rest_b))):
            yield (key, rest_a[i] if i < len(rest_a) else None,
                   rest_b[i] if i < len(rest_b) else None, cls)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Ignored as run-specific:\n" + "\n".join(
            f"  {n}: {what} ({why})" for n, what, why in IGNORED),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="first results tree (e.g. before/results)")
    ap.add_argument("b", type=Path, help="second results tree (e.g. after/results)")
    ap.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                    help="compare A's OLD (file or folder, relative to A) with B's NEW")
    ap.add_argument("--quiet", action="store_true", help="print only files that differ or are missing")
    args = ap.parse_args(argv)
    for root in (args.a, args.b):
        if not root.is_dir():
            print(f"compare_runs: {root} is not a directory; pass two results trees", file=sys.stderr)
            return 2
    maps = []
    for m in args.map:
        if "=" not in m:
            print(f"compare_runs: --map {m!r}: expected OLD=NEW (paths relative to the results roots)",
                  file=sys.stderr)
            return 2
        old, new = m.split("=", 1)
        maps.append((old.strip("/"), new.strip("/")))
    norm_a, norm_b = Normaliser(maps, True), Normaliser(maps, False)
    counts = {"identical": 0, "differs": 0, "missing": 0}
    ignored: dict[str, int] = {}
    for key, pa, pb, cls in pair_files(args.a, args.b, maps):
        if pa is None or pb is None:
            if cls:
                ignored[cls] = ignored.get(cls, 0) + 1
                continue
            counts["missing"] += 1
            side = "B" if pa is None else "A"
            print(f"MISSING  {key}: only in {side} ({pa or pb})")
            continue
        if cls:
            ignored[cls] = ignored.get(cls, 0) + 1
            continue
        d = compare_file(pa, pb, norm_a, norm_b)
        for c, n in d.ignored.items():
            ignored[c] = ignored.get(c, 0) + n
        if d.n:
            counts["differs"] += 1
            mx = f", max |diff| {d.max_abs:.3g}" if d.max_abs else ""
            print(f"DIFFERS  {key}: {d.n} difference(s){mx}")
            for it in d.items:
                print(f"           {it}")
        else:
            counts["identical"] += 1
            if not args.quiet:
                print(f"same     {key}" + (" (pdf: present on both sides; bytes not compared)"
                                           if pa.suffix == ".pdf" else ""))
    print(f"\n{counts['identical']} identical, {counts['differs']} differ, {counts['missing']} missing "
          "on one side")
    print("Ignored as run-specific (class: count):")
    for n, what, _ in IGNORED:
        print(f"  {n}: {ignored.get(n, 0)}  -- {what}")
    return 0 if counts["differs"] == 0 and counts["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
