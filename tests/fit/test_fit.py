"""The fitter contract and its shared machinery: chunks, gathering, lr selection, scoring, and the
classifier fitter (vmap == loop; the Plan's default draws are the paper's)."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from daunce_core import ensemble as E
from daunce_core import perturb, store
from daunce_core.config import DaunceConfig, ModelConfig, TrainConfig
from daunce_core.fit import Fitter, Plan, Signals, chunks
from daunce_core.fit.ensemble import EnsembleFitter
from daunce_core.models import build_model
from daunce_core.scoring import pairwise_scores

from helpers import ROOT

torch.set_num_threads(1)


def signals(ks, n=30, m=6, seed=0, **attrs):
    rng = np.random.default_rng([seed, *ks])
    return Signals(rng.normal(size=(len(ks), n)), rng.normal(size=(len(ks), m)), np.asarray(ks),
                   np.arange(n) + 100, np.arange(m) + 500, attrs={"variant": "daunce", "signal": "loss",
                                                                  "seed": seed, **attrs})


# --- chunks ------------------------------------------------------------------------------------

def test_chunk_models_cover_K_once():
    K, size = 23, 5
    all_ks = [k for c in range(chunks.n_chunks(K, size)) for k in chunks.chunk_models(K, size, c)]
    assert all_ks == list(range(K)) and chunks.n_chunks(K, size) == 5 and chunks.n_chunks(3, 50) == 1
    with pytest.raises(ValueError, match="chunk 5 is empty for K=23"):
        chunks.chunk_models(K, size, 5)


def test_gather_joins_chunks_and_refuses_mixed_settings(tmp_path):
    parts = [tmp_path / "c1.h5", tmp_path / "c0.h5"]
    assert chunks.write_signals(parts[0], signals([3, 4]), {"lr": 0.1})
    assert chunks.write_signals(parts[1], signals([0, 1, 2]), {"lr": 0.1})
    merged = chunks.gather(parts, tmp_path / "all.h5")
    back = store.read_losses(tmp_path / "all.h5")
    assert list(back.model_index) == [0, 1, 2, 3, 4] and merged.K == 5
    np.testing.assert_array_equal(back.train[3:], signals([3, 4]).train.astype(np.float32))
    chunks.write_signals(tmp_path / "other.h5", signals([5], seed=1), {"lr": 0.1})
    with pytest.raises(store.StoreError, match="attribute 'seed' differs"):
        chunks.gather([parts[1], tmp_path / "other.h5"], tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


def test_write_signals_records_divergence(tmp_path):
    s = signals([7, 8, 9])
    s.query[1, 2] = np.nan
    assert chunks.write_signals(tmp_path / "d.h5", s, {"lr": 0.3}) is False
    assert store.is_diverged(tmp_path / "d.h5")
    with h5py.File(tmp_path / "d.h5") as f:
        assert f.attrs["reason"] == "1 of 3 models non-finite at lr=0.3 (first k=8)"
    with pytest.raises(store.StoreError, match="diverged"):
        store.read_losses(tmp_path / "d.h5")


def test_select_lr_skips_diverged_and_keeps_the_best(tmp_path):
    paths = {}
    for lr in (0.1, 0.01, 0.001):
        paths[lr] = tmp_path / f"lr{lr}.h5"
        s = signals([0, 1, 2], seed=0)
        if lr == 0.1:
            s.train[0, 0] = np.inf
        chunks.write_signals(paths[lr], s, {"lr": lr})
    judged = []

    def judge(losses):
        judged.append(losses.attrs["lr"])
        return -abs(np.log10(losses.attrs["lr"]) + 2)  # best at 0.01

    best = chunks.select_lr(paths, judge, tmp_path / "sel.h5", tmp_path / "sel.json",
                            {"variant": "daunce", "measure": "correlation"}, key="lds_select")
    assert best == 0.01 and sorted(judged) == [0.001, 0.01]
    doc = json.loads((tmp_path / "sel.json").read_text())
    # the choice and whether it is an end of the grid are recorded
    assert list(doc) == ["variant", "selected_lr", "selected", "on_edge", "grid", "measure"]
    assert doc["selected"] == {"lr": 0.01} and doc["on_edge"] is False
    assert doc["grid"][-1] == {"lr": 0.1, "lds_select": None, "diverged": True}
    assert store.read_losses(tmp_path / "sel.h5").attrs["lr"] == 0.01
    with pytest.raises(ValueError, match="every learning rate of the grid diverged.*daunce.lr_grid"):
        chunks.select_lr({0.1: paths[0.1]}, judge, tmp_path / "x.h5", tmp_path / "x.json",
                         {"variant": "daunce"}, grid_option="daunce.lr_grid")
    assert not (tmp_path / "x.h5").exists()


def test_select_lr_flags_a_choice_at_an_end_of_the_grid(tmp_path, caplog):
    """A best lr at the grid's smallest or largest value is on_edge (logged);
    a diverged larger lr bounds the search, so the best below it is interior."""
    paths = {}
    for lr in (0.1, 0.01, 0.001):
        paths[lr] = tmp_path / f"lr{lr}.h5"
        s = signals([0, 1, 2], seed=0)
        if lr == 0.1:
            s.train[0, 0] = np.inf
        chunks.write_signals(paths[lr], s, {"lr": lr})

    def judge_for(best):
        return lambda losses: -abs(np.log10(losses.attrs["lr"]) - np.log10(best))

    for best, edge in ((0.001, True), (0.01, False)):
        with caplog.at_level("WARNING"):
            chunks.select_lr(paths, judge_for(best), tmp_path / "s.h5", tmp_path / "s.json",
                             {"variant": "daunce"}, key="lds_select", grid_option="daunce.lr_grid")
        doc = json.loads((tmp_path / "s.json").read_text())
        assert doc["selected_lr"] == best and doc["on_edge"] is edge
        assert ("a wider daunce.lr_grid" in caplog.text) is edge
        caplog.clear()


@pytest.mark.parametrize("measure", ["correlation", "covariance"])
def test_score_streams_through_score_file_and_matches_pairwise_scores(tmp_path, measure):
    s = signals(list(range(12)), n=50, m=9)
    chunks.write_signals(tmp_path / "l.h5", s)
    chunks.score(tmp_path / "l.h5", tmp_path / "s.h5", measure, method="daunce_x")
    dense, meta = store.dense_scores(tmp_path / "s.h5")
    want = pairwise_scores(s.train.astype(np.float32), s.query.astype(np.float32), measure=measure)
    np.testing.assert_allclose(dense, want, rtol=1e-4, atol=1e-5)
    assert meta["format"] == "dense" and np.array_equal(meta["train_ids"], s.train_ids)
    assert meta["attrs"]["method"] == "daunce_x" and meta["attrs"]["measure"] == measure
    assert meta["attrs"]["threshold"] == "none" and meta["attrs"]["K"] == 12
    chunks.score(tmp_path / "l.h5", tmp_path / "s2.h5", measure)
    assert store.read_scores(tmp_path / "s2.h5")["attrs"]["method"] == "daunce"  # the losses' variant


# --- the Plan: its defaults are the paper's independent draws --------------------------------

def test_plan_defaults_are_bit_identical_to_perturb():
    plan = Plan(seed=3, ratio=0.3)
    for k in (0, 1, 7):
        idx, xi = plan.subset_and_xi(k, 200)
        ref_idx, ref_xi = perturb.subset_and_xi(3, k, 200, 0.3)
        assert np.array_equal(idx, ref_idx) and np.array_equal(xi, ref_xi)
        assert plan.batch_key(k) == (3, k)
        assert np.array_equal(perturb.batch_order(plan.batch_key(k), idx, 2, 16),
                              perturb.batch_order((3, k), ref_idx, 2, 16))
    anti = Plan(seed=3, ratio=0.3, antithetic=True)
    a, b = anti.subset_and_xi(4, 200), anti.subset_and_xi(5, 200)
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1] + b[1], 1.0) and anti.batch_key(5) == (3, 4)
    assert Plan(seed=3, common_batches=True).batch_key(9) == (3, -1)


# --- the classifier fitter ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.normal(size=(60, 1, 2, 3)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, 60))
    Xq = torch.tensor(rng.normal(size=(8, 1, 2, 3)), dtype=torch.float32)
    yq = torch.tensor(rng.integers(0, 3, 8))
    factory = lambda: build_model(ModelConfig(arch="mlp", hidden=[8]), (1, 2, 3), 3)  # noqa: E731
    net, p, b = E.fit_from_scratch(factory, X, y, [np.arange(60)], [(0,)], TrainConfig(epochs=3, batch_size=10))
    return net, {**E.unstack(p, 0), **E.unstack(b, 0)}, (X, y), (Xq, yq)


CFG = DaunceConfig(K=6, ratio=0.5, epochs=2, batch_size=10, seed=4)


@pytest.mark.parametrize("variant", ["daunce", "daunce_t"])
def test_ensemble_fitter_vmap_and_loop_agree(tiny, variant):
    net, theta0, train, query = tiny
    out = {mode: EnsembleFitter(net, theta0, train, query, variant=variant, cfg=CFG, mode=mode).fit([0, 3, 5], 0.05)
           for mode in ("vmap", "loop")}
    assert isinstance(out["vmap"], Signals) and out["vmap"].train.shape == (3, 60) and out["vmap"].query.shape == (3, 8)
    assert out["vmap"].signal == ("margin" if variant == "daunce_t" else "loss")
    np.testing.assert_array_equal(out["vmap"].model_index, [0, 3, 5])
    np.testing.assert_allclose(out["vmap"].train, out["loop"].train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["vmap"].query, out["loop"].query, rtol=1e-5, atol=1e-5)


def test_ensemble_fitter_follows_the_contract_and_the_trainer(tiny):
    net, theta0, (X, y), query = tiny
    fitter = EnsembleFitter(net, theta0, (X, y), query, variant="daunce", cfg=CFG, train_ids=np.arange(60) + 10)
    assert isinstance(fitter, Fitter)
    got = fitter.fit([1, 2], 0.05)
    # the same models as the trainer with the paper's draws keyed by (seed, k)
    p, b = E.fit_perturbed(net, theta0, X, y, [1, 2], variant="daunce", cfg=CFG, lr=0.05)
    np.testing.assert_array_equal(got.train, E.signals(E.predict(net, p, b, X), y, "loss").numpy())
    # p0: theta_0's probability of each label (DAUNCE-T's 1 - p factor)
    p0, b0 = E.split_state(net, theta0)
    logits0 = E.predict(net, E.stack_states([p0], "cpu"), E.stack_states([b0], "cpu"), X)[0]
    np.testing.assert_allclose(got.p0_train, torch.softmax(logits0, -1)[torch.arange(60), y].numpy(), rtol=1e-5)
    assert got.p0_query.shape == (8,) and np.array_equal(got.train_ids, np.arange(60) + 10)
    assert got.attrs == {"variant": "daunce", "signal": "loss", "seed": 4}
    # chunking is invisible: fit_all over chunks of 4 equals one fit of all K
    whole = fitter.fit(list(range(6)), 0.05)
    joined = chunks.fit_all(fitter, 6, 4, 0.05)
    np.testing.assert_allclose(joined.train, whole.train, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(joined.model_index, np.arange(6))


# --- the public API ------------------------------------------------------------------------------

def test_public_api_is_lazy_and_versioned():
    import daunce_core

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert daunce_core.__version__ == version == store.VERSION
    for name in daunce_core.__all__:
        assert getattr(daunce_core, name) is not None
    assert daunce_core.Signals is Signals and daunce_core.read_losses is store.read_losses
    code = "import sys, daunce_core; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _is_module(name: str) -> bool:
    rel = ROOT.joinpath(*name.split("."))
    return rel.with_suffix(".py").exists() or (rel / "__init__.py").exists()


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """daunce_core modules imported by the file ``path`` (module ``module``)."""
    import ast

    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            # `from . import sub` loads the submodule (its package is already initialising);
            # `from . import name` of a package-level name depends on the package itself
            subs = {f"{base}.{a.name}" for a in node.names}
            found.update(subs)
            if not all(_is_module(s) for s in subs):
                found.add(base)
    return {m for m in found if m.startswith("daunce_core")}


# The layers, lowest first: a module imports (at module level or inside a function) only modules
# of its own layer or below. Each entry names a module or package of daunce_core; the longest
# matching name decides. Every module must be listed.
LAYERS = {
    "base": ["utils", "settings", "store", "perturb"],  # no daunce_core imports but each other
    "core": ["config", "objectives", "models", "data", "scoring", "diagnostics", "ground_truth",
             "removal"],  # the maths, settings, data and scores
    "domain": ["ensemble", "lds", "baselines", "figures", "lm", "blackbox", "localapi",
               "task"],  # trainers, evaluations, the user's Task
    "fit": ["fit"],  # the fitter contract and one adapter per way of fitting, over the domain code
    "steps": ["steps"],  # the workflow's steps, called by scripts/
    "entry": ["", "api", "attribute", "cli", "runner", "schema",
              "blackbox.__main__", "localapi.__main__"],  # users' doors
}


def _layer(module: str) -> int | None:
    name = module.removeprefix("daunce_core").removeprefix(".")
    best = None
    for rank, prefixes in enumerate(LAYERS.values()):
        for p in prefixes:
            if (name == p or (p and name.startswith(p + "."))) and (best is None or len(p) > best[1]):
                best = (rank, len(p))
    return None if best is None else best[0]


def test_layers_point_one_way():
    """Every module has a layer (``LAYERS``: base < core < domain < fit < steps < entry) and imports
    only its own layer or those below, lazy imports included: no library module imports a step,
    no domain module a fitter. Module-level imports form no circle."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "daunce_core").rglob("*.py")}
    unplaced = sorted(m for m in files if _layer(m) is None)
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"
    names = list(LAYERS)
    up = [f"{m} ({names[_layer(m)]}) -> {d} ({names[_layer(d)]})"
          for m, p in files.items() for d in sorted(_imports(p, m, top_level_only=False) & set(files))
          if _layer(d) > _layer(m)]
    assert not up, "imports that point up a layer:\n" + "\n".join(up)
    graph = {m: _imports(p, m, top_level_only=True) & set(files) - {m} for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import circle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_workflows_perturbed_fits_refuse_a_theta0_of_another_model(tmp_path):
    """pipeline.ensemble_fitter (the perturbed_chunk rule) checks theta_0 against the config's model:
    a missing or reshaped key would otherwise train from a partly random theta_0."""
    from daunce_core import store
    from daunce_core.config import ExperimentConfig
    from daunce_core.data import load_dataset
    from daunce_core.models import ModelError
    from daunce_core.steps import vision as pipeline

    c = ExperimentConfig.from_dict({"device": "cpu", "data": {"name": "digits", "n_train": 40, "n_query": 5},
                                    "model": {"arch": "mlp", "hidden": [16]}})
    ds = load_dataset(c.data)
    np.savez(tmp_path / "split.npz", train_ids=ds.train_ids, query_ids=ds.query_ids)
    for hidden, name in (([8], "narrow"), ([16], "right")):
        net = build_model(ModelConfig(arch="mlp", hidden=hidden), ds.X_train.shape[1:], ds.num_classes)
        store.save_state(net.state_dict(), tmp_path / f"{name}.safetensors")
    with pytest.raises(ModelError, match=r"narrow\.safetensors: theta_0 key .* has shape"):
        pipeline.ensemble_fitter(c, tmp_path / "split.npz", tmp_path / "narrow.safetensors", "daunce")
    assert pipeline.ensemble_fitter(c, tmp_path / "split.npz", tmp_path / "right.safetensors", "daunce") is not None
