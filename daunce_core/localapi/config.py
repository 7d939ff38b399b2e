"""Settings of the local OpenAI-compatible server: how it fine-tunes, and what it serves.

Both are typed settings (:mod:`daunce_core.settings`): :class:`TrainSettings` is also the
``blackbox.local.train`` section of the workflow config, so a typo there is refused by name when
the config is loaded rather than when the server starts; :class:`ServerConfig` is what a parent
process writes to ``server_config.json`` for the server it starts (it never holds the key).
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

    learning_rate: float = setting(1e-3, "AdamW step size at learning_rate_multiplier 1")
    batch_size: int = setting(8, "used when a job asks for batch_size 'auto'")
    n_epochs: int = setting(1, "used when a job asks for n_epochs 'auto'")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    lr_schedule: str = setting("linear", "'linear' decay to 0 or 'constant'")
    max_len: int = setting(256, "tokens kept per example (the most recent ones); also the context limit")
    grad_clip: float = setting(1.0, "gradient norm clipping (0: none)")

    def validate(self) -> None:
        if self.lr_schedule not in ("linear", "constant"):
            raise ConfigError(f"local.train.lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}")


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
    faults: list = setting([], "injected errors for tests: {path, method, status, count, headers, after}")
    owner: str = setting("daunce-local", "owned_by / organisation of the models it makes")

    def write(self, path: str | Path) -> None:
        """Write as JSON (atomically), for :meth:`read` in the server process."""
        from ..store import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: str | Path) -> "ServerConfig":
        return build(cls, json.loads(Path(path).read_text()), str(path))
