"""TRAK (Park et al., 2023) through the authors' ``traker`` package: one model, or an ensemble.

``trak`` runs traker's ``image_classification`` task (margin features and targets, ``Q = 1 - p``)
on the single theta_0 as in the paper (Appendix B); ``trak_ens`` sums traker's scores over seeds
or checkpoints, as its authors run it. :func:`daunce_core.baselines.run_baseline` calls both.
traker's pitfalls handled here (half precision on CPU, singular ``XᵀX``, a lost projector):
docs/design.md#daunce_corebaselinestrakpy-trak-through-traker."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from .common import BaselinesConfig, Problem, dir_bytes

log = logging.getLogger(__name__)


def _fix_projector(traker) -> None:
    """traker 0.3.2 bug: ``finalize_features`` frees a ``BasicProjector``'s matrix, and with a single
    block (``proj_dim <= block_size``, 100) ``project`` then uses the freed matrix
    (AttributeError while scoring). Give the projector a ``project`` that regenerates it first --
    the same seeded matrix, so nothing else changes."""
    from trak.projectors import BasicProjector

    if type(traker.projector) is not BasicProjector:
        return

    class _BasicProjector(BasicProjector):
        def project(self, grads, model_id):
            if self.num_blocks == 1 and not self.proj_matrix_available:
                self.generate_sketch_matrix(self.generator_states[0])
            return super().project(grads, model_id)

    traker.projector.__class__ = _BasicProjector


def _set_block_size(traker, block_size: int) -> None:
    """Give a ``BasicProjector`` (traker's projector on CPU, or on a GPU without ``fast_jl``) another
    block size: it regenerates its random matrix ``block_size`` columns at a time for every batch
    it projects, so with ``block_size >= proj_dim`` the matrix is drawn once per model instead of
    ``proj_dim / block_size`` times per batch. Same seed, projection type and dtype as traker's;
    the draw itself depends on the block size (each block has its own seed)."""
    from trak.projectors import BasicProjector

    old = traker.projector
    if type(old) is not BasicProjector or old.block_size == min(old.proj_dim, block_size):
        return
    traker.projector = BasicProjector(grad_dim=old.grad_dim, proj_dim=old.proj_dim, seed=old.seed,
                                      proj_type=old.proj_type, device=old.device, block_size=block_size,
                                      dtype=old.dtype, model_id=old.model_id)


def _traker_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path, states: list[dict], proj_dim: int,
                   seed: int, lambda_reg: float, half_precision: bool, block_size: int = 100):
    """traker over ``states`` (model ids 0..len-1): featurize the training set and score the
    queries with every model; traker sums the models' scores."""
    from trak import TRAKer

    if proj_dim > problem.n and lambda_reg <= 0:
        log.warning("trak: proj_dim=%d exceeds the %d training examples; XᵀX is singular without "
                    "lambda_reg > 0", proj_dim, problem.n)
    device = "cpu" if problem.device.type == "cpu" else str(problem.device)
    model = copy.deepcopy(problem.model).eval()
    traker = TRAKer(model=model, task="image_classification", train_set_size=problem.n,
                    save_dir=str(workdir / "trak"), device=device,
                    proj_dim=proj_dim, use_half_precision=half_precision, projector_seed=seed,
                    lambda_reg=lambda_reg, logging_level=logging.WARNING)
    _set_block_size(traker, block_size)
    _fix_projector(traker)
    for i, state in enumerate(states):
        traker.load_checkpoint(state, model_id=i)
        for x, y in problem.loader("train", bcfg.batch_size):
            traker.featurize(batch=(x, y), num_samples=len(y))
    traker.finalize_features()
    for i, state in enumerate(states):
        traker.start_scoring_checkpoint(exp_name="queries", checkpoint=state, model_id=i, num_targets=problem.m)
        for x, y in problem.loader("query", bcfg.batch_size):
            traker.score(batch=(x, y), num_samples=len(y))
    scores = np.array(traker.finalize_scores(exp_name="queries"), dtype=np.float32)
    return scores, traker


def trak_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path) -> tuple[np.ndarray, dict]:
    import trak as _trak
    from trak.projectors import BasicProjector

    tc = bcfg.trak
    state = {k: v.detach().clone() for k, v in problem.model.state_dict().items()}
    scores, traker = _traker_scores(problem, bcfg, workdir, [state], tc.proj_dim, tc.seed, tc.lambda_reg,
                                    tc.half_precision, tc.block_size)
    disk = dir_bytes(workdir)
    projector = "BasicProjector" if isinstance(traker.projector, BasicProjector) else type(traker.projector).__name__
    itemsize = 2 if tc.half_precision else 4
    # what TRAK keeps per training example to score new queries: its projected feature
    # x (XᵀX)^-1 (proj_dim numbers) and the out-to-loss weight Q (one number)
    per_example = (tc.proj_dim + 1) * itemsize
    return scores, {
        "library": f"traker {getattr(_trak, '__version__', '?')}",
        "proj_dim": tc.proj_dim, "projector_seed": tc.seed, "lambda_reg": tc.lambda_reg,
        "half_precision": tc.half_precision, "ensemble": 1,
        "projector": projector,
        **({"block_size": traker.projector.block_size} if projector == "BasicProjector" else {}),
        "bytes_per_example": per_example,
        "shared_bytes": 0,
        "disk_bytes": disk,
        "storage": f"projected feature ({tc.proj_dim} x {itemsize} B) + out-to-loss weight per example; "
                   f"traker's own store held {disk / problem.n:.0f} B per example (gradients and features)",
    }


def ensemble_states(problem: Problem, models: int, source: str) -> tuple[list[dict], dict]:
    """theta_0 and ``models - 1`` more: trained from scratch by the base recipe with other seeds
    (vmapped together), or checkpoints of theta_0's replayed training; kept in ``problem.cache``."""
    key = ("trak_ens", models, source)
    if key in problem.cache:
        return problem.cache[key]
    if source == "checkpoints":
        from .dattri_methods import replay_checkpoints

        states, _, info = replay_checkpoints(problem, models)
        out = (states, {"ensemble_source": "checkpoints of theta_0's training", **info})
    else:
        from .. import ensemble as E
        from ..models import model_factory

        cfg, ds = problem.cfg, problem.ds
        states = [{k: v.detach().clone() for k, v in problem.model.state_dict().items()}]
        if models > 1:
            X, y = problem.tensors("train")
            # keys of their own (the base rule's theta_0 is perturb.theta0_key(seed); LDS retrains end in 7)
            keys = [(cfg.base.seed, j, 0, 13) for j in range(1, models)]
            _, params, buffers = E.fit_from_scratch(model_factory(cfg.model, ds.X_train.shape[1:], ds.num_classes),
                                                    X, y, [np.arange(ds.n)] * len(keys), keys, cfg.base,
                                                    augment=cfg.base.augment)
            for j in range(len(keys)):
                states.append({k: v[j].detach().clone().to(problem.device)
                               for k, v in {**params, **buffers}.items()})
        out = (states, {"ensemble_source": f"theta_0 + {models - 1} models trained from scratch (other seeds)"})
    problem.cache[key] = out
    return out


def trak_ensemble_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path) -> tuple[np.ndarray, dict]:
    import trak as _trak

    tc = bcfg.trak_ens
    states, info = ensemble_states(problem, tc.models, tc.source)
    scores, traker = _traker_scores(problem, bcfg, workdir, states, tc.proj_dim, tc.seed, tc.lambda_reg,
                                    tc.half_precision, tc.block_size)
    itemsize = 2 if tc.half_precision else 4
    return scores, {
        "library": f"traker {getattr(_trak, '__version__', '?')}",
        "proj_dim": tc.proj_dim, "projector_seed": tc.seed, "lambda_reg": tc.lambda_reg,
        "half_precision": tc.half_precision, "ensemble": len(states), **info,
        **({"block_size": traker.projector.block_size} if hasattr(traker.projector, "block_size") else {}),
        "bytes_per_example": len(states) * (tc.proj_dim + 1) * itemsize,
        "shared_bytes": 0, "disk_bytes": dir_bytes(workdir),
        "storage": f"{len(states)} models x (projected feature ({tc.proj_dim} x {itemsize} B) + out-to-loss weight) "
                   "per example",
    }
