"""Settings of the local OpenAI-compatible server: how it fine-tunes, what it serves, how it fails.

All are typed settings (:mod:`daunce_core.settings`): :class:`TrainSettings` and
:class:`FaultSettings` are also the ``blackbox.local.train`` and ``blackbox.local.faults``
sections of the workflow config, so a typo there is refused by name when the config is loaded
rather than when the server starts; :class:`ServerConfig` is what a parent process writes to
``server_config.json`` for the server it starts (it never holds the key).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..settings import ConfigError, build, nested, setting

KEY_ENV = "DAUNCE_LOCAL_API_KEY"  # the environment variable that hands the server its key


@dataclass
class TrainSettings:
    """How the local server fine-tunes (what a hosted endpoint hides from its users)."""

    learning_rate: float = setting(1e-3, "AdamW step size at learning_rate_multiplier 1", gt=0)
    batch_size: int = setting(8, "used when a job asks for batch_size 'auto'", ge=1)
    n_epochs: int = setting(1, "used when a job asks for n_epochs 'auto'", ge=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    lr_schedule: str = setting("linear", "'linear' decay to 0 or 'constant'", choices=('linear', 'constant'))
    max_len: int = setting(256, "tokens kept per example (the most recent ones); also the context limit", ge=16)
    grad_clip: float = setting(1.0, "gradient norm clipping (0: none)", ge=0)


@dataclass
class FaultSettings:
    """Faults the local server injects, to test a client against what hosted endpoints do.

    Off by default. Each authenticated ``/v1`` request (``paths``: only those under these
    prefixes) draws once from a seeded RNG: with probability ``rate_limit`` it is answered 429
    with ``Retry-After``, with ``server_error`` 500, with ``drop`` it is *served* and then its
    connection is closed without a response (the case where a client cannot know whether a job
    was created); independently, with ``slow`` the reply is delayed by ``slow_s``. Fine-tuning
    jobs fail (status ``failed``, nothing trained, nothing billed) when they are among the first
    ``fail_jobs`` the server creates, or with probability ``fail_job_share``. The draws happen in
    the order requests arrive, so concurrent requests may see another sequence from run to run;
    a correct client's results do not depend on it. ``scripted`` lists exact faults for tests.
    """

    seed: int = setting(0, "seed of the fault draws")
    rate_limit: float = setting(0.0, "share of requests answered 429 (rate limit) with Retry-After", ge=0, le=1,
                                  what="a share")
    retry_after_s: float = setting(1.0, "the Retry-After of those 429s, in seconds (also sent as retry-after-ms)", ge=0)
    server_error: float = setting(0.0, "share of requests answered 500", ge=0, le=1, what="a share")
    drop: float = setting(0.0, "share of requests served, then their connection closed without a response", ge=0,
                          le=1, what="a share")
    slow: float = setting(0.0, "share of requests whose reply is delayed by slow_s (independent of the above)",
                          ge=0, le=1, what="a share")
    slow_s: float = setting(1.0, "delay of a slow reply, in seconds", ge=0)
    fail_jobs: int = setting(0, "the first N fine-tuning jobs the server creates end in status 'failed'", ge=0)
    fail_job_share: float = setting(0.0, "share of the other fine-tuning jobs that end in status 'failed'",
                                    ge=0, le=1, what="a share")
    paths: list = setting([], "only requests whose path starts with one of these (e.g. /v1/chat); [] for all",
                          items=str, schema={'items': {'pattern': '^/'}})
    scripted: list = setting([], "exact faults for tests: {path, method, status, count, headers, after, drop}",
                             items=dict)

    @property
    def active(self) -> bool:
        return bool(self.rate_limit or self.server_error or self.drop or self.slow or self.fail_jobs
                    or self.fail_job_share or self.scripted)

    def validate(self) -> None:
        """The checks across keys (each share's range: its setting, checked by build)."""
        if self.rate_limit + self.server_error + self.drop > 1.0:
            raise ConfigError("local.faults: rate_limit + server_error + drop must be at most 1 (one fault per "
                              f"request), got {self.rate_limit + self.server_error + self.drop:g}")
        if not all(isinstance(p, str) and p.startswith("/") for p in self.paths):
            raise ConfigError(f"local.faults.paths must list path prefixes starting with '/', got {self.paths!r}")
        if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in self.scripted):
            raise ConfigError("local.faults.scripted must list mappings with a 'path' (and optionally method, "
                              "status, count, headers, after, drop)")


@dataclass
class ServerConfig:
    """Settings of one local server (written next to its state; never holds the key)."""

    state_dir: str = field(metadata={"help": "folder of the server's files, jobs and fine-tuned models"})
    models: dict = setting({}, "base model name -> folder saved with save_pretrained")
    train: TrainSettings = nested(TrainSettings, "how fine-tuning jobs train")
    host: str = setting("127.0.0.1", "address to listen on (loopback only by default)")
    port: int = setting(0, "port; 0 picks a free one")
    threads: int = setting(1, "torch threads of the server process")
    device: str = setting("auto", "'auto', 'cpu' or 'cuda' for the served models")
    cache_models: int = setting(8, "fine-tuned models kept loaded")
    faults: FaultSettings = nested(FaultSettings, "injected faults (429, 500, dropped connections, slow "
                                                  "replies, failed jobs); off by default")
    owner: str = setting("daunce-local", "owned_by / organisation of the models it makes")

    def write(self, path: str | Path) -> None:
        """Write as JSON (atomically), for :meth:`read` in the server process."""
        from ..store import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: str | Path) -> ServerConfig:
        return build(cls, json.loads(Path(path).read_text()), str(path))
