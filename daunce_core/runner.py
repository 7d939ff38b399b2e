"""Glue between Snakemake's ``script:`` directive and the library: logging, threads, errors."""
from __future__ import annotations

import logging
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from .store import Terminated, cleanup_on_signals
from .utils import set_threads

log = logging.getLogger("daunce")


def experiment_config(snakemake: Any):
    """The validated :class:`~daunce_core.config.ExperimentConfig` of a Snakemake job."""
    from .config import ExperimentConfig

    return ExperimentConfig.from_dict(dict(snakemake.config)).validate()


def run_script(snakemake: Any, main: Callable[[Any], None]) -> None:
    """Run ``main(snakemake)`` with logging to the rule's log file and one-line errors.

    The full traceback goes to the log file; stderr gets one line naming the rule, the error and
    the log path, and the process exits non-zero so Snakemake marks the job failed (and removes
    its outputs).

    The job runs inside :func:`daunce_core.store.cleanup_on_signals`: the SIGTERM that Snakemake,
    ``scancel`` or a SLURM time limit sends unwinds the job at once, so every open atomic write
    removes its temporary file (no gigabytes of ``.daunce-tmp-`` files left beside the outputs),
    and the process exits with 128 + the signal number, as if killed by it.
    """
    log_path = snakemake.log[0] if len(snakemake.log) else None
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    logging.captureWarnings(True)
    set_threads(getattr(snakemake, "threads", 1))
    rule = getattr(snakemake, "rule", "?")
    try:
        with cleanup_on_signals():
            main(snakemake)
    except (Terminated, KeyboardInterrupt) as exc:  # temporaries are already gone: say so, exit
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        log.error("rule %s: %s; its temporary files were removed", rule,
                  exc if isinstance(exc, Terminated) else "interrupted (SIGINT)")
        sys.exit(128 + int(signum))
    except Exception as exc:  # one clear line for the user, the traceback for the log
        log.debug("traceback:\n%s", traceback.format_exc())
        if log_path:
            with open(log_path, "a") as fh:
                fh.write(traceback.format_exc())
        print(f"daunce: rule {rule} failed: {type(exc).__name__}: {exc}"
              + (f" (log: {log_path})" if log_path else ""), file=sys.stderr)
        sys.exit(1)
