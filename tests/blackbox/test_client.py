"""Retries, Retry-After, and clear errors of the API client, against the local server's faults."""
import email.utils
import time

import pytest

from daunce_core.blackbox.client import (
    APIClient,
    APIRequestError,
    AuthError,
    Credentials,
    QuotaError,
    RetriesExhausted,
    credentials_from_env,
    parse_retry_after,
)
from daunce_core.blackbox.config import RetryConfig
from daunce_core.localapi import ServerConfig, serve_in_thread

KEY = "sk-client-test-0123456789abcdef"


@pytest.fixture()
def server(tmp_path):
    with serve_in_thread(ServerConfig(state_dir=str(tmp_path / "state")), KEY) as (url, st):
        yield url, st


def client(url, key=KEY, **retry):
    sleeps = []
    c = APIClient(Credentials(url, key), retry=RetryConfig(**retry), sleep=sleeps.append)
    return c, sleeps


def test_429_with_retry_after_is_retried_after_the_requested_wait(server):
    url, st = server
    st.faults.append({"path": "/v1/models", "status": 429, "count": 2, "headers": {"Retry-After": "3"},
                      "code": "rate_limit_exceeded"})
    c, sleeps = client(url)
    models = c.call("list models", c.raw.models.list)
    assert list(models.data) == []
    assert sleeps == [3.0, 3.0]  # the server's Retry-After, not the backoff schedule
    assert st.stats["GET /v1/models"] == 3
    assert c.usage.retries == 2


def test_retry_after_ms_and_server_errors_use_backoff(server):
    url, st = server
    st.faults.append({"path": "/v1/models", "status": 429, "count": 1, "headers": {"retry-after-ms": "250"}})
    st.faults.append({"path": "/v1/models", "status": 503, "count": 2})
    c, sleeps = client(url, initial_delay=1.0, jitter=0.0)
    c.call("list models", c.raw.models.list)
    assert sleeps == [0.25, 2.0, 4.0]  # retry-after-ms, then exponential backoff (retries 2 and 3)


def test_401_fails_at_once_with_a_clear_message(server):
    url, st = server
    c, sleeps = client(url, key="sk-wrong-key-abcdefghijkl")
    with pytest.raises(AuthError) as err:
        c.call("list models", c.raw.models.list)
    msg = str(err.value)
    assert "401" in msg and "api_key_env" in msg and "rejected the API key" in msg
    assert "sk-wrong-key-abcdefghijkl" not in msg
    assert sleeps == [] and st.stats == {}  # one request, refused before anything is counted


def test_quota_429_is_not_retried(server):
    url, st = server
    st.faults.append({"path": "/v1/models", "status": 429, "count": 5, "code": "insufficient_quota",
                      "message": "You exceeded your current quota"})
    c, sleeps = client(url)
    with pytest.raises(QuotaError, match="quota"):
        c.call("list models", c.raw.models.list)
    assert sleeps == []


def test_bad_request_is_not_retried_and_names_the_request(server):
    url, _ = server
    c, sleeps = client(url)
    with pytest.raises(APIRequestError, match="chat completion .*404"):
        c.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert sleeps == []


def test_retries_give_up_and_too_long_retry_after_is_an_error(server):
    url, st = server
    st.faults.append({"path": "/v1/models", "status": 500, "count": 10})
    c, sleeps = client(url, max_retries=3, jitter=0.0)
    with pytest.raises(RetriesExhausted, match="3 retries"):
        c.call("list models", c.raw.models.list)
    assert len(sleeps) == 3
    st.faults[:] = [{"path": "/v1/models", "status": 429, "count": 1, "headers": {"Retry-After": "5000"}}]
    c, sleeps = client(url, max_retry_after=600)
    with pytest.raises(RetriesExhausted, match="Retry-After"):
        c.call("list models", c.raw.models.list)
    assert sleeps == []


def test_connection_errors_are_retried(tmp_path):
    c, sleeps = client("http://127.0.0.1:9/v1", max_retries=2, jitter=0.0)
    with pytest.raises(RetriesExhausted, match="connection error"):
        c.call("list models", c.raw.models.list)
    assert sleeps == [1.0, 2.0]


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after({"retry-after": date}) <= 31
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None


def test_credentials_come_from_the_environment_only():
    with pytest.raises(AuthError, match="MY_KEY"):
        credentials_from_env("MY_KEY", environ={})
    cr = credentials_from_env("MY_KEY", "MY_URL", environ={"MY_KEY": KEY, "MY_URL": "http://x/v1"})
    assert cr.base_url == "http://x/v1" and cr.api_key == KEY
    assert KEY not in repr(cr) and "MY_KEY" in cr.source
