"""A catalogue of bad inputs against ``daunce score | lds | info``.

Every case runs the command in-process (``daunce_core.cli.main``) in a folder holding a good
losses file, scores file, ground truth and an earlier output, and asserts the exit status, the
message (a substring naming the file, key or option) and that no file changed and none appeared
(hashes before and after), except the output of the few cases that must succeed. A few cases
run through a subprocess for real exit codes; SIGTERM/SIGINT/SIGKILL tests interrupt a scoring.
The file is over 500 lines because the catalogue is one table of cases, easier to read whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from daunce_core import store
from daunce_core.cli import main

from helpers import ROOT

K, N, MQ, M = 6, 30, 4, 12
_rng = np.random.default_rng(11)
_shared = _rng.standard_normal((K, 1))
TRAIN = (_shared * _rng.standard_normal(N) + _rng.standard_normal((K, N))).astype(np.float32)
QUERY = (_shared * _rng.standard_normal(MQ) + _rng.standard_normal((K, MQ))).astype(np.float32)
IDS_T = 1000 + np.arange(N)
IDS_Q = 500 + np.arange(MQ)
_A = _rng.standard_normal((N, MQ))
MASKS = _rng.random((M, N)) < 0.5
OUTPUTS = (MASKS @ _A + 0.3 * _rng.standard_normal((M, MQ)))[None].astype(np.float32)
SCORES = (_A + 0.5 * _rng.standard_normal((N, MQ))).astype(np.float32)

LOSSES = {"train": TRAIN, "query": QUERY, "model_index": np.arange(K), "train_ids": IDS_T,
          "query_ids": IDS_Q}
DENSE = {"scores": SCORES, "train_ids": IDS_T, "query_ids": IDS_Q}
TOPK = {"indices": np.argsort(-SCORES, axis=0)[:3].T.copy(),
        "values": -np.sort(-SCORES, axis=0)[:3].T.copy(), "train_ids": IDS_T, "query_ids": IDS_Q}
GT = {"masks": MASKS, "outputs": OUTPUTS, "mask_index": np.arange(M), "train_ids": IDS_T,
      "query_ids": IDS_Q}

GROUP = object()  # a group where a dataset is expected


def h5file(path: Path, base: dict, attrs: dict | None = None, **override) -> Path:
    """An HDF5 file with ``base``'s datasets, ``override`` replacing them (None drops one)."""
    with h5py.File(path, "w") as f:
        for key, value in {**base, **override}.items():
            if value is None:
                continue
            if value is GROUP:
                f.create_group(key).create_dataset("x", data=np.zeros(3))
            elif isinstance(value, tuple):  # (data, dtype)
                f.create_dataset(key, data=value[0], dtype=value[1])
            else:
                f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def losses(d: Path, name="bad.h5", attrs=None, **kw) -> Path:
    return h5file(d / name, LOSSES, attrs, **kw)


def scores(d: Path, name="bad_s.h5", attrs=None, base=None, **kw) -> Path:
    return h5file(d / name, base or DENSE, {"format": "dense", **(attrs or {})}, **kw)


def topk(d: Path, name="bad_k.h5", **kw) -> Path:
    return h5file(d / name, TOPK, {"format": "topk"}, **kw)


def gt(d: Path, name="bad_g.h5", attrs=None, **kw) -> Path:
    return h5file(d / name, GT, attrs, **kw)


def with_nan(a, where=(0, 3), value=np.nan):
    a = a.astype(np.float32 if a.dtype.kind != "f" else a.dtype, copy=True)
    a[where] = value
    return a


def ragged(*shape) -> np.ndarray:
    """Variable-length rows: an HDF5 vlen dataset, read back as objects."""
    a = np.empty(shape, dtype=object)
    for i in np.ndindex(*shape):
        a[i] = np.zeros(1 + sum(i) % 3)
    return a


def fifo(d: Path, name: str) -> Path:
    os.mkfifo(d / name)
    return d / name


def text(d: Path, name: str, data: bytes) -> Path:
    (d / name).write_bytes(data)
    return d / name


def subdir(d: Path, name: str) -> Path:
    (d / name).mkdir()
    return d / name


def truncated(d: Path) -> Path:
    data = (d / "l.h5").read_bytes()
    return text(d, "trunc.h5", data[: len(data) // 2])


def perm(a, seed=0):
    return np.random.default_rng(seed).permutation(a)


def _permuted_scores(d: Path, axis: str) -> Path:
    """The good scores with their training (or query) examples listed in another order."""
    p = perm(N if axis == "train" else MQ)
    if axis == "train":
        return scores(d, scores=SCORES[p], train_ids=IDS_T[p])
    return scores(d, scores=SCORES[:, p], query_ids=IDS_Q[p])


def _lds_of(out: str) -> float:
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]["lds"]


def _reference_lds(d: Path) -> float:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(["lds", str(d / "s.h5"), str(d / "g.h5"), "--bootstrap", "50"]) == 0
    return _lds_of(buf.getvalue())


def same_lds(d: Path, out: str) -> None:
    assert _lds_of(out) == pytest.approx(_reference_lds(d), abs=1e-12)


def scores_close_to_float32(d: Path, out: str) -> None:
    ref = store.read_scores(d / "ref.h5")["scores"]
    got = store.read_scores(d / "new.h5")
    np.testing.assert_allclose(got["scores"], ref, atol=2e-3)


def positional_marker(d: Path, out: str) -> None:
    s = store.read_scores(d / "new.h5")
    assert s["attrs"]["ids"] == "positional"
    np.testing.assert_array_equal(s["train_ids"], np.arange(N))


def finite_scores(d: Path, out: str) -> None:
    s = store.read_scores(d / "new.h5")["scores"]
    ref = store.read_scores(d / "ref.h5")["scores"]
    np.testing.assert_allclose(s, ref, atol=1e-5)


def mode_follows_umask(d: Path, out: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(d / "new.h5").st_mode) == 0o666 & ~umask


L, S, G, E = "l.h5", "s.h5", "g.h5", "earlier.h5"
NEW = "new.h5"


def _repeat_in_row(row: int, position: int) -> np.ndarray:
    """The good top-k indices with query ``row``'s first and last entries both ``position``."""
    idx = TOPK["indices"].copy()
    idx[row, 0] = idx[row, -1] = position
    return idx


def C(name, code, message, argv, new=(), check=None):
    """A case: ``argv(d)`` gives the command (and makes the files it needs in ``d``)."""
    return pytest.param(argv, code, message, new, check, id=name)


def score(*extra, src=L, out=NEW):
    return lambda d: ["score", str(d / src) if isinstance(src, str) else str(src(d)),
                      "-o", str(d / out) if isinstance(out, str) else str(out(d)), *extra]


def score_bad(make, *extra):
    return lambda d: ["score", str(make(d)), "-o", str(d / NEW), *extra]


def lds(make_s=None, make_g=None, *extra):
    return lambda d: ["lds", str(make_s(d) if make_s else d / S),
                      str(make_g(d) if make_g else d / G), "--bootstrap", "50", *extra]


def info(make):
    return lambda d: ["info", str(make(d))]


def _ref_then(make):
    """Write the good losses' float32 scores to ref.h5 (a reference output), then ``make``."""
    def argv(d):
        from daunce_core.scoring import score_file
        score_file(d / L, d / "ref.h5")
        return ["score", str(make(d)), "-o", str(d / NEW)]
    return argv


CASES = [
    # --- score: outputs that would destroy something, refused before any work -------------
    C("out-is-input", 1, "is the input file", score(out=L)),
    C("out-is-input-via-dotdot", 1, "is the input file",
      score(out=lambda d: subdir(d, "sub") / ".." / L)),
    C("out-is-symlink-to-input", 1, "is the input file",
      score(out=lambda d: (d / "link.h5").symlink_to(d / L) or d / "link.h5")),
    C("out-is-hardlink-to-input", 1, "is the input file",
      score(out=lambda d: os.link(d / L, d / "hard.h5") or d / "hard.h5")),
    C("out-is-existing-directory", 1, "is an existing directory",
      score(out=lambda d: subdir(d, "outdir"))),
    C("out-is-fifo", 1, "device, pipe or socket", score(out=lambda d: fifo(d, "pipe"))),
    C("out-is-dev-null", 1, "/dev/null: is a device, pipe or socket",
      score(out=lambda d: Path("/dev/null"))),
    C("out-parent-is-file", 1, "is a file, not a folder", score(out=lambda d: d / E / "s.h5")),
    C("out-grandparent-is-file", 1, "is a file, not a folder",
      score(out=lambda d: d / E / "x" / "s.h5")),
    C("out-empty", 1, "empty output path", lambda d: ["score", str(d / L), "-o", ""]),
    C("out-earlier-output-kept-on-error", 1, "first ids: 1003",
      lambda d: ["score", str(losses(d, train=with_nan(TRAIN))), "-o", str(d / E)]),
    # --- score: unreadable inputs ---------------------------------------------------------
    C("in-missing", 1, "missing.h5: no such file", score(src="missing.h5")),
    C("in-directory", 1, "is a directory", score(src=lambda d: subdir(d, "indir"))),
    C("in-fifo", 1, "is a device, pipe or socket", score(src=lambda d: fifo(d, "in.h5"))),
    C("in-not-hdf5", 1, "not a readable HDF5 file", score(src=lambda d: text(d, "t.h5", b"x,y\n"))),
    C("in-empty-file", 1, "not a readable HDF5 file", score(src=lambda d: text(d, "e.h5", b""))),
    C("in-truncated", 1, "truncated", score(src=truncated)),
    C("in-diverged-marker", 1, "diverged",
      score(src=lambda d: store.write_diverged(d / "div.h5", {"variant": "daunce"}, "lr too big")
            or d / "div.h5")),
    # --- score: layout, dtypes and values -------------------------------------------------
    C("missing-train", 1, "missing dataset 'train'", score_bad(lambda d: losses(d, train=None))),
    C("missing-query", 1, "missing dataset 'query'", score_bad(lambda d: losses(d, query=None))),
    C("train-is-group", 1, "'train' is a group", score_bad(lambda d: losses(d, train=GROUP))),
    C("train-1d", 1, "'train' has 1 dimensions", score_bad(lambda d: losses(d, train=TRAIN[0]))),
    C("train-byte-strings", 1, "'train' holds strings",
      score_bad(lambda d: losses(d, train=TRAIN.astype("S8")))),
    C("train-vlen-strings", 1, "'train' holds strings",
      score_bad(lambda d: losses(d, train=(TRAIN.astype(str).astype(object),
                                           h5py.string_dtype())))),
    C("train-objects", 1, "'train' holds objects",
      score_bad(lambda d: losses(d, train=(ragged(K, N), h5py.vlen_dtype(np.float64))))),
    C("train-compound", 1, "'train' holds compound",
      score_bad(lambda d: losses(d, train=np.zeros((K, N), dtype=[("a", "f4"), ("b", "i4")])))),
    C("query-complex", 1, "'query' holds complex numbers",
      score_bad(lambda d: losses(d, query=QUERY.astype(np.complex64)))),
    C("k-mismatch", 1, "K=6 models but 'query' has K=5",
      score_bad(lambda d: losses(d, query=QUERY[:5]))),
    C("k-one", 1, "at least K=2", score_bad(lambda d: losses(d, train=TRAIN[:1], query=QUERY[:1]))),
    C("train-ids-wrong-length", 1, "'train_ids' has 29 entries but 'train' has 30",
      score_bad(lambda d: losses(d, train_ids=IDS_T[:29]))),
    C("only-train-ids", 1, "has 'train_ids' but no 'query_ids'",
      score_bad(lambda d: losses(d, query_ids=None))),
    C("only-query-ids", 1, "has 'query_ids' but no 'train_ids'",
      score_bad(lambda d: losses(d, train_ids=None))),
    C("string-ids", 1, "'train_ids' holds strings",
      score_bad(lambda d: losses(d, train_ids=IDS_T.astype("S6")))),
    C("repeated-train-ids", 1, "'train_ids' repeats id 1003 (2 times)",
      score_bad(lambda d: losses(d, train_ids=np.where(IDS_T == 1009, 1003, IDS_T)))),
    C("repeated-query-ids", 1, "'query_ids' repeats id 500",
      score_bad(lambda d: losses(d, query_ids=np.r_[500, IDS_Q[1:-1], 500]))),
    C("uint64-ids-beyond-int64", 1, "'train_ids' holds uint64 value 18446744073709551615, beyond the int64",
      score_bad(lambda d: losses(d, train_ids=np.append(IDS_T[:-1].astype(np.uint64), np.uint64(2**64 - 1))))),
    C("nan-train", 1, "1 training example(s) have NaN or infinite values, first ids: 1003",
      score_bad(lambda d: losses(d, train=with_nan(TRAIN)))),
    C("inf-query", 1, "1 query example(s) have NaN or infinite values, first ids: 502",
      score_bad(lambda d: losses(d, query=with_nan(QUERY, (1, 2), np.inf)))),
    C("covariance-overflow", 1, "beyond float32",
      score_bad(lambda d: losses(d, train=TRAIN * np.float32(1e20), query=QUERY * np.float32(1e20)),
                "--measure", "covariance")),
    C("float64-too-large-to-square", 1, "too large to square in float64",
      score_bad(lambda d: losses(d, train=TRAIN.astype(np.float64) * 1e200))),
    # --- score: output kind and options ----------------------------------------------------
    C("dense-beyond-memory", 1, "need 4.47e-07 GiB but memory_gb (--memory-gb) is 1e-09 GiB; "
      "keep the N best training examples per query with topk=N (--topk N), or raise memory_gb",
      score("--memory-gb", "1e-9")),
    C("topk-beyond-memory", 1, "too small for K=6", score("--topk", "5", "--memory-gb", "0.01")),
    C("memory-nan", 2, "argument --memory-gb: expected a finite number", score("--memory-gb", "nan")),
    C("memory-inf", 2, "argument --memory-gb: expected a finite number", score("--memory-gb", "inf")),
    C("memory-zero", 2, "argument --memory-gb: must be in (0.0, 1048576.0]", score("--memory-gb", "0")),
    C("memory-negative", 2, "argument --memory-gb: must be in (0.0, 1048576.0]", score("--memory-gb", "-1")),
    C("memory-beyond-any-machine", 2, "argument --memory-gb: must be in (0.0, 1048576.0], got '1e308'",
      score("--memory-gb", "1e308")),
    C("memory-text", 2, "argument --memory-gb: expected a number", score("--memory-gb", "lots")),
    C("lambda-without-threshold", 2, "--lambda does nothing with --threshold none",
      score("--lambda", "0.1")),
    C("soft-without-lambda", 2, "--threshold soft needs --lambda", score("--threshold", "soft")),
    C("hard-without-lambda", 2, "--threshold hard needs --lambda", score("--threshold", "hard")),
    C("lambda-negative", 2, "argument --lambda: must be >= 0.0",
      score("--threshold", "soft", "--lambda", "-0.5")),
    C("lambda-nan", 2, "argument --lambda: expected a finite number",
      score("--threshold", "soft", "--lambda", "nan")),
    C("topk-zero", 2, "argument --topk: must be >= 1", score("--topk", "0")),
    C("topk-negative", 2, "argument --topk: must be >= 1", score("--topk", "-5")),
    C("topk-fraction", 2, "argument --topk: expected a whole number", score("--topk", "3.5")),
    C("measure-unknown", 2, "argument --measure: invalid choice", score("--measure", "spearman")),
    C("threshold-unknown", 2, "argument --threshold: invalid choice",
      score("--threshold", "median")),
    C("no-output-option", 2, "the following arguments are required: -o/--output",
      lambda d: ["score", str(d / L)]),
    # --- score: inputs that must work ------------------------------------------------------
    C("float16-losses-upcast", 0, "wrote", _ref_then(
        lambda d: losses(d, train=TRAIN.astype(np.float16), query=QUERY.astype(np.float16))),
      new=(NEW, "ref.h5"), check=scores_close_to_float32),
    C("integer-losses", 0, "wrote", score_bad(
        lambda d: losses(d, train=np.round(TRAIN * 100).astype(np.int32))), new=(NEW,)),
    C("no-ids-positional", 0, "wrote", score_bad(
        lambda d: losses(d, train_ids=None, query_ids=None)), new=(NEW,), check=positional_marker),
    C("no-model-index", 0, "wrote", score_bad(lambda d: losses(d, model_index=None)), new=(NEW,)),
    C("huge-float32-values-correlation", 0, "wrote", _ref_then(
        lambda d: losses(d, train=TRAIN * np.float32(1e30))), new=(NEW, "ref.h5"),
      check=finite_scores),
    C("huge-float64-values-not-called-nan", 0, "wrote", _ref_then(
        lambda d: losses(d, train=TRAIN.astype(np.float64) * 1e100)), new=(NEW, "ref.h5"),
      check=finite_scores),
    C("output-follows-umask", 0, "wrote", score(), new=(NEW,), check=mode_follows_umask),
    # --- lds: joined on ids ----------------------------------------------------------------
    C("lds-permuted-train-ids", 0, "'train_ids' list the examples of",
      lds(lambda d: _permuted_scores(d, "train")), new=("bad_s.h5",), check=same_lds),
    C("lds-permuted-query-ids", 0, "'query_ids' list the examples of",
      lds(lambda d: _permuted_scores(d, "query")), new=("bad_s.h5",), check=same_lds),
    C("lds-permuted-ground-truth", 0, "reordered to match",
      lds(None, lambda d: gt(d, masks=MASKS[:, perm(N)], train_ids=IDS_T[perm(N)])),
      new=("bad_g.h5",), check=same_lds),
    C("lds-other-train-ids", 1, "'train_ids' differ from",
      lds(lambda d: scores(d, train_ids=IDS_T + 1))),
    C("lds-other-query-ids", 1, "'query_ids' differ from",
      lds(lambda d: scores(d, query_ids=IDS_Q + 7))),
    C("lds-fewer-training-examples", 1, "'train_ids' holds 29 ids but",
      lds(lambda d: scores(d, scores=SCORES[:29], train_ids=IDS_T[:29]))),
    C("lds-repeated-ids", 1, "repeats id 1000",
      lds(lambda d: scores(d, train_ids=np.r_[IDS_T[:-1], 1000][::-1].copy()))),
    C("lds-both-positional", 0, "carry no example ids: joined by position",
      lds(lambda d: scores(d, name="ps.h5", train_ids=None, query_ids=None),
          lambda d: gt(d, name="pg.h5", train_ids=None, query_ids=None)),
      new=("ps.h5", "pg.h5")),
    C("lds-positional-against-ids", 1, "carries no example ids",
      lds(lambda d: scores(d, train_ids=None, query_ids=None))),
    # --- lds: values -----------------------------------------------------------------------
    C("lds-nan-scores", 1, "dataset 'scores' holds 1 NaN or infinite value(s)",
      lds(lambda d: scores(d, scores=with_nan(SCORES)))),
    C("lds-inf-scores", 1, "dataset 'scores' holds 1 NaN or infinite value(s)",
      lds(lambda d: scores(d, scores=with_nan(SCORES, (2, 1), -np.inf)))),
    C("lds-nan-ground-truth", 1, "query example(s) have NaN or infinite values",
      lds(None, lambda d: gt(d, outputs=with_nan(OUTPUTS, (0, 3, 1))))),
    C("lds-topk-index-too-large", 1, "'indices' holds position 30, outside the 30 training",
      lds(lambda d: topk(d, indices=np.where(TOPK["indices"] == TOPK["indices"][0, 0], N,
                                             TOPK["indices"])))),
    C("lds-topk-index-negative", 1, "'indices' holds position -1",
      lds(lambda d: topk(d, indices=np.where(TOPK["indices"] == TOPK["indices"][1, 1], -1,
                                             TOPK["indices"])))),
    C("lds-topk-nan-values", 1, "dataset 'values' holds 1 NaN",
      lds(lambda d: topk(d, values=with_nan(TOPK["values"], (0, 0))))),
    C("lds-topk-without-ids", 1, "needs 'train_ids'",
      lds(lambda d: topk(d, train_ids=None, query_ids=None))),
    C("lds-topk-shapes-differ", 1, "'values' has shape (4, 2) but 'indices' (4, 3)",
      lds(lambda d: topk(d, values=TOPK["values"][:, :2]))),
    C("lds-scores-without-format", 1, "attribute 'format' is None",
      lds(lambda d: h5file(d / "nf.h5", DENSE))),
    C("lds-scores-unknown-format", 1, "attribute 'format' is 'sparse'",
      lds(lambda d: scores(d, attrs={"format": "sparse"}))),
    C("lds-scores-strings", 1, "'scores' holds strings",
      lds(lambda d: scores(d, scores=SCORES.astype("S4")))),
    C("lds-scores-ids-length", 1, "'train_ids' has 29 entries but the rows of 'scores' has 30",
      lds(lambda d: scores(d, train_ids=IDS_T[:29]))),
    C("lds-gt-missing-masks", 1, "missing dataset 'masks'", lds(None, lambda d: gt(d, masks=None))),
    C("lds-gt-outputs-2d", 1, "'outputs' has 2 dimensions",
      lds(None, lambda d: gt(d, outputs=OUTPUTS[0]))),
    C("lds-gt-masks-not-0-1", 1, "'masks' holds 2",
      lds(None, lambda d: gt(d, masks=MASKS.astype(np.int8) * 2))),
    C("lds-gt-subsets-disagree", 1, "has 11 subsets but 'masks'",
      lds(None, lambda d: gt(d, outputs=OUTPUTS[:, :11]))),
    C("lds-gt-mask-index-length", 1, "'mask_index' has 3 entries but 'masks' has 12",
      lds(None, lambda d: gt(d, mask_index=np.arange(3)))),
    C("lds-gt-one-subset", 1, "the LDS needs at least 2",
      lds(None, lambda d: gt(d, masks=MASKS[:1], outputs=OUTPUTS[:, :1], mask_index=[0]))),
    C("lds-arguments-swapped", 1, "attribute 'format' is None, expected 'dense' or 'topk': not a "
      "scores file",
      lambda d: ["lds", str(d / G), str(d / S)]),
    C("lds-gt-missing", 1, "nothere.h5: no such file", lds(None, lambda d: d / "nothere.h5")),
    C("lds-float16-scores", 0, '"lds"', lds(lambda d: scores(d, scores=SCORES.astype(np.float16))),
      new=("bad_s.h5",)),
    C("lds-topk-repeats-an-index", 1, "'indices' names training position 7 more than once for query id 501",
      lds(lambda d: topk(d, indices=_repeat_in_row(1, 7)))),
    C("lds-gt-repeats-a-mask", 1, "'mask_index' repeats subset (mask) 3 (2 times)",
      lds(None, lambda d: gt(d, mask_index=np.r_[0:11, 3]))),
    C("lds-hard-on-soft-scores", 1, "its scores were already soft-thresholded when scored (lambda=0.1); "
      "--threshold hard would apply a second threshold",
      lds(lambda d: scores(d, attrs={"threshold": "soft", "lambda": 0.1}), None, "--threshold", "hard")),
    C("lds-topk-on-hard-scores", 1, "already hard-thresholded",
      lds(lambda d: scores(d, attrs={"threshold": "hard", "lambda": 0.1}), None, "--threshold", "topk")),
    C("lds-soft-scores-named", 0, '"scores_threshold": {\n    "kind": "soft",\n    "lambda": 0.1',
      lds(lambda d: scores(d, attrs={"threshold": "soft", "lambda": 0.1})), new=("bad_s.h5",)),
    # --- lds: options ----------------------------------------------------------------------
    C("lds-bootstrap-zero", 2, "argument --bootstrap: must be >= 1", lds(None, None, "--bootstrap", "0")),
    C("lds-bootstrap-negative", 2, "argument --bootstrap: must be >= 1",
      lds(None, None, "--bootstrap", "-3")),
    C("lds-quantile-without-threshold", 2, "--quantile does nothing with --threshold none",
      lds(None, None, "--quantile", "0.5")),
    C("lds-k-without-topk", 2, "--k does nothing with --threshold hard",
      lds(None, None, "--threshold", "hard", "--k", "5")),
    C("lds-quantile-above-one", 2, "argument --quantile: must be in [0.0, 1.0)",
      lds(None, None, "--threshold", "hard", "--quantile", "1.5")),
    C("lds-k-zero", 2, "argument --k: must be >= 1", lds(None, None, "--threshold", "topk", "--k", "0")),
    # --- info ------------------------------------------------------------------------------
    C("info-missing", 1, "nope.h5: no such file", info(lambda d: d / "nope.h5")),
    C("info-directory", 1, "is a directory", info(lambda d: subdir(d, "dir.h5"))),
    C("info-not-hdf5", 1, "not a readable HDF5 file", info(lambda d: text(d, "t.h5", b"hello"))),
    C("info-fifo", 1, "is a device, pipe or socket", info(lambda d: fifo(d, "p.h5"))),
    C("info-nested-groups", 0, "train/ (group)", info(lambda d: losses(d, train=GROUP))),
]


def snapshot(root: Path) -> dict[str, str]:
    """Content hash of every regular file under ``root``, and the kind of everything else."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = f"link to {os.readlink(p)}"
            else:
                out[rel] = f"kind {stat.S_IFMT(st.st_mode):o}"
    return out


@pytest.fixture
def folder(tmp_path):
    """Good inputs and an earlier output, as a user would have them."""
    h5file(tmp_path / L, LOSSES, {"variant": "daunce"})
    h5file(tmp_path / S, DENSE, {"format": "dense"})
    h5file(tmp_path / G, GT)
    h5file(tmp_path / E, DENSE, {"format": "dense"})
    return tmp_path


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("argv,code,message,new,check", CASES)
def test_bad_input(folder, capsys, argv, code, message, new, check):
    args = argv(folder)
    before = snapshot(folder)
    dev_null = os.stat("/dev/null")
    assert main(args) == code
    out, err = capsys.readouterr()
    assert message in out + err, f"expected {message!r} in:\n{out}{err}"
    if code:
        assert len(err.strip().splitlines()) == 1, f"not one line:\n{err}"
        assert "Traceback" not in err
    after = snapshot(folder)
    for name in new:
        assert name in after, f"{name} was not written"
        before.setdefault(name, after[name])
    assert after == before, "an input or an earlier output changed, or a stray file appeared"
    st = os.stat("/dev/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == dev_null.st_rdev
    if check:
        check(folder, out + err)


# --- through a subprocess: real exit codes and one-line errors --------------------------------

def daunce(*args, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "daunce_core.cli", *map(str, args)]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,code,message", [
    (lambda d: ["score", d / L, "-o", d / L], 1, "is the input file"),
    (lambda d: ["score", d / L, "-o", d / NEW, "--memory-gb", "nan"], 2, "--memory-gb"),
    (lambda d: ["lds", d / S, d / G, "--bootstrap", "20"], 0, ""),
], ids=["output-is-input", "bad-option", "lds-ok"])
def test_exit_status_through_a_process(folder, args, code, message):
    before = snapshot(folder)
    res = daunce(*args(folder))
    assert res.returncode == code, res.stderr
    assert message in res.stderr
    if code:
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert snapshot(folder) == before


# --- interruptions ------------------------------------------------------------------------

def _big_losses(path: Path) -> None:
    rng = np.random.default_rng(0)
    # dense output 480 MB, written over several seconds: on an idle machine a 160 MB output was
    # sometimes finished before the signal arrived (exit 0), a race of the test, not of daunce
    K_, n, m = 32, 600_000, 200
    store.write_losses(path, store.Losses(
        rng.standard_normal((K_, n), dtype=np.float32), rng.standard_normal((K_, m), dtype=np.float32),
        np.arange(K_), np.arange(n), np.arange(m), {"variant": "daunce"}))


def _start_and_wait_for_temp(tmp_path: Path) -> subprocess.Popen:
    proc = daunce("score", tmp_path / "l.h5", "-o", tmp_path / "s.h5", background=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".s.h5.daunce-tmp-*")):
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.005)
    return proc


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_signal_during_scoring_leaves_no_temp_and_no_output(tmp_path, sig, code, word):
    _big_losses(tmp_path / "l.h5")
    before = snapshot(tmp_path)
    proc = _start_and_wait_for_temp(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert word in err and "Traceback" not in err
    assert snapshot(tmp_path) == before, "a temporary file or an output was left behind"


def test_sigkill_leftover_is_cleaned_by_the_next_run(tmp_path):
    _big_losses(tmp_path / "l.h5")
    proc = _start_and_wait_for_temp(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    leftovers = list(tmp_path.glob(".s.h5.daunce-tmp-*"))
    assert len(leftovers) == 1 and re.search(rf"daunce-tmp-{proc.pid}@", leftovers[0].name)
    assert not (tmp_path / "s.h5").exists()
    res = daunce("score", tmp_path / "l.h5", "-o", tmp_path / "s.h5", "--topk", "3")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.h5", "s.h5"]
