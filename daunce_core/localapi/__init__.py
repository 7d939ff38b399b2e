"""A local OpenAI-compatible HTTP server backed by a small transformers model.

Used offline and in tests in place of OpenAI (the black-box study, :mod:`daunce_core.blackbox`).

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

For tests, *faults* (:class:`FaultSettings`, the ``faults`` section of :class:`ServerConfig` and
``blackbox.local.faults`` of the workflow config; off by default) make the server behave like a
busy hosted endpoint: a seeded share of requests is answered 429 with ``Retry-After``, or 500, or
has its connection closed without a response (half of these after the request took effect, e.g.
a job was created), replies are slowed down, and chosen fine-tuning jobs end ``failed``. Scripted
faults answer exactly the requests a test names (for example two 429s with ``Retry-After: 1`` on
chat completions; ``after: true`` serves the request and then loses the response). The counts of
requests and faults are written to ``stats.json`` in the state folder when the server stops.

Run it with :class:`LocalServer` (a subprocess on a free loopback port, stopped on exit), in
process with :func:`serve_in_thread`, or in the foreground with
``python -m daunce_core.localapi --config server_config.json``. The API key is handed over in
the environment variable ``DAUNCE_LOCAL_API_KEY`` and never written anywhere.

Modules: :mod:`.config` (settings), :mod:`.faults` (which request fails how), :mod:`.model` (chat
template, fine-tuning, generation with logprobs), :mod:`.state` (files, jobs, models; the training
worker), :mod:`.http` (routes, authentication, faults, multipart uploads), :mod:`.server`
(starting and stopping it).
"""
import importlib

from .config import KEY_ENV, FaultSettings, ServerConfig, TrainSettings

__all__ = ["KEY_ENV", "FaultSettings", "ServerConfig", "TrainSettings", "LocalServer", "build_server",
           "registered_model_path", "serve_in_thread", "APIErrorResponse", "ServerState"]

# The server's names are imported on first use (PEP 562): they pull in torch and transformers,
# and the settings above are read by every Snakemake parse of the workflow (daunce_core.blackbox.config).
_LAZY = {"LocalServer": "server", "build_server": "server", "registered_model_path": "server",
         "serve_in_thread": "server", "APIErrorResponse": "state", "ServerState": "state"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
