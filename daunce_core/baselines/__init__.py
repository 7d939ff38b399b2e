"""The baselines of Figure 1a, each through its authors' library, on DAUNCE's theta_0.

One entry point, :func:`run_baseline` (called by the workflow's baseline rules), fits one method
(``trak``, ``ekfac``, ``logra``, ``graddot``, ``tracin``, ``exact_if``, their variants, and the
``REFERENCE`` methods ``limit_*``/``lin_*``/``exact_if_corr``) on the experiment's theta_0, tunes its
knobs on the LDS selection masks like DAUNCE's lr, and writes its scores in the common dense layout
(positive = helpful), so LDS, figures and removal never know which method made them. The settings
(:class:`BaselinesConfig`) and the problem every adapter receives live in :mod:`.common`. Methods,
modules and orientation: docs/design.md#daunce_corebaselines-the-baselines-of-figure-1a."""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from ..config import ExperimentConfig
from .common import (
    ALL_METHODS,
    MEASUREMENTS,
    METHODS,
    REFERENCE,
    TUNABLE,
    BaselinesConfig,
    EkfacConfig,
    ExactIFConfig,
    LimitsConfig,
    LograConfig,
    Problem,
    TracinConfig,
    TrakConfig,
    base_method,
    check_scores,
    dir_bytes,
    is_method,
    load_problem,
    query_value,
    read_selection,
    selection_lds,
    train_loss,
    workdir,
    write_result,
)

__all__ = [
    "METHODS", "REFERENCE", "ALL_METHODS", "LimitsConfig",
    "MEASUREMENTS", "TUNABLE", "read_selection", "selection_lds", "BaselinesConfig", "TrakConfig",
    "EkfacConfig", "LograConfig", "TracinConfig", "ExactIFConfig", "Problem", "load_problem", "query_value",
    "train_loss", "check_scores", "write_result", "workdir", "dir_bytes", "run_baseline",
    "reference_responses", "base_method", "is_method",
]

log = logging.getLogger(__name__)


def at_bound(method: str, knob: str, value, problem: Problem) -> bool:
    """Whether a tuned ``value`` is at the largest value its knob can usefully take on this model,
    so that a choice at the top of its grid is no reason to widen it (``on_edge`` stays false):

    * TRAK's ``proj_dim`` at or above the parameter count: the projection keeps every direction;
    * LoGra's ``rank`` at or above every projected layer's input and output width: nothing of a
      layer's gradient is projected away;
    * TracIn's ``checkpoints`` at every step of theta_0's training (TracIn's ideal form).
    """
    import torch

    if method == "trak" and knob == "proj_dim":
        return int(value) >= problem.num_params()
    if method == "logra" and knob == "rank":
        widths = [w for m in problem.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                  for w in ((m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
                            else (m.in_channels, m.out_channels))]
        return bool(widths) and int(value) >= max(widths)
    if method == "tracin" and knob == "checkpoints":
        from .dattri_methods import base_steps

        return int(value) >= base_steps(problem)
    return False


# --- dispatch ------------------------------------------------------------------------------------

def run_baseline(method: str, cfg: ExperimentConfig, bcfg: BaselinesConfig, split_path, theta0_path, out,
                 select_gt=None, responses=None) -> dict[str, Any]:
    """Fit ``method`` on theta_0 and write its dense scores to ``out``; returns the attributes.

    Tuning on equal footing with DAUNCE: every setting of ``bcfg.grid(method)``
    (``baselines.tune``; at most ``baselines.max_settings``, the size of DAUNCE's lr grid) is
    scored on the LDS *selection* ground truth ``select_gt`` -- its masks and its queries only,
    never the test masks -- and the best is written. exact IF tunes its damping the same way
    (``baselines.exact_if.damping_grid``). The record (``attrs["tuning"]``: every setting's
    selection LDS and seconds, the choice, and ``on_edge`` when it sits at an end of a grid axis)
    goes into the scores file, for ``results/<experiment>/lds.csv`` and ``results/<experiment>/cost.md``.
    ``responses``: a limit or linearised method's shared responses file (:func:`reference_responses`).
    """
    from ..lds import on_edge

    if not is_method(method):
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(ALL_METHODS)} or trak_k<N>")
    t0 = time.perf_counter()
    problem = load_problem(cfg, split_path, theta0_path)
    log.info("%s on theta_0 (%d parameters): %d training examples, %d queries, measurement=%s",
             method, problem.num_params(), problem.n, problem.m, bcfg.measurement)
    grid = bcfg.grid(method) if method not in ("exact_if", *REFERENCE) else [{}]  # they tune their damping
    gt = None
    if len(grid) > 1:
        if select_gt is None:
            raise ValueError(f"baselines.tune.{method} has {len(grid)} settings but no selection ground truth "
                             "was given to choose among them (the rule's input 'select')")
        gt = read_selection(select_gt)
    table, best = [], None
    with workdir(out, method) as wd:
        for i, setting_ in enumerate(grid):
            t = time.perf_counter()
            try:
                scores, attrs = _one(method, problem, bcfg.with_setting(method, setting_), wd / f"s{i}", select_gt,
                                     responses)
                scores = check_scores(scores, problem.n, problem.m, method)
            except ValueError as exc:  # e.g. a singular solve: NaN scores at this setting
                if gt is None:
                    raise
                log.warning("%s %s: failed (%s), skipped", method, setting_, exc)
                table.append({**setting_, "lds_select": None, "failed": str(exc).splitlines()[0]})
                continue
            v = selection_lds(problem, scores, gt) if gt is not None else None
            table.append({**setting_, "lds_select": v, "seconds": time.perf_counter() - t})
            if gt is not None:
                log.info("%s %s: selection LDS %.4f (%.1f s)", method, setting_, v, table[-1]["seconds"])
            if best is None or (v is not None and v > best[0]):
                best = (v, setting_, scores, attrs)
    if best is None:
        raise ValueError(f"{method}: every setting of baselines.tune.{method} failed; see the log")
    _, chosen, scores, attrs = best
    if gt is not None:
        base = base_method(method)[0]
        edge = any(on_edge(list((bcfg.tune or {})[base][k]), v) and not at_bound(base, k, v, problem)
                   for k, v in chosen.items())
        if edge:
            log.warning("%s: the chosen %s is at an end of a baselines.tune.%s axis; a wider grid might do "
                        "better", method, chosen, method)
        attrs = {**attrs, "tuning": {"selected": chosen, "on_edge": edge, "grid": table,
                                     "selected_on": "select masks and select queries",
                                     "budget": bcfg.max_settings}}
    attrs = {"measurement": bcfg.measurement, **attrs, "seconds_in_process": time.perf_counter() - t0}
    write_result(out, scores, problem, method, attrs)
    log.info("%s: wrote %s (%s)", method, out, json.dumps({k: v for k, v in attrs.items()
                                                            if not isinstance(v, (list, dict))}))
    return attrs


def reference_responses(key: str, cfg: ExperimentConfig, bcfg: BaselinesConfig, split_path, theta0_path,
                        out) -> None:
    """The linear responses that the limit and linearised methods of ``key`` share
    (:func:`.limits.linear_responses`: one curvature and one solve per damping for all of them),
    written to ``out`` for their jobs to read."""
    from .limits import linear_responses, write_responses

    problem = load_problem(cfg, split_path, theta0_path)
    t0 = time.perf_counter()
    r = linear_responses(key, problem, bcfg)
    write_responses(out, r)
    log.info("%s responses at %d dampings (%d positive definite): %.1f s", key, len(r["dampings"]),
             int(r["ok"].sum()), time.perf_counter() - t0)


def _one(method: str, problem, bcfg: BaselinesConfig, wd, select_gt, responses=None) -> tuple[Any, dict]:
    """One setting of one method: (scores [n, m], attributes)."""
    wd.mkdir(parents=True, exist_ok=True)
    method = base_method(method)[0]
    if method == "trak":
        from .trak import trak_scores

        return trak_scores(problem, bcfg, wd)
    if method == "trak_ens":
        from .trak import trak_ensemble_scores

        return trak_ensemble_scores(problem, bcfg, wd)
    if method == "ekfac":
        from .kronfluence_ekfac import ekfac_scores

        return ekfac_scores(problem, bcfg, wd)
    if method in ("graddot", "tracin", "logra", "if_iter"):
        from . import dattri_methods as D

        return getattr(D, f"{method}_scores")(problem, bcfg, wd)
    if method == "exact_if_corr":
        from .exact import exact_if_scores

        return exact_if_scores(problem, bcfg, select_gt=select_gt, measure="correlation")
    if method in REFERENCE:
        from .limits import reference_scores

        return reference_scores(method, problem, bcfg, select_gt=select_gt, responses=responses)
    from .exact import exact_if_scores

    return exact_if_scores(problem, bcfg, select_gt=select_gt)
