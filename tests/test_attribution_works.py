"""The science is asserted (vision): on a small fixed problem every DAUNCE variant's
LDS beats random scores by a margin, so a change that breaks attribution fails here.

The problem: sklearn's digits, 300 training and 60 query images, an MLP with 32 hidden units
trained 30 epochs (theta_0); LDS ground truth of 60 masks (alpha 0.5, one retrain each); K = 40
perturbed models per variant at lr 0.01 (10 epochs, batch 32; daunce_m its own matched_* settings),
correlation scores (daunce_m: covariance, its default) thresholded as the default config does
(hard, q = 0.9).

How the margin was set: on this problem, random score matrices give LDS near 0 with bootstrap
CI upper bounds far below every variant's CI lower bound, so the assertion asks a variant's CI
*lower* bound to exceed the *upper* CI bound of the best of 5 random score matrices by
MARGIN = 0.1, well below the weakest variant's measured gap. `pytest -s` prints each variant's
LDS, its CI and the random upper bound, the figures the margin was chosen from. Replacing the
scores by random numbers makes every case fail (checked by hand:
`scores = rng.normal(size=scores.shape)` in ``variant_lds``).
"""
import numpy as np
import pytest
import torch

from daunce_core import ensemble as E
from daunce_core import lds as L
from daunce_core import store
from daunce_core.api import default_measure
from daunce_core.config import ExperimentConfig, fit_variant
from daunce_core.data import load_dataset
from daunce_core.fit.chunks import fit_all
from daunce_core.fit.ensemble import EnsembleFitter
from daunce_core.models import model_factory
from daunce_core.perturb import theta0_key
from daunce_core.scoring import apply_threshold
from daunce_core.steps.vision import scores_from_losses

MARGIN = 0.1
VARIANTS = ["daunce", "daunce_e", "daunce_t", "daunce_t_q", "daunce_m", "daunce_bb", "daunce_e_bb", "daunce_t_bb"]


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    cfg = ExperimentConfig.from_dict({
        "data": {"name": "digits", "n_train": 300, "n_query": 60},
        "model": {"arch": "mlp", "hidden": [32]}, "base": {"epochs": 30, "batch_size": 32, "lr": 0.05},
        "daunce": {"K": 40, "ratio": 0.3, "epochs": 10, "batch_size": 32, "k_curve": [40]},
        "lds": {"M": 60, "seeds": 1, "alpha": 0.5}, "device": "cpu"}).validate()
    ds = load_dataset(cfg.data)
    X, y = torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train)
    factory = model_factory(cfg.model, ds.X_train.shape[1:], ds.num_classes)
    _, p, b = E.fit_from_scratch(factory, X, y, [np.arange(ds.n)], [theta0_key(0)], cfg.base)
    theta0 = {**E.unstack(p, 0), **E.unstack(b, 0)}
    mask_index, masks = L.masks_for(cfg, "test", ds.n)
    gt = {"masks": masks, "outputs": L.retrain_outputs(cfg, ds, masks, mask_index, torch.device("cpu"))}
    rng = np.random.default_rng(0)
    random_high = max(L.evaluate(apply_threshold(rng.normal(size=(ds.n, ds.m)).astype(np.float32),
                                                 cfg.lds.threshold), gt)[0].ci_high for _ in range(5))
    query = (torch.as_tensor(ds.X_query), torch.as_tensor(ds.y_query))
    return cfg, factory, theta0, (X, y), query, gt, random_high


def variant_lds(problem, variant: str) -> L.LDSResult:
    cfg, factory, theta0, train, query, gt, _ = problem
    fitter = EnsembleFitter(factory(), theta0, train, query, variant=fit_variant(variant), cfg=cfg.daunce)
    s = fit_all(fitter, cfg.daunce.K, cfg.daunce.K, lr=0.01)
    losses = store.Losses(s.train, s.query, s.model_index, s.train_ids, s.query_ids, {}, p0_train=s.p0_train)
    scores = scores_from_losses(losses, default_measure(variant), variant)  # daunce_m: covariance
    return L.evaluate(apply_threshold(scores, cfg.lds.threshold), gt)[0]


# DAUNCE itself stays in the fast loop (``-m "not slow"``): the problem and one variant's fits take a
# few seconds; the other variants run in the full suite.
@pytest.mark.parametrize("variant", [v if v == "daunce" else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_every_variant_beats_random_scores_by_a_margin(problem, variant):
    random_high = problem[-1]
    res = variant_lds(problem, variant)
    print(f"{variant}: LDS {res.lds:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}]; random upper bound {random_high:.3f}")
    assert res.ci_low > random_high + MARGIN, (
        f"{variant}: LDS {res.lds:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}] is not above random scores' "
        f"upper bound {random_high:.3f} + {MARGIN}: attribution is broken")


@pytest.mark.slow  # the default call fits 200 models at each of the 7 lrs of the grid, then 300: about a minute
def test_the_default_one_call_api_beats_grad_dot_and_random(problem):
    """``daunce_scores(model, train, query)`` with nothing but the device: the library's defaults
    (docs/defaults.md: matched noise, the plateau lr rule). Its raw test LDS must clear random
    scores by the margin and reach grad-dot's on the same problem (raw scores both)."""
    from daunce_core.attribute import daunce_scores
    from daunce_core.baselines import exact
    from daunce_core.baselines.common import Problem

    cfg, factory, theta0, train, query, gt, random_high = problem
    net = factory()
    net.load_state_dict(theta0)
    net.eval()
    scores = daunce_scores(net, train, query, device="cpu")
    res = L.evaluate(scores, gt)[0]
    prob = Problem(cfg, load_dataset(cfg.data), net, {k: v.detach() for k, v in net.state_dict().items()},
                   torch.device("cpu"))
    gd = L.evaluate(exact.per_example_grads(prob, "train") @ exact.per_example_grads(prob, "query", "margin").T,
                    gt)[0]
    print(f"default call: LDS {res.lds:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}]; grad-dot {gd.lds:.3f}; "
          f"random upper bound {random_high:.3f}")
    assert res.ci_low > random_high + MARGIN
    assert res.lds >= gd.lds, f"the default call's LDS {res.lds:.3f} is below grad-dot's {gd.lds:.3f}"
