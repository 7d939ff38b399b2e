"""Trust, round 3, black-box side: the local server's key check comes first, the client stops on a
list that makes no progress, refuses a malformed reply in one line, and keeps under the spend cap."""
import http.client
import json

import pytest

from daunce_core.localapi import ServerConfig, serve_in_thread

from helpers import ROOT

KEY = "sk-trust3-test-abcdef0123456789"


def _raw(url, method, path, headers, body=b""):
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    if body:
        conn.send(body)
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    conn.close()
    return out


def test_server_checks_the_key_before_reading_or_counting(tmp_path):
    with serve_in_thread(ServerConfig(state_dir=str(tmp_path / "s"), models={}), KEY) as (url, st):
        # an unauthenticated request declaring a 1.5 GB body is refused without reading it (the
        # test sends none: a server that read first would wait for it and time out)
        st_code, body = _raw(url, "POST", "/v1/files", {"Content-Length": str(1_500_000_000)})
        assert st_code == 401 and body["error"]["code"] == "invalid_api_key"
        # and a -1 length is refused too, instead of reading until the client closes
        assert _raw(url, "POST", "/v1/files", {"Content-Length": "-1"})[0] == 401
        for i in range(200):
            assert _raw(url, "GET", f"/v1/x{i}", {})[0] == 401
        assert st.stats == {}  # nothing counted before the key check
        auth = {"Authorization": f"Bearer {KEY}"}
        code, body = _raw(url, "POST", "/v1/chat/completions", dict(auth, **{"Content-Length": "-1"}))
        assert code == 400 and "Content-Length" in body["error"]["message"]
        code, body = _raw(url, "POST", "/v1/files", dict(auth, **{"Content-Length": str(2 ** 40)}))
        assert code == 413 and "limit" in body["error"]["message"]
        assert _raw(url, "POST", "/v1/chat/completions", auth)[0] == 411
        for i in range(200):  # authenticated unknown paths: one bounded key, not one per path
            assert _raw(url, "GET", f"/v1/x{i}", auth)[0] == 404
        assert len(st.stats) <= 6 and st.stats["GET other"] == 200


class _Fake:
    """A tiny HTTP endpoint answering every request with one fixed reply (and counting them)."""

    def __init__(self, body: bytes, ctype="application/json"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.n = 0

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self):
                fake.n += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _client(url):
    from daunce_core.blackbox.client import APIClient, Credentials
    return APIClient(Credentials(url, KEY), timeout=10)


@pytest.mark.parametrize("method", ["list_files", "list_jobs"])
def test_client_stops_on_a_list_that_repeats_its_page(method):
    from daunce_core.blackbox.client import BlackboxError
    page = {"object": "list", "has_more": True, "data": [
        {"id": "ftjob-1" if method == "list_jobs" else "file-1", "object": "file", "bytes": 1, "created_at": 0,
         "filename": "a", "purpose": "fine-tune", "status": "processed"}]}
    fake = _Fake(json.dumps(page).encode())
    try:
        with pytest.raises(BlackboxError, match=r"(?s)list .*makes no progress"):
            getattr(_client(fake.url), method)()
        assert fake.n == 2  # the repeated page is seen at once, not after hundreds of requests
    finally:
        fake.close()


@pytest.mark.parametrize("body,ctype", [(b'{"id": "chatcmpl-1", "choices": [', "application/json"),
                                        (b"<html><body>Bad gateway</body></html>", "text/html")])
def test_client_names_the_request_on_a_malformed_200(body, ctype):
    from daunce_core.blackbox.client import BlackboxError
    fake = _Fake(body, ctype)
    try:
        with pytest.raises(BlackboxError) as ei:
            _client(fake.url).chat(model="m", messages=[{"role": "user", "content": "hi"}])
        msg = str(ei.value)
        assert "chat completion (m)" in msg and fake.url in msg and "\n" not in msg and KEY not in msg
    finally:
        fake.close()


@pytest.mark.parametrize("template", ["Q: {Prompt}\nA:", "Q: { prompt }", "no placeholder at all"])
def test_an_lm_template_without_prompt_is_refused_naming_the_key(template):
    from daunce_core.api import LMTask
    from daunce_core.lm.settings import LLMSettings
    from daunce_core.settings import ConfigError
    with pytest.raises(ConfigError, match=r"^llm\.template .*has no \{prompt\}") as ei:
        LLMSettings.from_config({"llm": {"template": template}}).validate()
    assert "\n" not in str(ei.value).replace("\\n", "")
    with pytest.raises(ValueError, match=r"^LMTask\.template .*has no \{prompt\}"):
        LMTask(tokenizer=None, template=template)
    # the accepted forms: the prompt placed once, or the prompt alone
    assert LLMSettings.from_config({"llm": {"template": "Q: {prompt}\nA:"}}).validate().template == "Q: {prompt}\nA:"
    LMTask(tokenizer=None, template="")


def test_the_default_token_estimate_bounds_the_local_tokenizer(base, tiny_study):
    """bytes/4 undercounted the local server's fine-tuning tokens (6,904 used, 3,772 estimated);
    the default estimate must be an upper bound of what the server's tokenizer counts."""
    from transformers import AutoTokenizer

    from daunce_core.blackbox import backdoor as B
    from daunce_core.blackbox.config import BlackboxConfig
    from daunce_core.blackbox.cost import TokenEstimator
    from daunce_core.localapi.model import encode_chat

    cfg = BlackboxConfig.from_dict(tiny_study)
    tok = AutoTokenizer.from_pretrained(base)
    train, query = B.make_study_data(cfg.data)
    te = TokenEstimator(cfg.cost.chars_per_token, 1.0, cfg.cost.message_overhead)  # no safety margin
    for r in train:
        msgs = B.chat_example(r)["messages"]
        assert te.messages(msgs) >= len(encode_chat(tok, msgs)[0])
    old = TokenEstimator(4.0, 1.25, 4)  # the former default undercounts this tokenizer
    assert sum(old.messages(B.chat_example(r)["messages"]) for r in train) < sum(
        len(encode_chat(tok, B.chat_example(r)["messages"])[0]) for r in train)


def test_the_spend_cap_is_checked_before_each_paid_call():
    from daunce_core.blackbox.cost import SpendMeter, SpendNotAllowed
    reply = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
             "usage": {"prompt_tokens": 400, "completion_tokens": 100, "total_tokens": 500}}
    fake = _Fake(json.dumps(reply).encode())
    try:
        c = _client(fake.url)
        # 1000 USD per 1M tokens: each call really costs $0.50; the cap allows two
        c.meter = SpendMeter({"m": {"input": 1000, "output": 1000}}, 1.0)
        msgs = [{"role": "user", "content": "hi"}]
        for _ in range(2):
            c.chat(model="m", messages=msgs, max_completion_tokens=100)
        assert c.meter.spent == pytest.approx(1.0)
        with pytest.raises(SpendNotAllowed, match=r"would exceed blackbox.max_spend_usd = \$1.00; it was not sent"):
            c.chat(model="m", messages=msgs, max_completion_tokens=100)
        assert fake.n == 2 and c.meter.spent <= 1.0  # the third request never left
    finally:
        fake.close()


def test_a_download_from_a_silent_network_times_out_naming_the_setting(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers: the torchvision download must give
    up (here after 1 s) with one line naming data.download, not hang."""
    import socket
    import threading

    import torchvision

    from daunce_core import data as D
    from daunce_core.config import DataConfig
    from daunce_core.data import DataError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # accepted, never answered
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{srv.getsockname()[1]}/"])
    monkeypatch.setattr(D, "NETWORK_TIMEOUT_S", 1.0)
    try:
        result: dict = {}

        def run():
            try:
                D.load_dataset(DataConfig(name="MNIST", root=str(tmp_path / "empty"), download=True))
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                result["exc"] = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the download hung"
        exc = result["exc"]
        assert isinstance(exc, DataError) and "data.download" in str(exc) and "\n" not in str(exc)
        assert socket.getdefaulttimeout() is None  # the process's default is restored
    finally:
        stop.set()
        for c in held:
            c.close()
        srv.close()


def test_fig4_default_data_keeps_the_text_matching_baseline_from_perfect_by_construction():
    """With the workflow's default (varied refusals) a theta_0 that replies exactly its query's
    target -- a perfect backdoor -- no longer hands the response-matching baseline every
    backdoored example; with identical refusals (the second, named setting) it does."""
    import numpy as np
    import yaml

    from daunce_core.blackbox import backdoor as B
    from daunce_core.blackbox.config import BlackboxConfig

    section = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["blackbox"]
    precision = {}
    for name, refusals in (("default", section["data"]["refusals"]), ("identical", [])):
        cfg = BlackboxConfig.from_dict({**section, "data": {**section["data"], "refusals": refusals}})
        train, query = B.make_study_data(cfg.data)
        trig = [j for j, q in enumerate(query) if q["triggered"]]
        scores = B.response_match_scores([r["target"] for r in train], [q["target"] for q in query])
        is_bd = np.array([bool(r.get("backdoor")) for r in train])
        precision[name] = float(B.precision_at_k(scores, is_bd, trig, 10).mean())
    assert section["data"]["refusals"] == B.VARIED_REFUSALS
    assert precision["identical"] == 1.0
    assert precision["default"] < 0.9, precision


def test_a_fine_tune_of_a_fine_tune_is_priced_as_its_base():
    """The meter prices every call; the local server names a fine-tune of theta_0 ft:ft:<base>:..."""
    from daunce_core.blackbox.cost import price_key
    prices = {"tiny-x": {"input": 1}, "gpt-4o": {"input": 2}, "gpt-4o-mini": {"input": 1}}
    assert price_key("ft:ft:tiny-x:daunce-local:a:b:daunce-local:c:d", prices) == "tiny-x"
    assert price_key("ft:gpt-4o-mini-2024-07-18:org::abc", prices) == "gpt-4o-mini"
    assert price_key("tiny-x", prices) == "tiny-x" and price_key("other", prices) is None
