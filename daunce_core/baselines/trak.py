"""TRAK (Park et al., 2023) through the authors' ``traker`` package: one model, no ensemble.

As in the DAUNCE paper (Appendix B), TRAK runs on the single theta_0 -- its ensembling over
independently trained models is left out on purpose -- with the projection dimension from
``baselines.trak.proj_dim`` (the paper's 20,480 on CIFAR-10). The task is traker's own
``image_classification`` output: the margin ``log p / (1 - p)`` for both the training features
and the targets, with its out-to-loss reweighting ``Q = 1 - p``.

Pitfalls handled here (measured, see docs/facts.md): on a CPU traker uses its ``BasicProjector`` with a
normal projection, and ``use_half_precision=True`` (its default) ruins the scores on a CPU, so
``baselines.trak.half_precision`` defaults to false. ``XᵀX`` is singular when ``proj_dim`` exceeds
the number of training examples; ``lambda_reg`` (traker's ridge term) must then be positive.
traker 0.3.2 loses a single-block ``BasicProjector``'s matrix after ``finalize_features``
(``proj_dim <= 100``: AttributeError while scoring); :func:`_fix_projector` regenerates it.
traker's ``load_from_save_dir=False`` never creates ``experiments.json`` and fails while scoring,
so the adapter keeps the default and gives traker a fresh scratch folder instead.

traker's output is a memmap [n_train, n_target] whose positive entries mean "helpful": already our
layout and sign (tested).
"""
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


def trak_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path) -> tuple[np.ndarray, dict]:
    import trak as _trak
    from trak import TRAKer
    from trak.projectors import BasicProjector

    tc = bcfg.trak
    if tc.proj_dim > problem.n and tc.lambda_reg <= 0:
        log.warning("trak: proj_dim=%d exceeds the %d training examples; XᵀX is singular without "
                    "baselines.trak.lambda_reg > 0", tc.proj_dim, problem.n)
    device = "cpu" if problem.device.type == "cpu" else str(problem.device)
    model = copy.deepcopy(problem.model).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    traker = TRAKer(model=model, task="image_classification", train_set_size=problem.n,
                    save_dir=str(workdir / "trak"), device=device,
                    proj_dim=tc.proj_dim, use_half_precision=tc.half_precision, projector_seed=tc.seed,
                    lambda_reg=tc.lambda_reg, logging_level=logging.WARNING)
    _fix_projector(traker)
    traker.load_checkpoint(state, model_id=0)
    for x, y in problem.loader("train", bcfg.batch_size):
        traker.featurize(batch=(x, y), num_samples=len(y))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="queries", checkpoint=state, model_id=0, num_targets=problem.m)
    for x, y in problem.loader("query", bcfg.batch_size):
        traker.score(batch=(x, y), num_samples=len(y))
    scores = np.array(traker.finalize_scores(exp_name="queries"), dtype=np.float32)
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
        "bytes_per_example": per_example,
        "shared_bytes": 0,
        "disk_bytes": disk,
        "storage": f"projected feature ({tc.proj_dim} x {itemsize} B) + out-to-loss weight per example; "
                   f"traker's own store held {disk / problem.n:.0f} B per example (gradients and features)",
    }
