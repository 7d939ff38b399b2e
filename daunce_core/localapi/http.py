"""The HTTP layer of the local server: OpenAI's routes, authentication, errors and test faults.

:func:`make_handler` binds a :class:`~.state.ServerState` and the key into a
``BaseHTTPRequestHandler`` class for ``ThreadingHTTPServer``: it checks ``Authorization: Bearer``
(OpenAI's 401 otherwise), carries out injected faults (:mod:`.faults`: an error status, a
connection closed without a response, a delay; before the request takes effect or after), routes
``/v1/...`` to the state, and turns every error into OpenAI's ``{"error": {...}}`` body. Uploads
arrive as ``multipart/form-data`` (:func:`parse_multipart`).

The key is checked before a byte of the body is read and before anything is counted; a body
must declare its length (``Content-Length`` or chunked) and stay within ``max_body`` bytes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
import traceback
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .state import APIErrorResponse, ServerState

log = logging.getLogger(__name__)


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """``(fields, files)`` of a ``multipart/form-data`` body (files: name -> (filename, bytes))."""
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


MAX_BODY_BYTES = 512 * 2 ** 20  # OpenAI's own limit on an uploaded file


def make_handler(state: ServerState, api_key: str, max_body: int = MAX_BODY_BYTES):
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
            too_big = APIErrorResponse(413, f"The request body is larger than this server's limit of {max_body} "
                                            "bytes.", code="request_too_large")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    try:
                        size = int(self.rfile.readline(64).strip().split(b";")[0], 16)
                    except ValueError:
                        self.close_connection = True
                        raise APIErrorResponse(400, "Malformed chunked request body.") from None
                    if size < 0 or len(out) + size > max_body:
                        self.close_connection = True
                        raise too_big
                    if size == 0:
                        self.rfile.readline(64)
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline(64)
            raw = self.headers.get("Content-Length")
            if raw is None:
                self.close_connection = True
                raise APIErrorResponse(411, "A request with a body must send Content-Length (or use chunked "
                                            "transfer encoding).", code="length_required")
            try:
                n = int(raw)
            except ValueError:
                n = -1
            if n < 0:
                self.close_connection = True
                raise APIErrorResponse(400, f"Invalid Content-Length {raw[:40]!r}.", code="invalid_content_length")
            if n > max_body:
                self.close_connection = True
                raise too_big
            return self.rfile.read(n) if n else b""

        def _json(self, body: bytes) -> dict:
            try:
                obj = json.loads(body or b"{}")
            except ValueError as exc:
                raise APIErrorResponse(400, f"We could not parse the JSON body of your request ({exc}).") from exc
            if not isinstance(obj, dict):
                raise APIErrorResponse(400, "The request body must be a JSON object.")
            return obj

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            path = url.path.rstrip("/")
            query = dict(parse_qsl(url.query, keep_blank_values=True))
            try:
                if path in ("/health", "/v1/health"):
                    return self._send(200, {"status": "ok"})
                auth = self.headers.get("Authorization", "")
                given = auth[7:] if auth.startswith("Bearer ") else ""
                if not api_key or not secrets.compare_digest(given.encode(), api_key.encode()):
                    if method in ("POST", "PUT", "PATCH") or self.headers.get("Content-Length", "0") != "0":
                        self.close_connection = True  # the unread body must not be parsed as a request
                    raise APIErrorResponse(
                        401, "Incorrect API key provided. You can obtain an API key from whoever runs this "
                             "server (the workflow passes it in an environment variable).",
                        code="invalid_api_key")
                state.count(f"{method} {_route_key(path)}")
                body = self._body() if method in ("POST", "PUT", "PATCH") else b""
                fault = state.injector.request(method, path)
                if fault is None:
                    return self._route(method, path, query, body)
                state.count(f"fault {fault.kind}")
                log.info("injected fault %s on %s %s", fault.kind, method, path)
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.after:  # the request takes effect, but its response is lost
                    self._swallow = True
                    try:
                        self._route(method, path, query, body)
                    finally:
                        self._swallow = False
                if fault.drop:  # close the connection without a response
                    self.close_connection = True
                    return
                if fault.status is not None:
                    raise APIErrorResponse(fault.status, fault.message, fault.type, fault.code, headers=fault.headers)
                if not fault.after:
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
                fields, files = parse_multipart(self.headers.get("Content-Type", ""), body)
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


_ROUTE_WORDS = {"", "v1", "models", "files", "content", "fine_tuning", "jobs", "cancel", "events", "chat",
                "completions", "daunce", "stats"}


def _route_key(path: str) -> str:
    """The route a path belongs to, for the statistics: ids and names become ``{id}`` and a path
    outside the routes served here counts as ``other``, so the statistics stay bounded."""
    segs = path.split("/")
    if segs[:2] != ["", "v1"] or len(segs) > 6 or (len(segs) > 2 and segs[2] not in _ROUTE_WORDS):
        return "other"
    return "/".join(s if s in _ROUTE_WORDS else "{id}" for s in segs)
