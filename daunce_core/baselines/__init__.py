"""The baselines of Figure 1a, each through its authors' library, on DAUNCE's theta_0.

One entry point, :func:`run_baseline`, fits one method on the experiment's theta_0 and writes its
scores in the common dense layout (``store.write_scores``, [n, m], positive = the training
example helps the query), so LDS, figures and removal never know which method made them.

==========  ==========================================================  ======================
method      what runs                                                   module
==========  ==========================================================  ======================
trak        ``traker.TRAKer``, one model (no ensemble), margin output     :mod:`.trak`
ekfac       ``kronfluence`` EK-FAC on every supported layer                :mod:`.kronfluence_ekfac`
logra       ``dattri.LoGraAttributor`` (rank x rank per layer, eFIM)      :mod:`.dattri_methods`
graddot     ``dattri.TracInAttributor`` at theta_0, unit weight           :mod:`.dattri_methods`
tracin      ``dattri.TracInAttributor`` over checkpoints of theta_0's run  :mod:`.dattri_methods`
exact_if    full Hessian (or Gauss-Newton) solve in float64, ours          :mod:`.exact`
==========  ==========================================================  ======================

The *training* function of every gradient method is the per-example cross-entropy that theta_0
was trained on; the *query* function is ``baselines.measurement``: the margin
``log p / (1 - p)`` by default (the output the LDS ground truth measures, and what TRAK and
kronfluence's CIFAR example use), or the loss. Libraries are handed the measurement in its
"loss-like" orientation (``-margin``), so their native positive score means "helpful"; each
adapter's sign and orientation is tested against an independent computation
(``tests/test_baselines.py``).

Settings (config key ``baselines``) are read by :class:`BaselinesConfig` through
:func:`daunce_core.settings.build` (unknown keys and wrong types refused by name). It and the
problem every adapter receives live in :mod:`.common`; this module re-exports them and dispatches.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from ..config import ExperimentConfig
from .common import (METHODS, MEASUREMENTS, BaselinesConfig, EkfacConfig, ExactIFConfig, LograConfig, Problem,
                     TracinConfig, TrakConfig, check_scores, dir_bytes, load_problem, query_value, train_loss,
                     workdir, write_result)

__all__ = ["METHODS", "MEASUREMENTS", "BaselinesConfig", "TrakConfig", "EkfacConfig", "LograConfig",
           "TracinConfig", "ExactIFConfig", "Problem", "load_problem", "query_value", "train_loss",
           "check_scores", "write_result", "workdir", "dir_bytes", "run_baseline"]

log = logging.getLogger(__name__)


# --- dispatch ------------------------------------------------------------------------------------

def run_baseline(method: str, cfg: ExperimentConfig, bcfg: BaselinesConfig, split_path, theta0_path, out,
                 select_gt=None) -> dict[str, Any]:
    """Fit ``method`` on theta_0 and write its dense scores to ``out``; returns the attributes.

    ``select_gt``: the LDS *selection* ground truth, used only by ``exact_if`` to pick its damping
    (never the test masks).
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    t0 = time.perf_counter()
    problem = load_problem(cfg, split_path, theta0_path)
    log.info("%s on theta_0 (%d parameters): %d training examples, %d queries, measurement=%s",
             method, problem.num_params(), problem.n, problem.m, bcfg.measurement)
    if method == "trak":
        from .trak import trak_scores

        with workdir(out, method) as wd:
            scores, attrs = trak_scores(problem, bcfg, wd)
    elif method == "ekfac":
        from .kronfluence_ekfac import ekfac_scores

        with workdir(out, method) as wd:
            scores, attrs = ekfac_scores(problem, bcfg, wd)
    elif method in ("graddot", "tracin", "logra"):
        from . import dattri_methods as D

        with workdir(out, method) as wd:
            scores, attrs = getattr(D, f"{method}_scores")(problem, bcfg, wd)
    else:
        from .exact import exact_if_scores

        scores, attrs = exact_if_scores(problem, bcfg, select_gt=select_gt)
    attrs = {"measurement": bcfg.measurement, **attrs, "seconds_in_process": time.perf_counter() - t0}
    write_result(out, scores, problem, method, attrs)
    log.info("%s: wrote %s (%s)", method, out, json.dumps({k: v for k, v in attrs.items()
                                                            if not isinstance(v, (list, dict))}))
    return attrs
