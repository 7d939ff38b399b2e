"""What several test modules share: the repository's paths, Snakemake on the workflow in a working
folder, a user's folder with their ``--configfile``, and the small problems more than one module fits.

Import it as ``helpers`` (pyproject.toml puts tests/ on pytest's ``pythonpath``; the name ``tests`` is
taken by a package kronfluence installs). Fixtures built on it live in ``tests/conftest.py``.
"""
import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from daunce_core import baselines as B
from daunce_core import ensemble as E
from daunce_core.config import ExperimentConfig, ModelConfig, TrainConfig
from daunce_core.data import Dataset
from daunce_core.lm import data as textdata
from daunce_core.lm import tiny as tinylm
from daunce_core.models import build_model, model_factory
from daunce_core.objectives import cross_entropy, margin
from daunce_core.perturb import theta0_key

ROOT = Path(__file__).resolve().parents[1]  # the repository
SNAKEFILE = ROOT / "workflow" / "Snakefile"
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))  # the one of this interpreter's environment


def snakemake(workdir: Path, *args: str, configfile: str | None = None, cores: int = 1,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """The workflow run from the repository with ``workdir`` as its working folder (``--directory``);
    ``configfile`` names a file inside ``workdir`` passed as ``--configfile``. Output captured."""
    extra = ["--configfile", str(Path(workdir) / configfile)] if configfile else []
    return subprocess.run([SNAKEMAKE, "-s", str(SNAKEFILE), "--directory", str(workdir), *extra,
                           "--cores", str(cores), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def user_folder(tmp_path: Path, override: dict | None = None, default_text: str | None = None) -> Path:
    """A working folder as a user has it: config/config.yaml (the repository's, or ``default_text``)
    and their ``--configfile my.yaml`` holding ``override``."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(default_text or DEFAULT_CONFIG.read_text())
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(override or {}))
    return tmp_path


def trained_mlp(n: int = 120, hidden: int = 16, epochs: int = 5):
    """theta_0 of a small problem for the fitters: an MLP (``hidden`` units) trained ``epochs`` epochs
    on ``n`` random 1x4x4 inputs with 3 random labels. Returns (net, theta_0 state dict, X, y)."""
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.normal(size=(n, 1, 4, 4)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, n))
    factory = lambda: build_model(ModelConfig(arch="mlp", hidden=[hidden]), (1, 4, 4), 3)  # noqa: E731
    net, p, b = E.fit_from_scratch(factory, X, y, [np.arange(n)], [(0,)],
                                   TrainConfig(epochs=epochs, batch_size=16, lr=0.05))
    return net, {**E.unstack(p, 0), **E.unstack(b, 0)}, X, y


def tiny_text_task(arch: str = "qwen2", num_layers: int = 1, seed: int = 0):
    """The LLM tests' problem: a synthetic arithmetic task (3 operations, 48 training examples, 4
    queries an operation), a tokenizer trained on it and a tiny causal LM. Returns (task, tok, model)."""
    task = textdata.synthetic_task(n_ops=3, n_train=48, queries_per_op=4, skew=0.8)
    texts = [e["prompt"] + e["response"] for e in task["train"] + task["query"]]
    tok = tinylm.train_tokenizer(texts + ["1+2=3"], vocab_size=280)
    model = tinylm.tiny_causal_lm(tok, arch=arch, hidden_size=32, num_layers=num_layers, num_heads=2,
                                  max_position_embeddings=32, seed=seed)
    return task, tok, model


# --- the baselines' tiny problem (tests of baselines and of the regime's added methods) -------------

BASELINES_N, BASELINES_M, DUP, SRC = 40, 7, 0, 5  # query DUP is an exact copy of training example SRC


def baselines_problem():
    """The baselines' tiny problem: an MLP (6 hidden units) trained 15 epochs on BASELINES_N points of
    3 Gaussian classes in 4 dimensions; query DUP is a copy of SRC, an atypical training point.
    Returns a ``daunce_core.baselines.Problem``."""
    N, M = BASELINES_N, BASELINES_M
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 4)) * 1.5
    y = rng.integers(0, 3, N + M)
    Xall = (centers[y] + rng.normal(size=(N + M, 4))).astype(np.float32).reshape(-1, 1, 2, 2)
    # SRC: an atypical training point (far from every class centre), so it matters most to its copy
    Xall[SRC] = (centers.mean(0) - 2.5 * centers[y[SRC]]).astype(np.float32).reshape(1, 2, 2)
    Xq, yq = Xall[N:].copy(), y[N:].copy()
    Xq[DUP], yq[DUP] = Xall[SRC], y[SRC]
    ds = Dataset(Xall[:N], y[:N].astype(np.int64), np.arange(N, dtype=np.int64) + 100, Xq, yq.astype(np.int64),
                 np.arange(M, dtype=np.int64) + 500, 3, ["a", "b", "c"], np.zeros(1, np.float32),
                 np.ones(1, np.float32))
    cfg = ExperimentConfig(model=ModelConfig(arch="mlp", hidden=[6]),
                           base=TrainConfig(epochs=15, batch_size=8, lr=0.05, weight_decay=1e-3))
    Xt, yt = torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train)
    factory = model_factory(cfg.model, ds.X_train.shape[1:], ds.num_classes)
    net, p, b = E.fit_from_scratch(factory, Xt, yt, [np.arange(N)], [theta0_key(cfg.base.seed)], cfg.base)
    state = {**E.unstack(p, 0), **E.unstack(b, 0)}
    model = factory()
    model.load_state_dict(state)
    model.eval()
    return B.Problem(cfg, ds, model, state, torch.device("cpu"))


def bcfg(**kw):
    """A BaselinesConfig with batch size 16 and the ``baselines`` keys ``kw``."""
    return B.BaselinesConfig.from_config({"baselines": {"batch_size": 16, **kw}})


# --- an independent float64 reference of the baselines: plain autograd loops, no torch.func -----

def _flat_fn(problem, state=None):
    model = copy.deepcopy(problem.model).double()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()} if state is None else \
        {n: state[n].detach() for n in names}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].reshape(-1) for n in names]).double()

    def logits(flat, x):
        d = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return torch.func.functional_call(model, d, (x.double(),))

    return theta, logits


def reference_grads(problem, which, fn, state=None):
    """Per-example float64 gradients of ``fn(logits, y)`` over the training or query set: [n, P]."""
    theta, logits = _flat_fn(problem, state)
    Xs = problem.ds.X_train if which == "train" else problem.ds.X_query
    ys = problem.ds.y_train if which == "train" else problem.ds.y_query
    rows = []
    for x, t in zip(Xs, ys):
        th = theta.clone().requires_grad_(True)
        val = fn(logits(th, torch.as_tensor(x)[None]), torch.as_tensor([t])).sum()
        rows.append(torch.autograd.grad(val, th)[0].numpy())
    return np.stack(rows)


def reference_curvature(problem, curvature, wd):
    """The float64 Hessian (``curvature="hessian"``) or Gauss-Newton matrix of the mean training
    cross-entropy, plus ``wd`` I."""
    theta, logits = _flat_fn(problem)
    Xt = torch.as_tensor(problem.ds.X_train)
    yt = torch.as_tensor(problem.ds.y_train)
    if curvature == "hessian":
        H = torch.autograd.functional.hessian(lambda th: cross_entropy(logits(th, Xt), yt).mean(), theta).numpy()
    else:
        H = np.zeros((len(theta), len(theta)))
        for x in Xt:
            J = torch.autograd.functional.jacobian(lambda th, x=x: logits(th, x[None])[0], theta).numpy()
            p = torch.softmax(logits(theta, x[None])[0], -1).detach().numpy()
            H += J.T @ (np.diag(p) - np.outer(p, p)) @ J
        H /= len(Xt)
    return H + wd * np.eye(len(theta))


def neg_margin(logits, y):
    return -margin(logits, y)


def plan_jobs(text: str) -> list[tuple[str, list[str], list[str]]]:
    """The jobs of a Snakemake dry run's printed plan: (rule, inputs, outputs) per job."""
    jobs = []
    for block in re.split(r"^\[[^\]]+\]\n|\n\n", text, flags=re.M):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not rule:
            continue
        ins = re.search(r"^\s+input: (.*)$", block, re.M)
        outs = re.search(r"^\s+output: (.*)$", block, re.M)
        jobs.append((rule.group(1), ins.group(1).split(", ") if ins else [],
                     outs.group(1).split(", ") if outs else []))
    return jobs
