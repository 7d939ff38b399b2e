"""The ``openai`` client, made safe for long unattended runs on paid endpoints.

:class:`APIClient` takes credentials from environment variables only and redacts the key from
every log record and error; :meth:`APIClient.call` retries rate limits, timeouts, server and
connection errors with backoff honouring ``Retry-After`` (the ``openai`` client's own retries are
off, so :mod:`.finetune` sees every retry); 401/403 and exhausted quota fail at once; chat token
usage is counted for the spend report. Every black-box request goes through it. In full:
docs/trust.md#the-api-client-daunce_coreblackboxclientpy."""
from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import RetryConfig

log = logging.getLogger(__name__)

QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached", "billing_not_active",
               "quota_exceeded", "access_terminated")
RETRY_STATUS = (408, 409, 429)


class BlackboxError(RuntimeError):
    """A black-box API step cannot go on; the message says why and what to do."""


class AuthError(BlackboxError):
    """The endpoint refused the credentials (401/403)."""


class QuotaError(BlackboxError):
    """The account's quota or billing limit is exhausted (a 429 that retrying cannot fix)."""


class APIRequestError(BlackboxError):
    """The endpoint rejected a request as invalid (4xx other than auth, rate limit, timeout)."""


class RetriesExhausted(BlackboxError):
    """A request kept failing with retryable errors."""


# --- the key never leaves memory --------------------------------------------------------------

class RedactFilter(logging.Filter):
    """Replace every registered secret in a log record's final message with ``[REDACTED]``."""

    def __init__(self) -> None:
        super().__init__("daunce-redact")
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                msg = record.getMessage()
            except Exception:  # a malformed record: leave it to logging's own error path
                return True
            clean = redact(msg, self.secrets)
            if clean != msg:
                record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                text = redact(str(record.exc_info[1]), self.secrets)
                if text != str(record.exc_info[1]):
                    record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__}: {text})"
                    record.exc_info, record.exc_text = None, None
        return True


_FILTER = RedactFilter()


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s and len(s) >= 8:
            text = text.replace(s, "[REDACTED]")
    return text


def protect_secret(secret: str) -> None:
    """Register ``secret`` with the redaction filter and attach the filter to current handlers."""
    if secret:
        _FILTER.secrets.add(secret)
    targets = [logging.getLogger()] + [logging.getLogger(n) for n in ("openai", "httpx", "httpx2", "daunce_core")]
    for lg in targets:
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
        for h in lg.handlers:
            if _FILTER not in h.filters:
                h.addFilter(_FILTER)
    for name in ("openai", "httpx", "httpx2", "httpcore"):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:  # one INFO line per request is noise; an explicit level is kept
            lg.setLevel(logging.WARNING)


@dataclass(frozen=True)
class Credentials:
    """Where to send requests and with which key. ``repr`` never shows the key."""

    base_url: str | None
    api_key: str = field(repr=False)
    source: str = ""  # e.g. "env OPENAI_API_KEY" (names, never values)


def credentials_from_env(api_key_env: str = "OPENAI_API_KEY", base_url_env: str = "OPENAI_BASE_URL",
                         base_url: str | None = None, environ: dict | None = None) -> Credentials:
    """Read the key (and optionally the base URL) from environment variables.

    daunce never reads keys from config files: a config holds the *names* of the variables.
    """
    env = os.environ if environ is None else environ
    key = env.get(api_key_env, "")
    if not key:
        raise AuthError(
            f"no API key: set the environment variable {api_key_env} (daunce reads keys only from the "
            "environment, never from config files; the variable's name is blackbox.api.api_key_env)")
    url = base_url or env.get(base_url_env) or None
    return Credentials(url, key, f"env {api_key_env}" + (f", base URL from env {base_url_env}"
                                                         if not base_url and env.get(base_url_env) else ""))


# --- retries --------------------------------------------------------------------------------------

def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    get = headers.get
    ms = get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class Usage:
    """Tokens and requests counted from the responses (the basis of the spend report)."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    uploads: int = 0
    jobs_created: int = 0

    def add(self, **kw: int) -> None:
        for k, v in kw.items():
            setattr(self, k, getattr(self, k) + int(v or 0))

    def as_dict(self) -> dict:
        return asdict(self)


def _status_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(exc, "message", exc))


def _error_code(exc: Any) -> str | None:
    code = getattr(exc, "code", None)
    body = getattr(exc, "body", None)
    if not code and isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            code = err.get("code") or err.get("type")
    return str(code) if code else None


class APIClient:
    """An ``openai.OpenAI`` client with daunce's retry, error and redaction rules.

    ``retry`` is the ``blackbox.api.retry`` section; ``raw`` is the underlying client (retries
    off). ``sleep`` is injectable for tests.
    """

    max_pages = 10_000  # a list longer than this many pages is taken for a pagination loop

    def __init__(self, creds: Credentials, *, retry: RetryConfig | None = None, timeout: float = 120.0,
                 sleep: Callable[[float], None] = time.sleep):
        import openai

        self._openai = openai
        protect_secret(creds.api_key)
        self._secret = creds.api_key
        self.base_url = creds.base_url
        self.source = creds.source
        self.retry = retry or RetryConfig()
        self.sleep = sleep
        self.usage = Usage()
        self.meter = None  # a cost.SpendMeter: checks the cap before every paid call
        self._lock = threading.Lock()
        self.raw = openai.OpenAI(api_key=creds.api_key, base_url=creds.base_url, max_retries=0, timeout=timeout)

    def __repr__(self) -> str:
        return f"APIClient(base_url={self.base_url!r})"

    def _clean(self, text: str) -> str:
        return redact(text, [self._secret])

    def _count(self, **kw: int) -> None:
        with self._lock:
            self.usage.add(**kw)

    def call(self, what: str, fn: Callable[..., Any], *args: Any,
             before_retry: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` with retries; ``what`` names the request in messages.

        ``before_retry`` runs before each retry; if it returns something other than ``None``
        that value is returned instead of retrying (used to adopt a job a lost response created).
        """
        oa = self._openai
        p = self.retry
        attempt = 0
        where = f" ({self.base_url})" if self.base_url else ""
        while True:
            self._count(requests=1)
            try:
                out = fn(*args, **kwargs)
                if isinstance(out, (str, bytes)):  # a 200 whose body was not JSON (an HTML page, a proxy)
                    raise BlackboxError(self._clean(
                        f"{what}: the endpoint{where} answered 200 with a body that is not JSON "
                        f"({str(out[:80])!r}); check blackbox.api.base_url points at an OpenAI-compatible API"))
                return out
            except (json.JSONDecodeError, oa.APIResponseValidationError) as exc:
                raise BlackboxError(self._clean(
                    f"{what}: the endpoint{where} answered 200 with a malformed body ({type(exc).__name__}: "
                    f"{str(exc)[:120]}); check blackbox.api.base_url points at an OpenAI-compatible API")) from None
            except oa.AuthenticationError as exc:
                src = f"the key from {self.source}" if self.source else "the key"
                raise AuthError(self._clean(
                    f"{what}: the endpoint{where} rejected the API key (401: {_status_message(exc)}). Check "
                    f"{src} (blackbox.api.api_key_env names the variable)")) from None
            except oa.PermissionDeniedError as exc:
                raise AuthError(self._clean(
                    f"{what}: permission denied{where} (403: {_status_message(exc)}). The key's project or "
                    "organisation may lack access to this model or endpoint")) from None
            except oa.APIStatusError as exc:
                status = exc.status_code
                code = _error_code(exc)
                msg = self._clean(_status_message(exc))
                if status == 429 and code in QUOTA_CODES:
                    raise QuotaError(f"{what}: the account's quota or billing limit is exhausted (429 {code}: "
                                     f"{msg}). Add credit or raise the limit, then rerun: finished work is "
                                     "kept in the manifest") from None
                if not (status in RETRY_STATUS or status >= 500):
                    raise APIRequestError(f"{what}: request rejected ({status} {code or ''}: {msg})") from None
                wait = parse_retry_after(exc.response.headers)
                reason = f"{status} {code or ''}".strip()
            except oa.APIConnectionError as exc:
                wait, reason = None, f"connection error ({type(exc).__name__})"
            attempt += 1
            if attempt > p.max_retries:
                raise RetriesExhausted(f"{what}: still failing after {p.max_retries} retries (last: {reason}); "
                                       "rerun later -- finished work is kept") from None
            if wait is not None and wait > p.max_retry_after:
                raise RetriesExhausted(f"{what}: the endpoint asks to wait {wait:.0f} s (Retry-After), more "
                                       f"than retry.max_retry_after = {p.max_retry_after:.0f} s; rerun later")
            if wait is None:
                wait = min(p.initial_delay * 2 ** (attempt - 1), p.max_delay) * (1 - p.jitter * random.random())
            self._count(retries=1)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, reason, attempt, p.max_retries, wait)
            self.sleep(wait)
            if before_retry is not None:
                found = before_retry()
                if found is not None:
                    return found

    # --- the endpoints daunce uses ----------------------------------------------------------------
    def chat(self, **kwargs: Any):
        what, model = f"chat completion ({kwargs.get('model')})", str(kwargs.get("model"))
        held = 0.0
        if self.meter is not None:
            out_max = kwargs.get("max_completion_tokens") or kwargs.get("max_tokens")
            if out_max is None:
                raise BlackboxError(f"{what}: a paid chat needs max_completion_tokens to bound its cost")
            held = self.meter.reserve(what, model, input=self.meter.te.messages(kwargs.get("messages") or []),
                                      output=int(out_max) * int(kwargs.get("n") or 1))
        try:
            resp = self.call(what, self.raw.chat.completions.create, **kwargs)
        except BaseException:
            if self.meter is not None:  # a failed request may still be billed: keep the bound
                self.meter.settle(held, model, input=self.meter.te.messages(kwargs.get("messages") or []),
                                  output=int(kwargs.get("max_completion_tokens") or kwargs.get("max_tokens") or 0))
            raise
        u = getattr(resp, "usage", None)
        if u is not None:
            self._count(prompt_tokens=u.prompt_tokens or 0, completion_tokens=u.completion_tokens or 0)
        if self.meter is not None:
            self.meter.settle(held, model, input=getattr(u, "prompt_tokens", 0) or 0,
                              output=getattr(u, "completion_tokens", 0) or 0)
        return resp

    def upload(self, filename: str, data: bytes, purpose: str = "fine-tune",
               before_retry: Callable[[], Any] | None = None):
        obj = self.call(f"upload {filename}", self.raw.files.create, file=(filename, data), purpose=purpose,
                        before_retry=before_retry)
        self._count(uploads=1)
        return obj

    def retrieve_file(self, file_id: str):
        return self.call(f"retrieve file {file_id}", self.raw.files.retrieve, file_id)

    def list_files(self, purpose: str = "fine-tune") -> list:
        return self._list_all("list files", self.raw.files.list, purpose=purpose)

    def _list_all(self, what: str, fn: Callable[..., Any], **kw: Any) -> list:
        """Every page of a list endpoint, refusing one that makes no progress.

        A page that repeats an id already seen (the same page again, a cursor ignored), or more
        than :attr:`max_pages` pages, stops the listing with a one-line error naming the endpoint
        instead of looping forever.
        """
        where = f" ({self.base_url})" if self.base_url else ""
        page = self.call(what, fn, **kw)
        out = list(page.data)
        seen = {getattr(x, "id", None) for x in out}
        pages = 1
        while getattr(page, "has_more", False) and out:
            if pages >= self.max_pages:
                raise BlackboxError(f"{what}: the endpoint{where} still says has_more after {pages} pages; "
                                    "refusing to page on (is its 'after' cursor ignored?)")
            page = self.call(what, fn, after=out[-1].id, **kw)
            pages += 1
            ids = [getattr(x, "id", None) for x in page.data]
            if not ids or any(i in seen for i in ids):
                raise BlackboxError(f"{what}: the endpoint{where} answered has_more but page {pages} "
                                    f"{'is empty' if not ids else 'repeats ids already listed'} after "
                                    f"after={out[-1].id!r}; its pagination makes no progress")
            seen.update(ids)
            out += list(page.data)
        return out

    def create_job(self, before_retry: Callable[[], Any] | None = None, **kwargs: Any):
        job = self.call(f"create fine-tuning job ({kwargs.get('suffix')})", self.raw.fine_tuning.jobs.create,
                        before_retry=before_retry, **kwargs)
        self._count(jobs_created=1)
        return job

    def retrieve_job(self, job_id: str):
        return self.call(f"retrieve job {job_id}", self.raw.fine_tuning.jobs.retrieve, job_id)

    def list_jobs(self, metadata: dict[str, str] | None = None, limit: int = 100) -> list:
        """All fine-tuning jobs (newest first), filtered by ``metadata`` here as well."""
        kw: dict[str, Any] = {"limit": limit}
        if metadata:
            kw["metadata"] = metadata
        out = self._list_all("list fine-tuning jobs", self.raw.fine_tuning.jobs.list, **kw)
        if metadata:
            out = [j for j in out if all((j.metadata or {}).get(k) == v for k, v in metadata.items())]
        return out

    def cancel_job(self, job_id: str):
        return self.call(f"cancel job {job_id}", self.raw.fine_tuning.jobs.cancel, job_id)


def backoff_delays(policy: RetryConfig, n: int) -> list[float]:
    """The un-jittered backoff schedule (for documentation and tests)."""
    return [min(policy.initial_delay * 2 ** i, policy.max_delay) for i in range(n)]

