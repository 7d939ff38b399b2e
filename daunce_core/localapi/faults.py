"""Fault injection of the local server: what a hosted endpoint does to a long unattended run.

:class:`FaultInjector` turns the ``faults`` settings (:class:`~.config.FaultSettings`) into a
:class:`Fault` for a request (an error status, a dropped connection or a delay, before or after the
request takes effect), or ``None`` to serve it normally, and says which new fine-tuning jobs fail;
the HTTP layer (:mod:`.http`) carries it out. Random faults are seeded; scripted ones come first.
The kinds and the draws: docs/design.md#daunce_corelocalapifaultspy-fault-injection."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from .config import FaultSettings

EXEMPT = ("/health", "/v1/health", "/v1/daunce/")  # never faulted: liveness and the test's own stats


@dataclass
class Fault:
    """What to do to one request (see the module docstring)."""

    kind: str  # "429", "500", "drop", "slow", ... -- the key counted in the server's stats
    status: int | None = None
    drop: bool = False
    after: bool = False
    delay: float = 0.0
    headers: dict = field(default_factory=dict)
    message: str = ""
    type: str = "server_error"
    code: str | None = None


class FaultInjector:
    """Decides the faults of a server's requests and jobs; thread-safe."""

    def __init__(self, settings: FaultSettings | None = None):
        self.s = settings or FaultSettings()
        self.scripted: list[dict] = [dict(f) for f in self.s.scripted]
        self._rng = np.random.default_rng([self.s.seed, 0])
        self._job_rng = np.random.default_rng([self.s.seed, 1])
        self._jobs = 0
        self._lock = threading.Lock()

    def _scripted(self, method: str, path: str) -> Fault | None:
        for f in self.scripted:
            if f.get("count", 1) > 0 and f.get("method", method) == method and path.startswith(f["path"]):
                f["count"] = f.get("count", 1) - 1
                if f.get("drop"):
                    after = bool(f.get("after", False))
                    return Fault("drop after" if after else "drop", drop=True, after=after)
                status = int(f.get("status", 500))
                return Fault(str(status), status=status, after=bool(f.get("after", False)),
                             headers=dict(f.get("headers", {})), message=f.get("message", f"injected fault {status}"),
                             type=f.get("type", "requests" if status == 429 else "server_error"), code=f.get("code"))
        return None

    def request(self, method: str, path: str) -> Fault | None:
        """The fault of one authenticated request, or ``None``."""
        if path.startswith(EXEMPT):
            return None
        with self._lock:
            fault = self._scripted(method, path)
            if fault is not None:
                return fault
            s = self.s
            if not (s.rate_limit or s.server_error or s.drop or s.slow):
                return None
            if s.paths and not any(path.startswith(p) for p in s.paths):
                return None
            u, v, w = self._rng.random(3)  # always three draws, so one request's fault never shifts another's
        delay = s.slow_s if v < s.slow else 0.0
        if u < s.rate_limit:
            ra = s.retry_after_s
            return Fault("429", status=429, delay=delay, type="requests", code="rate_limit_exceeded",
                         headers={"Retry-After": str(max(1, math.ceil(ra))), "retry-after-ms": str(int(ra * 1000))},
                         message=f"Rate limit reached (injected fault). Please try again in {ra:g}s.")
        u -= s.rate_limit
        if u < s.server_error:
            return Fault("500", status=500, delay=delay,
                         message="The server had an error while processing your request (injected fault).")
        u -= s.server_error
        if u < s.drop:
            after = bool(w < 0.5)
            return Fault("drop after" if after else "drop", drop=True, after=after, delay=delay)
        return Fault("slow", delay=delay) if delay else None

    def job_fails(self) -> bool:
        """Whether the fine-tuning job being created now is to fail (call once per new job)."""
        with self._lock:
            self._jobs += 1
            draw = float(self._job_rng.random())
            return self._jobs <= self.s.fail_jobs or draw < self.s.fail_job_share
