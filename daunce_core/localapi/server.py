"""Running the local server: in a thread of this process, or as a subprocess on a free port.

:class:`LocalServer` is what the black-box study uses (a child process started with
``python -m daunce_core.localapi``, the key handed over in the environment variable
:data:`~.config.KEY_ENV`, stopped by its process id); :func:`serve_in_thread` is what the tests
use. :func:`registered_model_path` finds a model's folder in a server's state, running or not.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path

from .. import store
from .config import KEY_ENV, ServerConfig
from .http import make_handler
from .state import ServerState

log = logging.getLogger(__name__)


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

    def start(self) -> LocalServer:
        state = Path(self.cfg.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        cfg_path = state / "server_config.json"
        self.cfg.write(cfg_path)
        port_file = state / f".port.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        # the child gets its own key and none of the caller's provider keys
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith(("_API_KEY", "_KEY", "_TOKEN"))}
        env[KEY_ENV] = self.api_key
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daunce_core.localapi", "--config", str(cfg_path),
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

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="daunce local OpenAI-compatible server")
    ap.add_argument("--config", required=True, help="server_config.json (a ServerConfig)")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(levelname)s %(message)s")
    cfg = ServerConfig.read(args.config)
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
