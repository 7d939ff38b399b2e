"""Every file daunce reads or writes: HDF5 layouts joined on ids, atomic writes, model states.

The public interface of the package; every other module imports from here. By concern:
``atomic`` (temporaries renamed into place, outputs that would destroy something refused),
``layouts`` (the table of each HDF5 layout and the reader, writer and gatherer that walk it),
``files`` (each layout's read/write/gather functions), ``ids`` (joins on example ids) and
``records`` (model states, the recorded split). The losses, scores and ground-truth layouts:
docs/design.md#daunce_corestore-the-file-layouts."""
from __future__ import annotations

from . import atomic, files, ids, layouts, records
from .atomic import (
    Terminated,
    atomic_h5,
    atomic_path,
    check_output,
    clean_leftovers,
    cleanup_on_signals,
    raise_pending_signal,
)
from .errors import StoreError
from .files import (
    Losses,
    check_topk,
    concat_ground_truth,
    concat_losses,
    dense_scores,
    is_diverged,
    read_ground_truth,
    read_losses,
    read_scores,
    refuse_diverged_file,
    write_diverged,
    write_ground_truth,
    write_losses,
    write_scores,
)
from .ids import Join, align_losses, align_scores, is_positional, join, match_ids
from .layouts import (
    DENSE_SCORES,
    DIVERGED,
    GROUND_TRUTH,
    LOSSES,
    TOPK_SCORES,
    VERSION,
    check_finite,
    describe_dtype,
    example_ids,
    number_dtype,
    open_h5,
    read_attrs,
    read_numbers,
    reading,
    require,
)
from .records import check_split, load_state, save_split, save_state

__all__ = [
    "atomic", "files", "ids", "layouts", "records",
    "StoreError", "check_output", "clean_leftovers", "cleanup_on_signals", "Terminated",
    "raise_pending_signal", "atomic_path", "atomic_h5",
    "Losses", "write_losses", "read_losses", "concat_losses", "write_diverged", "is_diverged",
    "refuse_diverged_file",
    "write_scores", "read_scores", "dense_scores", "check_topk",
    "write_ground_truth", "read_ground_truth", "concat_ground_truth",
    "check_finite", "match_ids", "join", "Join", "align_scores", "align_losses", "is_positional",
    "VERSION", "LOSSES", "DENSE_SCORES", "TOPK_SCORES", "GROUND_TRUTH", "DIVERGED",
    "open_h5", "reading", "require", "number_dtype", "read_numbers", "read_attrs", "example_ids",
    "describe_dtype",
    "save_state", "load_state", "save_split", "check_split",
]
