"""The state of a local server: its files, fine-tuning jobs and models, persisted under a folder.

:class:`ServerState` is everything the HTTP layer (:mod:`.http`) calls: it validates requests
the way OpenAI does (raising :class:`APIErrorResponse`, OpenAI's error shape), keeps a registry
(``registry.json``, rewritten atomically after every change) so that a restarted server finds its
files, jobs and models again, trains queued jobs one at a time in a background thread with
:func:`.model.train_chat`, and answers chat completions with :func:`.model.generate`. Test
*faults* (:mod:`.faults`) are decided by its :attr:`ServerState.injector`; the failed jobs they
ask for fail here. :meth:`ServerState.stop` writes the request and fault counts to ``stats.json``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import secrets
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .. import store
from . import model as lm
from .config import ServerConfig
from .faults import FaultInjector

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
MIN_TRAINING_EXAMPLES = 10  # as OpenAI requires


class APIErrorResponse(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

def _now() -> int:
    return int(time.time())


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ServerState:
    """Files, jobs and models of one server, persisted under ``state_dir``."""

    def __init__(self, cfg: ServerConfig):
        import torch
        from transformers.utils import logging as hf_logging

        from ..utils import pick_device

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.cfg = cfg
        self.dir = Path(cfg.state_dir)
        (self.dir / "files").mkdir(parents=True, exist_ok=True)
        (self.dir / "models").mkdir(parents=True, exist_ok=True)
        self.device = pick_device(cfg.device)
        self.train_settings = cfg.train
        self.lock = threading.RLock()
        self.injector = FaultInjector(cfg.faults)
        self.faults = self.injector.scripted  # tests append scripted faults here
        self._doomed: set[str] = set()  # jobs an injected fault makes fail
        self.stats: dict[str, int] = {}
        self._cache: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._load_lock = threading.Lock()
        self._queue: list[str] = []
        self._queue_cv = threading.Condition(self.lock)
        self._stopping = False
        self._cancel: set[str] = set()
        reg = self.dir / "registry.json"
        self.reg = json.loads(reg.read_text()) if reg.exists() else {"files": {}, "jobs": {}, "models": {}}
        for name, path in cfg.models.items():
            if not (Path(path) / "config.json").exists():
                raise FileNotFoundError(f"local server: base model {name!r}: no model saved at {path}")
            self.reg["models"][name] = {"path": str(Path(path).resolve()), "root": name, "created": _now(),
                                        "owned_by": "system"}
        for job in self.reg["jobs"].values():  # a restart resumes unfinished jobs from scratch
            if job["status"] in ("validating_files", "queued", "running"):
                job["status"] = "queued"
                self._queue.append(job["id"])
        self._save()
        torch.set_num_threads(max(1, int(cfg.threads)))
        self._worker = threading.Thread(target=self._work, name="fine-tuning", daemon=True)
        self._worker.start()

    # --- persistence ----------------------------------------------------------------------------
    def _save(self) -> None:
        with self.lock:
            text = json.dumps(self.reg, indent=1, sort_keys=True)
            with store.atomic_path(self.dir / "registry.json") as tmp:
                tmp.write_text(text)

    def count(self, key: str) -> None:
        with self.lock:
            self.stats[key] = self.stats.get(key, 0) + 1

    # --- models ---------------------------------------------------------------------------------
    def model_object(self, name: str) -> dict:
        m = self.reg["models"][name]
        return {"id": name, "object": "model", "created": m["created"], "owned_by": m["owned_by"]}

    def get_model(self, name: str):
        with self.lock:
            if name not in self.reg["models"]:
                raise APIErrorResponse(404, f"The model `{name}` does not exist or you do not have access to it.",
                                       code="model_not_found", param="model")
            path = self.reg["models"][name]["path"]
        with self._load_lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            pair = lm.load_model(path, self.device)
            self._cache[name] = pair
            while len(self._cache) > max(1, self.cfg.cache_models):
                self._cache.popitem(last=False)
            return pair

    # --- files ------------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, data: bytes) -> dict:
        fid = _new_id("file")
        (self.dir / "files" / fid).write_bytes(data)
        obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": _now(), "filename": filename,
               "purpose": purpose, "status": "processed", "status_details": None}
        with self.lock:
            self.reg["files"][fid] = obj
            self._save()
        return obj

    def get_file(self, fid: str) -> dict:
        with self.lock:
            if fid not in self.reg["files"]:
                raise APIErrorResponse(404, f"No such File object: {fid}", code=None, param="id")
            return dict(self.reg["files"][fid])

    def delete_file(self, fid: str) -> dict:
        self.get_file(fid)
        with self.lock:
            del self.reg["files"][fid]
            self._save()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "files" / fid).unlink()
        return {"id": fid, "object": "file", "deleted": True}

    # --- fine-tuning jobs -----------------------------------------------------------------------
    def create_job(self, body: dict) -> dict:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIErrorResponse(400, "Missing required parameter: 'model'.", param="model")
        with self.lock:
            if model not in self.reg["models"]:
                raise APIErrorResponse(404, f"Model {model} is not available for fine-tuning or does not exist.",
                                       code="model_not_available", param="model")
        fid = body.get("training_file")
        self.get_file(fid if isinstance(fid, str) else "")
        hp = dict(body.get("hyperparameters") or {})
        method = body.get("method") or {}
        if method:
            if method.get("type", "supervised") != "supervised":
                raise APIErrorResponse(400, "Only the 'supervised' fine-tuning method is supported locally.",
                                       param="method")
            hp.update(((method.get("supervised") or {}).get("hyperparameters")) or {})
        for key in hp:
            if key not in ("batch_size", "learning_rate_multiplier", "n_epochs"):
                raise APIErrorResponse(400, f"Unknown hyperparameter {key!r}.", param="hyperparameters")
        meta = body.get("metadata") or {}
        if not isinstance(meta, dict) or len(meta) > 16 or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise APIErrorResponse(400, "metadata must map at most 16 string keys to string values.",
                                   param="metadata")
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64):
            raise APIErrorResponse(400, "suffix must be a string of at most 64 characters.", param="suffix")
        hp = {"batch_size": hp.get("batch_size", "auto"),
              "learning_rate_multiplier": hp.get("learning_rate_multiplier", "auto"),
              "n_epochs": hp.get("n_epochs", "auto")}
        job = {"id": _new_id("ftjob"), "object": "fine_tuning.job", "model": model, "created_at": _now(),
               "finished_at": None, "fine_tuned_model": None, "organization_id": "org-" + self.cfg.owner,
               "result_files": [], "status": "validating_files", "validation_file": None, "training_file": fid,
               "hyperparameters": hp, "trained_tokens": None, "error": None,
               "seed": int(body["seed"]) if body.get("seed") is not None else secrets.randbelow(2**31),
               "metadata": meta or None, "suffix": suffix, "estimated_finish": None, "integrations": [],
               "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
               "events": [{"created_at": _now(), "level": "info", "message": "Created fine-tuning job"}]}
        with self.lock:
            if self.injector.job_fails():
                self._doomed.add(job["id"])
            self.reg["jobs"][job["id"]] = job
            self._queue.append(job["id"])
            self._save()
            self._queue_cv.notify_all()
        return self.public_job(job)

    @staticmethod
    def public_job(job: dict) -> dict:
        out = {k: v for k, v in job.items() if k not in ("events", "suffix")}
        return copy.deepcopy(out)

    def get_job(self, jid: str) -> dict:
        with self.lock:
            if jid not in self.reg["jobs"]:
                raise APIErrorResponse(404, f"Could not find fine tune: {jid}", code="fine_tune_not_found",
                                       param="fine_tune_id")
            return self.reg["jobs"][jid]

    def list_jobs(self, query: dict[str, str]) -> dict:
        meta = {k[len("metadata["):-1]: v for k, v in query.items() if k.startswith("metadata[") and k.endswith("]")}
        with self.lock:
            jobs = sorted(self.reg["jobs"].values(), key=lambda j: (j["created_at"], j["id"]), reverse=True)
            jobs = [j for j in jobs if all((j.get("metadata") or {}).get(k) == v for k, v in meta.items())]
            after = query.get("after")
            if after:
                ids = [j["id"] for j in jobs]
                jobs = jobs[ids.index(after) + 1:] if after in ids else []
            limit = int(query.get("limit", 20))
            page = jobs[:limit]
            return {"object": "list", "data": [self.public_job(j) for j in page], "has_more": len(jobs) > limit}

    def cancel_job(self, jid: str) -> dict:
        with self.lock:
            job = self.get_job(jid)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                raise APIErrorResponse(400, f"Job {jid} has already finished ({job['status']}).")
            self._cancel.add(jid)
            if job["status"] != "running":
                self._finish(job, "cancelled")
            return self.public_job(job)

    def _event(self, job: dict, message: str, level: str = "info") -> None:
        job["events"].append({"created_at": _now(), "level": level, "message": message})

    def _finish(self, job: dict, status: str, error: dict | None = None) -> None:
        job["status"], job["finished_at"], job["error"] = status, _now(), error
        self._event(job, f"Job {status}" + (f": {error['message']}" if error else ""),
                    "error" if status == "failed" else "info")
        self._save()

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self._queue_cv.notify_all()
            with contextlib.suppress(OSError), store.atomic_path(self.dir / "stats.json") as tmp:
                tmp.write_text(json.dumps(self.stats, indent=1, sort_keys=True))

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self._queue and not self._stopping:
                    self._queue_cv.wait()
                if self._stopping:
                    return
                jid = self._queue.pop(0)
                job = self.reg["jobs"].get(jid)
                if job is None or job["status"] not in ("validating_files", "queued"):
                    continue
            try:
                self._run_job(job)
            except InterruptedError:
                with self.lock:
                    if self._stopping:  # server shutting down: leave it for the next start
                        return
                    self._finish(job, "cancelled")
            except Exception as exc:  # the job fails, the server keeps serving
                log.warning("fine-tuning job %s failed: %s", jid, exc)
                log.debug("%s", traceback.format_exc())
                with self.lock:
                    self._finish(job, "failed", {"code": "training_failed", "message": str(exc), "param": None})

    def _run_job(self, job: dict) -> None:
        jid = job["id"]
        data = (self.dir / "files" / job["training_file"]).read_text()
        examples = []
        for ln, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                msgs = row["messages"]
                lm.render_chat(msgs)
            except (ValueError, KeyError, TypeError) as exc:
                with self.lock:
                    self._finish(job, "failed", {"code": "invalid_training_file", "param": "training_file",
                                                 "message": f"line {ln}: {exc}"})
                return
            examples.append(msgs)
        if len(examples) < MIN_TRAINING_EXAMPLES:
            with self.lock:
                self._finish(job, "failed", {"code": "invalid_training_file", "param": "training_file",
                                             "message": f"training file has {len(examples)} example(s); "
                                                        f"at least {MIN_TRAINING_EXAMPLES} are required"})
            return
        s = self.train_settings
        hp = job["hyperparameters"]
        bs = s.batch_size if hp["batch_size"] == "auto" else int(hp["batch_size"])
        ep = s.n_epochs if hp["n_epochs"] == "auto" else int(hp["n_epochs"])
        mult = 1.0 if hp["learning_rate_multiplier"] == "auto" else float(hp["learning_rate_multiplier"])
        with self.lock:
            job["status"] = "running"
            job["hyperparameters"] = {"batch_size": bs, "learning_rate_multiplier": mult, "n_epochs": ep}
            job["method"]["supervised"]["hyperparameters"] = dict(job["hyperparameters"])
            self._event(job, f"Fine-tuning started on {len(examples)} examples")
            self._save()
            parent = self.reg["models"][job["model"]]
            if jid in self._doomed:  # an injected fault: the job fails before training anything
                self._finish(job, "failed", {"code": "injected_fault", "param": None,
                                             "message": "the job failed (injected fault: local.faults.fail_jobs "
                                                        "or fail_job_share)"})
                return
        model, tok = lm.load_model(parent["path"], self.device)
        stats = lm.train_chat(model, tok, examples, n_epochs=ep, batch_size=bs,
                              learning_rate=s.learning_rate * mult, seed=job["seed"], settings=s,
                              should_stop=lambda: jid in self._cancel or self._stopping)
        out = self.dir / "models" / jid
        tmp = self.dir / "models" / f".{jid}.tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
        root = parent["root"]
        name = f"ft:{root}:{self.cfg.owner}:{job.get('suffix') or ''}:{jid[-8:]}"
        with self.lock:
            self.reg["models"][name] = {"path": str(out.resolve()), "root": root, "created": _now(),
                                        "owned_by": self.cfg.owner}
            job["fine_tuned_model"] = name
            job["trained_tokens"] = int(stats["trained_tokens"])
            self._event(job, f"final training loss {stats['final_loss']:.4f} after {stats['steps']} steps")
            self._finish(job, "succeeded")

    # --- chat completions -------------------------------------------------------------------------
    def chat(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIErrorResponse(400, "'messages' must be a non-empty array.", param="messages")
        if int(body.get("n") or 1) != 1:
            raise APIErrorResponse(400, "Only n=1 is supported by the local server.", param="n")
        top = int(body.get("top_logprobs") or 0)
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIErrorResponse(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}.",
                                   param="top_logprobs")
        want_lp = bool(body.get("logprobs"))
        if top and not want_lp:
            raise APIErrorResponse(400, "top_logprobs requires logprobs=true.", param="top_logprobs")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 64
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else float(temperature)
        model, tok = self.get_model(body.get("model", ""))
        try:
            gen = lm.generate(model, tok, messages, max_tokens=int(max_tokens), temperature=temperature,
                              top_logprobs=top, seed=body.get("seed"), max_len=self.train_settings.max_len)
        except lm.ContextLengthError as exc:
            raise APIErrorResponse(400, str(exc), param="messages", code="context_length_exceeded") from exc
        except ValueError as exc:
            raise APIErrorResponse(400, str(exc), param="messages") from exc
        content = tok.decode(gen.token_ids, skip_special_tokens=True)
        lp = None
        if want_lp:
            lp = {"content": [dict(lm.token_entry(tok, t, l),
                                   top_logprobs=[lm.token_entry(tok, i, v) for i, v in alts])
                              for t, l, alts in zip(gen.token_ids, gen.logprobs, gen.top)],
                  "refusal": None}
        return {"id": _new_id("chatcmpl"), "object": "chat.completion", "created": _now(),
                "model": body["model"], "system_fingerprint": self.cfg.owner,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                             "logprobs": lp, "finish_reason": gen.finish_reason}],
                "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.token_ids),
                          "total_tokens": gen.prompt_tokens + len(gen.token_ids)}}
