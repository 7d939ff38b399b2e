"""API-based perturbed fits (Section 5, "API-based black-box access"): upload, launch, wait, adopt.

For each entry (``theta0`` or perturbed model ``k``) :func:`run_finetunes` makes sure that exactly
one successful fine-tuning job exists and records its model in the :class:`~.manifest.Manifest`;
a crash, a lost response or a rerun adopts what exists and never launches or bills a job twice.
:class:`daunce_core.fit.endpoint.APIFitter` calls it. The endpoint's supervised loss on ``D^k`` is
the black-box objective (Table 2, Hessian form). How creation is guarded:
docs/trust.md#fine-tuning-jobs-are-launched-once-daunce_coreblackboxfinetunepy."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .client import APIClient, BlackboxError
from .config import FinetuneConfig
from .manifest import Manifest

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
AUTO_EPOCHS = 3  # what the spend estimate assumes for n_epochs "auto"


@dataclass
class FinetuneSpec:
    """One fine-tune to obtain: examples are chat conversations ending with the assistant target."""

    name: str
    base_model: str
    examples: Sequence[dict]  # {"messages": [...]} rows
    hyperparameters: dict = field(default_factory=dict)  # batch_size, learning_rate_multiplier, n_epochs
    seed: int | None = None

    def jsonl(self) -> bytes:
        return "".join(json.dumps({"messages": ex["messages"]}, ensure_ascii=False) + "\n"
                       for ex in self.examples).encode()


def _job_dict(job: Any) -> dict:
    err = getattr(job, "error", None)
    if err is not None and not isinstance(err, dict):
        err = {"code": getattr(err, "code", None), "message": getattr(err, "message", None)}
    return {"id": job.id, "status": job.status, "model": job.fine_tuned_model,
            "trained_tokens": getattr(job, "trained_tokens", None), "error": err}


class _Runner:
    def __init__(self, client: APIClient, manifest: Manifest, settings: FinetuneConfig,
                 sleep: Callable[[float], None]):
        self.c, self.m, self.s, self.sleep = client, manifest, settings, sleep
        self._remote_files: list | None = None
        self._held: dict[str, float] = {}  # spend reserved per job in flight (client.meter)

    # --- files --------------------------------------------------------------------------------
    def ensure_file(self, spec: FinetuneSpec) -> str:
        data = spec.jsonl()
        sha = hashlib.sha256(data).hexdigest()
        e = self.m.entry(spec.name)
        f = e.get("file") or {}
        if f.get("id") and f.get("sha256") == sha:
            return f["id"]
        filename = f"daunce-{self.m.run_id}-{spec.name}.jsonl"
        if self._remote_files is None:
            self._remote_files = self.c.list_files("fine-tune")
        for obj in self._remote_files:
            if obj.filename == filename and int(obj.bytes or -1) == len(data):
                log.info("%s: reusing uploaded file %s", spec.name, obj.id)
                self.m.update(spec.name, file={"id": obj.id, "sha256": sha, "filename": filename, "bytes": len(data)})
                return obj.id
        obj = self.c.upload(filename, data, before_retry=lambda: self._find_upload(filename, len(data)))
        log.info("%s: uploaded %s (%d examples, %d bytes)", spec.name, obj.id, len(spec.examples), len(data))
        self.m.update(spec.name, file={"id": obj.id, "sha256": sha, "filename": filename, "bytes": len(data)})
        self._wait_processed(spec.name, obj)
        return obj.id

    def _find_upload(self, filename: str, size: int):
        """An upload whose response was lost: the endpoint's file of that name and size, if any."""
        return next((o for o in self.c.list_files("fine-tune") if o.filename == filename
                     and int(o.bytes or -1) == size), None)

    def _wait_processed(self, name: str, obj: Any) -> None:
        """Hosted endpoints validate an upload before a job may use it."""
        t0 = time.monotonic()
        while getattr(obj, "status", "processed") not in ("processed", None):
            if obj.status == "error":
                raise BlackboxError(f"{name}: the endpoint rejected training file {obj.id}: "
                                    f"{getattr(obj, 'status_details', '')}")
            if time.monotonic() - t0 > 3600:
                raise BlackboxError(f"{name}: file {obj.id} still '{obj.status}' after an hour; rerun later")
            self.sleep(min(self.s.poll_interval_s, 10.0))
            obj = self.c.retrieve_file(obj.id)

    # --- jobs ---------------------------------------------------------------------------------
    def _meta(self, spec: FinetuneSpec, attempt: int) -> dict[str, str]:
        return {"daunce_run": self.m.run_id, "daunce_entry": spec.name, "daunce_attempt": str(attempt)}

    def find_remote(self, spec: FinetuneSpec, attempt: int):
        jobs = self.c.list_jobs(metadata=self._meta(spec, attempt))
        return jobs[0] if jobs else None

    def launch(self, spec: FinetuneSpec) -> None:
        e = self.m.entry(spec.name)
        attempt = int((e.get("job") or {}).get("attempt", 0))
        if (e.get("job") or {}).get("state") != "creating":
            attempt += 1
        file_id = self.ensure_file(spec)
        self.m.update(spec.name, job={"state": "creating", "attempt": attempt, "id": None, "status": None,
                                      "requested_at": time.time()})
        found = self.find_remote(spec, attempt)
        if found is None:
            kw: dict[str, Any] = dict(
                model=spec.base_model, training_file=file_id, metadata=self._meta(spec, attempt),
                suffix=f"{self.m.run_id[:6]}-{spec.name}"[:40],
                method={"type": "supervised", "supervised": {"hyperparameters": dict(spec.hyperparameters)}})
            if spec.seed is not None:
                kw["seed"] = int(spec.seed)
            if self.c.meter is not None:  # the cap is checked before the job is created
                ep = spec.hyperparameters.get("n_epochs", "auto")
                ep = AUTO_EPOCHS if ep == "auto" else int(ep)
                tokens = sum(self.c.meter.te.messages(ex["messages"]) for ex in spec.examples) * ep
                self._held[spec.name] = self.c.meter.reserve(f"fine-tuning job {spec.name}", spec.base_model,
                                                             training=tokens)
            job = self.c.create_job(before_retry=lambda: self.find_remote(spec, attempt), **kw)
            log.info("%s: created job %s (attempt %d)", spec.name, job.id, attempt)
        else:
            job = found
            log.info("%s: adopted job %s found on the endpoint (attempt %d)", spec.name, job.id, attempt)
        self.m.update(spec.name, job={"state": "created", **_job_dict(job), "attempt": attempt})

    def refresh(self, spec: FinetuneSpec) -> str:
        """Poll the entry's job; record changes; return its status."""
        e = self.m.entry(spec.name)
        job = self.c.retrieve_job(e["job"]["id"])
        d = _job_dict(job)
        if d["status"] != e["job"].get("status"):
            log.info("%s: job %s %s", spec.name, job.id, d["status"])
            self.m.update(spec.name, job=d)
        if d["status"] in TERMINAL:
            self.m.record_job(spec.name, d, base_model=spec.base_model, attempt=int(e["job"].get("attempt", 1)))
            if self.c.meter is not None:
                self.c.meter.settle(self._held.pop(spec.name, 0.0), spec.base_model,
                                    training=int(d["trained_tokens"] or 0) if d["status"] == "succeeded" else 0)
        if d["status"] == "succeeded":
            if not d["model"]:
                raise BlackboxError(f"{spec.name}: job {job.id} succeeded without a fine_tuned_model")
            self.m.update(spec.name, model=d["model"], trained_tokens=d["trained_tokens"], finished_at=time.time())
        elif d["status"] in ("failed", "cancelled"):
            self.m.append(spec.name, "failed_jobs", d)
        return d["status"]


def run_finetunes(client: APIClient, manifest: Manifest, specs: Sequence[FinetuneSpec],
                  settings: FinetuneConfig | None = None, *, sleep: Callable[[float], None] = time.sleep,
                  on_progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Make sure every spec has a finished fine-tuned model; return ``{name: model id}``.

    ``settings`` is the ``blackbox.finetune`` section (its ``hyperparameters`` are the specs'
    business, not read here). Safe to call again after any crash: see docs/trust.md.
    """
    s = settings or FinetuneConfig()
    max_wait_s = s.max_wait_h * 3600.0
    r = _Runner(client, manifest, s, sleep)
    names = [sp.name for sp in specs]
    if len(set(names)) != len(names):
        raise ValueError("fine-tune entry names must be unique")
    by_name = {sp.name: sp for sp in specs}
    done: dict[str, str] = {}
    failed: dict[str, str] = {}
    pending: list[str] = []
    active: list[str] = []
    for sp in specs:
        e = manifest.entry(sp.name)
        if e.get("model"):
            done[sp.name] = e["model"]
        elif (e.get("job") or {}).get("id") and (e["job"].get("status") not in ("failed", "cancelled")):
            active.append(sp.name)  # adopt: it may still be running, or have finished meanwhile
        else:
            pending.append(sp.name)
    if done:
        log.info("%d of %d fine-tunes already finished (manifest %s)", len(done), len(specs), manifest.path)
    t0 = time.monotonic()
    while pending or active:
        while pending and len(active) < max(1, s.max_active):
            name = pending.pop(0)
            e = manifest.entry(name)
            attempts = int((e.get("job") or {}).get("attempt", 0))
            creating = (e.get("job") or {}).get("state") == "creating"
            if not creating and attempts >= s.max_attempts:
                failed[name] = json.dumps((e.get("failed_jobs") or [{}])[-1].get("error"))
                continue
            r.launch(by_name[name])
            active.append(name)
        still = []
        for name in active:
            st = r.refresh(by_name[name])
            if st == "succeeded":
                done[name] = manifest.entry(name)["model"]
            elif st in ("failed", "cancelled"):
                log.warning("%s: job %s", name, st)
                pending.append(name)
            else:
                still.append(name)
        active = still
        if on_progress is not None:
            on_progress(len(done), len(specs))
        if not (pending or active):
            break
        if time.monotonic() - t0 > max_wait_s:
            raise BlackboxError(
                f"fine-tunes still running after {max_wait_s:.0f} s ({len(active)} active, {len(pending)} "
                f"waiting); they are recorded in {manifest.path} and a rerun adopts them")
        if active:
            sleep(s.poll_interval_s)
    if failed:
        raise BlackboxError(
            f"{len(failed)} fine-tune(s) failed after {s.max_attempts} attempt(s): "
            + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5])
            + f". The {len(done)} finished model(s) are kept in {manifest.path}; fix the cause and rerun "
              "(raise blackbox.finetune.max_attempts to retry failed entries)")
    return {n: done[n] for n in names}
