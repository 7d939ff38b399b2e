"""The EK-FAC influence function (Grosse et al., 2023) through ``kronfluence``.

As in the DAUNCE paper (Appendix B): EK-FAC factors of the empirical Fisher on every layer
kronfluence supports, the task written as kronfluence's CIFAR-10 example writes it, scores
transposed to our [n, m] with positive = helpful. :func:`daunce_core.baselines.run_baseline`
calls it. Task, damping and seeding:
docs/design.md#daunce_corebaselineskronfluence_ekfacpy-ek-fac-through-kronfluence."""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np

from .common import BaselinesConfig, Problem, dir_bytes, query_value, train_loss

log = logging.getLogger(__name__)


def _task(measurement: str):
    import torch
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return train_loss(logits, y).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            x, y = batch
            return query_value(model(x), y, measurement).sum()

    return ClassificationTask()


def ekfac_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path) -> tuple[np.ndarray, dict]:
    import kronfluence
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    ec = bcfg.ekfac
    model = copy.deepcopy(problem.model).eval()
    task = _task(bcfg.measurement)
    model = prepare_model(model, task)
    tracked = [n for n, mod in model.named_modules() if type(mod).__name__.startswith("Tracked")]
    # the factors do not depend on the damping: a damping grid fits them once (problem.cache)
    fkey = ("ekfac_factors", ec.strategy, ec.empirical_fisher, bcfg.batch_size)
    fitted = problem.cache.get(fkey)  # (folder, bytes of the factors)
    out_dir = fitted[0] if fitted else workdir
    analyzer = Analyzer(analysis_name="daunce", model=model, task=task, cpu=problem.device.type == "cpu",
                        output_dir=str(out_dir), disable_tqdm=True, disable_model_save=True,
                        log_level=logging.WARNING)
    Xtr, ytr = problem.tensors("train")
    Xq, yq = problem.tensors("query")
    train = torch.utils.data.TensorDataset(Xtr, ytr)
    query = torch.utils.data.TensorDataset(Xq, yq)
    torch.manual_seed(0)  # the true Fisher samples labels
    factor_args = FactorArguments(strategy=ec.strategy, use_empirical_fisher=ec.empirical_fisher)
    score_args = ScoreArguments(damping_factor=ec.damping)
    with warnings.catch_warnings():
        # kronfluence 1.0.1 builds a disabled torch.cuda.amp.GradScaler, deprecated in torch 2.x
        warnings.filterwarnings("ignore", message=r".*GradScaler.*is deprecated", category=FutureWarning)
        if fitted is None:
            analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=bcfg.batch_size,
                                     factor_args=factor_args, overwrite_output_dir=True)
            problem.cache[fkey] = (workdir, dir_bytes(workdir))
        factor_bytes = problem.cache[fkey][1]
        analyzer.compute_pairwise_scores(scores_name="ekfac", factors_name="ekfac", query_dataset=query,
                                         train_dataset=train, per_device_query_batch_size=bcfg.batch_size,
                                         per_device_train_batch_size=bcfg.batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
    qt = analyzer.load_pairwise_scores("ekfac")["all_modules"]  # [n_query, n_train]
    scores = qt.detach().cpu().numpy().T
    return scores, {
        "library": f"kronfluence {getattr(kronfluence, '__version__', '?')}",
        "strategy": ec.strategy, "empirical_fisher": ec.empirical_fisher,
        "damping": "heuristic (0.1 x mean eigenvalue)" if ec.damping is None else ec.damping,
        "tracked_modules": tracked,
        "bytes_per_example": 0,
        "shared_bytes": factor_bytes,
        "disk_bytes": dir_bytes(out_dir),
        "storage": "nothing per training example (training gradients are recomputed for every query "
                   f"batch); EK-FAC factors of {len(tracked)} layers stored once",
    }
