"""A local OpenAI-compatible HTTP server backed by a small transformers model.

It serves the endpoints the black-box path uses, with OpenAI's request and response shapes, so the
real ``openai`` client talks to it unchanged and the same code runs against OpenAI by changing
the base URL and key:

==========================================  ==================================================
``GET  /v1/models``, ``/v1/models/{id}``    base models and finished fine-tunes
``POST /v1/files`` (multipart)              upload a JSONL training file (``purpose``)
``GET  /v1/files``, ``/v1/files/{id}``,     list, retrieve, download, delete
``/v1/files/{id}/content``, ``DELETE``
``POST /v1/fine_tuning/jobs``               create a supervised job (``hyperparameters`` or
                                            ``method.supervised.hyperparameters``, ``suffix``,
                                            ``seed``, ``metadata``); it trains for real, in a
                                            background thread, one job at a time
``GET  /v1/fine_tuning/jobs``               list, newest first, ``after``/``limit`` paging and
                                            ``metadata[key]=value`` filters
``GET  /v1/fine_tuning/jobs/{id}``,         retrieve, cancel, events
``POST .../cancel``, ``GET .../events``
``POST /v1/chat/completions``               greedy or sampled reply with ``logprobs`` and
                                            ``top_logprobs`` (0..20); ``n`` must be 1
==========================================  ==================================================

Requests need ``Authorization: Bearer <key>``; a wrong key gets OpenAI's 401. Errors use
OpenAI's ``{"error": {...}}`` body. Everything the server learns (files, jobs, fine-tuned
weights) lives under a state folder and survives a restart: a job that was queued or running
when the server stopped is trained again when it starts, so a client may come back later and
find its jobs, as it would with a hosted endpoint.

For tests, *faults* make the server answer selected requests with an error status first (for
example two 429s with ``Retry-After: 1`` on chat completions) before serving them normally; a
fault with ``after: true`` serves the request and then loses the response (answers with the
error), as a dropped connection would after a job was created.

Run it with :class:`LocalServer` (a subprocess on a free loopback port, stopped on exit) or
in-process with :func:`serve_in_thread`. The API key is handed over in an environment
variable and never written anywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .. import store
from . import localmodel as lm

log = logging.getLogger(__name__)

KEY_ENV = "DAUNCE_LOCAL_API_KEY"
MAX_TOP_LOGPROBS = 20
MIN_TRAINING_EXAMPLES = 10  # as OpenAI requires


class APIErrorResponse(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None,
                 after: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}
        self.after = after  # fault injection: serve the request, then answer with this error

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServerConfig:
    """Settings of a local server (written next to its state; never holds the key)."""

    state_dir: str
    models: dict = field(default_factory=dict)  # base model name -> folder saved with save_pretrained
    train: dict = field(default_factory=dict)  # localmodel.TrainSettings fields
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 1  # torch threads of the server process
    device: str = "auto"
    cache_models: int = 8  # fine-tuned models kept loaded
    faults: list = field(default_factory=list)
    owner: str = "daunce-local"


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
        self.train_settings = lm.TrainSettings(**cfg.train)
        self.lock = threading.RLock()
        self.faults = [dict(f) for f in cfg.faults]
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

    def take_fault(self, method: str, path: str) -> APIErrorResponse | None:
        with self.lock:
            for f in self.faults:
                if f.get("count", 1) > 0 and f.get("method", method) == method and path.startswith(f["path"]):
                    f["count"] = f.get("count", 1) - 1
                    status = int(f.get("status", 500))
                    return APIErrorResponse(
                        status, f.get("message", f"injected fault {status}"),
                        f.get("type", "requests" if status == 429 else "server_error"),
                        f.get("code"), headers=f.get("headers", {}), after=bool(f.get("after", False)))
        return None

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


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if not msg.is_multipart():
        raise APIErrorResponse(400, "expected a multipart/form-data body")
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[name] = (part.get_filename(), payload)
        else:
            fields[name] = payload.decode()
    return fields, files


def make_handler(state: ServerState, api_key: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "daunce-local"
        disable_nagle_algorithm = True  # else small replies wait ~40 ms for a delayed ACK

        def log_message(self, fmt, *args):  # request lines only (never headers)
            log.debug("%s " + fmt, self.address_string(), *args)

        _swallow = False

        def _send(self, status: int, obj: Any = None, raw: bytes | None = None, headers: dict | None = None,
                  ctype: str = "application/json") -> None:
            if self._swallow:
                return
            data = raw if raw is not None else json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:16])
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _json(self, body: bytes) -> dict:
            try:
                obj = json.loads(body or b"{}")
            except ValueError as exc:
                raise APIErrorResponse(400, f"We could not parse the JSON body of your request ({exc}).")
            if not isinstance(obj, dict):
                raise APIErrorResponse(400, "The request body must be a JSON object.")
            return obj

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            path = url.path.rstrip("/")
            query = dict(parse_qsl(url.query, keep_blank_values=True))
            try:
                body = self._body() if method in ("POST", "PUT", "PATCH") else b""
                if path in ("/health", "/v1/health"):
                    return self._send(200, {"status": "ok"})
                state.count(f"{method} {_route_key(path)}")
                auth = self.headers.get("Authorization", "")
                given = auth[7:] if auth.startswith("Bearer ") else ""
                if not api_key or not secrets.compare_digest(given.encode(), api_key.encode()):
                    raise APIErrorResponse(
                        401, "Incorrect API key provided. You can obtain an API key from whoever runs this "
                             "server (the workflow passes it in an environment variable).",
                        code="invalid_api_key")
                fault = state.take_fault(method, path)
                if fault is not None and not fault.after:
                    raise fault
                if fault is not None:  # the request takes effect, but its response is lost
                    self._swallow = True
                    try:
                        self._route(method, path, query, body)
                    finally:
                        self._swallow = False
                    raise fault
                self._route(method, path, query, body)
            except APIErrorResponse as err:
                self._send(err.status, err.body(), headers=err.headers)
            except BrokenPipeError:
                pass
            except Exception as exc:  # unexpected: a 500 in OpenAI's shape, the traceback to the log
                log.error("%s %s: %s\n%s", method, path, exc, traceback.format_exc())
                with contextlib.suppress(Exception):
                    self._send(500, APIErrorResponse(500, f"internal error: {exc}", "server_error").body())

        def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
            parts = path.split("/")[1:]  # "", "v1", ...
            if parts[:1] != ["v1"]:
                raise APIErrorResponse(404, f"Unknown path {path}")
            p = parts[1:]
            if p == ["models"] and method == "GET":
                with state.lock:
                    names = list(state.reg["models"])
                return self._send(200, {"object": "list", "data": [state.model_object(n) for n in names]})
            if len(p) >= 2 and p[0] == "models" and method == "GET":
                name = "/".join(p[1:])
                with state.lock:
                    if name not in state.reg["models"]:
                        raise APIErrorResponse(404, f"The model `{name}` does not exist.", code="model_not_found")
                    return self._send(200, state.model_object(name))
            if p == ["files"] and method == "POST":
                fields, files = _parse_multipart(self.headers.get("Content-Type", ""), body)
                if "file" not in files:
                    raise APIErrorResponse(400, "Missing required parameter: 'file'.", param="file")
                if not fields.get("purpose"):
                    raise APIErrorResponse(400, "Missing required parameter: 'purpose'.", param="purpose")
                filename, data = files["file"]
                return self._send(200, state.add_file(filename, fields["purpose"], data))
            if p == ["files"] and method == "GET":
                with state.lock:
                    objs = sorted(state.reg["files"].values(), key=lambda f: (f["created_at"], f["id"]))
                if query.get("purpose"):
                    objs = [f for f in objs if f["purpose"] == query["purpose"]]
                if query.get("order", "desc") == "desc":
                    objs = objs[::-1]
                if query.get("after"):
                    ids = [f["id"] for f in objs]
                    objs = objs[ids.index(query["after"]) + 1:] if query["after"] in ids else []
                limit = int(query.get("limit", 10000))
                return self._send(200, {"object": "list", "data": objs[:limit], "has_more": len(objs) > limit})
            if len(p) == 2 and p[0] == "files":
                if method == "GET":
                    return self._send(200, state.get_file(p[1]))
                if method == "DELETE":
                    return self._send(200, state.delete_file(p[1]))
            if len(p) == 3 and p[0] == "files" and p[2] == "content" and method == "GET":
                state.get_file(p[1])
                return self._send(200, raw=(state.dir / "files" / p[1]).read_bytes(),
                                  ctype="application/octet-stream")
            if p == ["fine_tuning", "jobs"]:
                if method == "POST":
                    return self._send(200, state.create_job(self._json(body)))
                if method == "GET":
                    return self._send(200, state.list_jobs(query))
            if len(p) == 3 and p[:2] == ["fine_tuning", "jobs"] and method == "GET":
                with state.lock:
                    return self._send(200, state.public_job(state.get_job(p[2])))
            if len(p) == 4 and p[:2] == ["fine_tuning", "jobs"] and p[3] == "cancel" and method == "POST":
                return self._send(200, state.cancel_job(p[2]))
            if len(p) == 4 and p[:2] == ["fine_tuning", "jobs"] and p[3] == "events" and method == "GET":
                with state.lock:
                    events = [dict(e, object="fine_tuning.job.event", id=f"ftevent-{i}")
                              for i, e in enumerate(state.get_job(p[2])["events"])][::-1]
                return self._send(200, {"object": "list", "data": events, "has_more": False})
            if p == ["chat", "completions"] and method == "POST":
                return self._send(200, state.chat(self._json(body)))
            if p == ["daunce", "stats"] and method == "GET":
                with state.lock:
                    return self._send(200, dict(state.stats))
            raise APIErrorResponse(404, f"Unknown request URL: {method} {path}", code="unknown_url")

        def do_GET(self):  # noqa: N802
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

        def do_DELETE(self):  # noqa: N802
            self._handle("DELETE")

    return Handler


def _route_key(path: str) -> str:
    """Collapse object ids in a path so stats count routes (``/v1/files/{id}``)."""
    if "/v1/" not in path:
        return path
    out = []
    for seg in path.split("/"):
        out.append("{id}" if "-" in seg and seg.split("-")[0] in ("file", "ftjob", "chatcmpl") else seg)
    return "/".join(out)


def registered_model_path(state_dir: str | os.PathLike, name: str) -> str:
    """Folder of model ``name`` in a (stopped or running) server's state, e.g. a finished fine-tune."""
    reg = Path(state_dir) / "registry.json"
    models = json.loads(reg.read_text())["models"] if reg.exists() else {}
    if name not in models:
        raise KeyError(f"{reg}: no model {name!r}")
    return models[name]["path"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def build_server(cfg: ServerConfig, api_key: str) -> tuple[_Server, ServerState]:
    if not api_key:
        raise ValueError("local server: no API key given; it refuses to serve without one")
    state = ServerState(cfg)
    httpd = _Server((cfg.host, int(cfg.port)), make_handler(state, api_key))
    return httpd, state


@contextlib.contextmanager
def serve_in_thread(cfg: ServerConfig, api_key: str):
    """Run a server in this process (a background thread); yields its base URL ``.../v1``."""
    httpd, state = build_server(cfg, api_key)
    t = threading.Thread(target=httpd.serve_forever, name="daunce-local-server", daemon=True)
    t.start()
    try:
        yield f"http://{cfg.host}:{httpd.server_address[1]}/v1", state
    finally:
        state.stop()
        httpd.shutdown()
        httpd.server_close()


class LocalServer:
    """The local server as a subprocess on a free loopback port; a context manager.

    ``with LocalServer(cfg) as srv: srv.base_url, srv.api_key`` -- the key is made here (or
    given), passed to the child in an environment variable and never written to disk. The child
    is stopped (SIGTERM, then SIGKILL after ``stop_timeout`` s) on exit, by its own process id.
    """

    def __init__(self, cfg: ServerConfig, *, api_key: str | None = None, log_path: str | None = None,
                 start_timeout: float = 120.0, stop_timeout: float = 15.0):
        self.cfg = cfg
        self.api_key = api_key or ("sk-local-" + secrets.token_urlsafe(24))
        self.log_path = Path(log_path) if log_path else Path(cfg.state_dir) / "server.log"
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def start(self) -> "LocalServer":
        state = Path(self.cfg.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        cfg_path = state / "server_config.json"
        with store.atomic_path(cfg_path) as tmp:
            tmp.write_text(json.dumps(asdict(self.cfg), indent=1))
        port_file = state / f".port.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        # the child gets its own key and none of the caller's provider keys
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith(("_API_KEY", "_KEY", "_TOKEN"))}
        env[KEY_ENV] = self.api_key
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daunce_core.blackbox.server", "--config", str(cfg_path),
             "--port-file", str(port_file)],
            env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"local server exited with code {self.proc.returncode} while starting; "
                                   f"see {self.log_path}")
            if port_file.exists() and port_file.read_text().strip():
                port = int(port_file.read_text())
                port_file.unlink()
                self.base_url = f"http://{self.cfg.host}:{port}/v1"
                log.info("local OpenAI-compatible server at %s (pid %d, state %s)", self.base_url,
                         self.proc.pid, state)
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"local server did not start within {self.start_timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="daunce local OpenAI-compatible server")
    ap.add_argument("--config", required=True, help="server_config.json (a ServerConfig)")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(levelname)s %(message)s")
    cfg = ServerConfig(**json.loads(Path(args.config).read_text()))
    key = os.environ.get(KEY_ENV, "")
    httpd, state = build_server(cfg, key)

    def _term(*_):
        state.stop()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    port = httpd.server_address[1]
    if args.port_file:
        with store.atomic_path(args.port_file) as tmp:
            tmp.write_text(str(port))
    log.info("listening on http://%s:%d/v1 (state %s)", cfg.host, port, cfg.state_dir)
    httpd.serve_forever()
    httpd.server_close()
    log.info("stopped")


if __name__ == "__main__":
    main()
