"""A local OpenAI-compatible HTTP server backed by a small transformers model.

Used offline and in tests in place of OpenAI (the black-box study, :mod:`daunce_core.blackbox`):
the real ``openai`` client talks to it unchanged, it fine-tunes for real, keeps its state across
restarts and can inject a hosted endpoint's faults (:mod:`.faults`). Start it with
:class:`LocalServer`, :func:`serve_in_thread` or ``python -m daunce_core.localapi --config FILE``;
:mod:`.config`, :mod:`.model`, :mod:`.state`, :mod:`.http` and :mod:`.server` hold its parts.
Endpoints, state and faults: docs/design.md#daunce_corelocalapi-the-local-openai-compatible-server."""
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
