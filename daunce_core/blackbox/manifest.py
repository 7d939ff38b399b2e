"""The manifest of a black-box run: what was uploaded, launched and finished, per entry.

A JSON file rewritten atomically after every state change, in an order that makes reruns safe (a
job is marked ``"creating"`` before it is created and adopted by its metadata if the response was
lost); it also keeps the run's spend ledger (each job counted once) and the fingerprint of the
settings, so a rerun with other settings is refused. :mod:`.finetune`, the black-box fitters and
steps use it. The order of writes, the ledger and the fingerprint:
docs/trust.md#the-manifest-of-a-black-box-run-daunce_coreblackboxmanifestpy."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..store import atomic_path


class ManifestError(RuntimeError):
    """The manifest cannot be used (unreadable, or written for other settings)."""


def fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def _check_layout(path: Path, data: Any) -> None:
    """Refuse JSON that is not a manifest (an array, or an object without its keys) before any
    key is read: a KeyError later, mid-run, would name neither the file nor the key."""
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(data), "null")
        raise ManifestError(f"{path}: not a daunce manifest (a JSON {kind}, not an object); it may record paid "
                            "jobs -- repair or move it away deliberately, it is never overwritten automatically")
    bad = [k for k, t in (("run_id", str), ("fingerprint", dict), ("entries", dict)) if not isinstance(data.get(k), t)]
    if bad:
        raise ManifestError(f"{path}: not a daunce manifest (missing or malformed: {', '.join(bad)}); it may record "
                            "paid jobs -- repair or move it away deliberately, it is never overwritten automatically")


class Manifest:
    """A JSON manifest at ``path`` bound to ``fingerprint``; thread-safe; every change is durable."""

    VERSION = 1

    def __init__(self, path: str | os.PathLike, fingerprint: dict):
        self.path = Path(path)
        self._lock = threading.RLock()
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except ValueError as exc:
                raise ManifestError(f"{self.path}: not valid JSON ({exc}); it records paid jobs -- repair or "
                                    "move it away deliberately, it is never overwritten automatically") from exc
            _check_layout(self.path, data)
            old = data.get("fingerprint")
            if old != fingerprint:
                keys = sorted(k for k in set(old or {}) | set(fingerprint) if (old or {}).get(k) != fingerprint.get(k))
                raise ManifestError(
                    f"{self.path} belongs to a run with different settings (differs in: {', '.join(keys)}). "
                    "Its jobs and models are kept; to start a new run use another experiment name, or move "
                    "the manifest away if you really mean to discard that record")
            self.data = data
        else:
            self.data = {"version": self.VERSION, "run_id": fingerprint_id(fingerprint),
                         "fingerprint": fingerprint, "created_at": time.time(), "entries": {}, "usage": {}}
            self._write()

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    def _write(self) -> None:
        text = json.dumps(self.data, indent=1, sort_keys=True)
        with atomic_path(self.path, suffix=".json.tmp") as tmp:
            with open(tmp, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())

    def entry(self, name: str) -> dict:
        with self._lock:
            return copy.deepcopy(self.data["entries"].get(name, {}))

    def entries(self) -> dict[str, dict]:
        with self._lock:
            return copy.deepcopy(self.data["entries"])

    def update(self, name: str, **fields: Any) -> dict:
        """Merge ``fields`` into entry ``name`` (nested dicts are merged one level) and persist."""
        with self._lock:
            e = self.data["entries"].setdefault(name, {})
            if e.get("model") and "model" in fields and fields["model"] != e["model"]:
                raise ManifestError(f"{self.path}: entry {name} already has finished model {e['model']}; "
                                    f"refusing to replace it with {fields['model']}")
            for k, v in fields.items():
                if isinstance(v, dict) and isinstance(e.get(k), dict):
                    e[k].update(v)
                else:
                    e[k] = v
            e["updated_at"] = time.time()
            self._write()
            return copy.deepcopy(e)

    def append(self, name: str, key: str, item: Any) -> None:
        with self._lock:
            self.data["entries"].setdefault(name, {}).setdefault(key, []).append(item)
            self._write()

    def record_job(self, entry: str, job: dict, *, base_model: str, attempt: int) -> bool:
        """Enter finished ``job`` (``id``, ``status``, ``trained_tokens``) of ``entry`` in the spend
        ledger, once per job id; return whether it was new. Billed: status ``succeeded`` only."""
        with self._lock:
            ledger = self.data.setdefault("ledger", {})
            if job["id"] in ledger:
                return False
            billed = job["status"] == "succeeded"
            ledger[job["id"]] = {"entry": entry, "attempt": int(attempt), "base_model": base_model,
                                 "status": job["status"], "billed": billed,
                                 "trained_tokens": int(job.get("trained_tokens") or 0) if billed else 0,
                                 "recorded_at": time.time()}
            self._write()
            return True

    def ledger(self) -> dict[str, dict]:
        """The spend ledger: job id -> row (see :meth:`record_job`)."""
        with self._lock:
            return copy.deepcopy(self.data.get("ledger", {}))

    def set_spend(self, spend: dict) -> None:
        """Record the priced ledger (``cost.ledger_items``) next to it."""
        with self._lock:
            self.data["spend"] = spend
            self._write()

    def set_usage(self, stage: str, usage: dict) -> None:
        with self._lock:
            self.data.setdefault("usage", {})[stage] = usage
            self._write()
