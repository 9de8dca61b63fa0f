"""The HTTP suspect client survives hostile endpoints (verification/adapters.py).

Hostile servers run on 127.0.0.1 in daemon threads (``http.server``), each bounded in time:
a slow drip (headers or body one byte per 0.2 s), an endless body, a huge Content-Length, a
cross-origin 302 (to another loopback port that records whether an ``Authorization`` header
arrived), a wrong-shape and a NaN answer. Every refusal is a ``SuspectError`` subclass (what
``verify.py`` turns into exit 2) naming the URL; deadlines are measured, not assumed.
"""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from verification.adapters import (
    HttpOptions,
    HttpSuspect,
    InsecureTokenError,
    NonFiniteOutputError,
    RedirectRefusedError,
    ResponseTooLargeError,
    SuspectError,
    encode_npy,
)

TIMEOUT_S = 1.5
SLACK_S = 1.0          # thread scheduling on a loaded 2-core machine
DRIP_S = 0.2
SERVER_LIMIT_S = 20.0  # no hostile handler runs longer than this, whatever the client does
TOKEN = "s3cr3t-bearer-token-for-tests"
IMAGES = (2, 3, 16, 16)


def _probs(n: int) -> np.ndarray:
    return np.full((n, 1, IMAGES[2], IMAGES[3]), 0.25, dtype=np.float32)


class _Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    redirect_to = ""   # set per server
    bytes_sent = 0     # endless body: how much the server managed to push

    def log_message(self, *args):  # silence
        pass

    def _batch(self) -> int:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        return len(np.load(io.BytesIO(body), allow_pickle=False))

    def _write_slowly(self, data: bytes) -> None:
        stop = time.monotonic() + SERVER_LIMIT_S
        for i in range(len(data)):
            if time.monotonic() > stop:
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(DRIP_S)

    def do_POST(self):  # noqa: N802
        mode = self.path.strip("/")
        n = self._batch()
        try:
            if mode == "drip_body":  # honest headers, body one byte per 0.2 s (resets a socket timeout)
                payload = encode_npy(_probs(n))
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.flush()
                self._write_slowly(payload)
            elif mode == "drip_headers":  # even the status line arrives one byte at a time
                self._write_slowly(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
            elif mode == "endless":  # no Content-Length, a body that never ends
                self.send_response(200)
                self.send_header("Content-Type", "application/x-npy")
                self.send_header("Connection", "close")
                self.end_headers()
                block = b"\x00" * 65536
                stop = time.monotonic() + SERVER_LIMIT_S
                while time.monotonic() < stop:
                    self.wfile.write(block)
                    type(self).bytes_sent += len(block)
            elif mode == "huge_length":  # claims 1.5 GB, sends a little
                self.send_response(200)
                self.send_header("Content-Length", str(1_500_000_000))
                self.end_headers()
                self.wfile.write(b"\x93NUMPY" + b"\x00" * 1000)
            elif mode == "redirect":
                self.send_response(302)
                self.send_header("Location", self.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif mode == "shape":
                payload = encode_npy(np.full((n, 3, 5), 0.5, dtype=np.float32))
                self._answer(payload)
            elif mode == "nan":
                payload = encode_npy(np.full_like(_probs(n), np.nan))
                self._answer(payload)
            elif mode == "inf_json":  # JSON's Infinity, which Python's json accepts
                doc = [[[[float("inf")] * IMAGES[3]] * IMAGES[2]]] * n
                self._answer(json.dumps({"probabilities": doc}).encode())
            elif mode == "lying_npy":  # a tiny .npy whose header declares a 80 TB array
                buffer = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    buffer, {"descr": "<f8", "fortran_order": False, "shape": (n, 1, 10 ** 6, 10 ** 7)})
                self._answer(buffer.getvalue() + b"\x00" * 64)
            else:
                self._answer(encode_npy(_probs(n)))
        except (BrokenPipeError, ConnectionResetError, OSError):  # the client gave up: expected
            pass

    def _answer(self, payload: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Recorder(BaseHTTPRequestHandler):
    """The redirect target: records every request and whether it carried credentials."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *args):
        pass

    def _record(self):
        type(self).seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        payload = encode_npy(_probs(IMAGES[0]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_GET = _record  # noqa: N815


def _start(handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers():
    recorder = _start(_Recorder)
    hostile = _start(_Hostile)
    _Hostile.redirect_to = f"http://127.0.0.1:{recorder.server_address[1]}/stolen"
    yield f"http://127.0.0.1:{hostile.server_address[1]}", recorder
    for server in (hostile, recorder):
        server.shutdown()
        server.server_close()


def _suspect(url: str, **options) -> HttpSuspect:
    return HttpSuspect(url, task="segmentation", options=HttpOptions(**{"retries": 0, "timeout_s": TIMEOUT_S,
                                                                        **options}))


@pytest.mark.parametrize("mode", ["drip_body", "drip_headers"])
def test_a_dripping_server_is_cut_off_at_the_total_deadline(servers, mode):
    base, _ = servers
    suspect = _suspect(f"{base}/{mode}")
    started = time.monotonic()
    with pytest.raises(SuspectError, match=r"timed out after 1.5 s") as info:
        suspect.predict(torch.rand(*IMAGES))
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT_S + SLACK_S, f"deadline not honoured: {elapsed:.2f} s"
    assert elapsed >= TIMEOUT_S * 0.9  # it really waited for the server, not refused up front
    assert f"/{mode}" in str(info.value) and suspect.queries == 0


def test_retries_each_get_their_own_deadline_and_no_more(servers):
    base, _ = servers
    suspect = _suspect(f"{base}/drip_body", retries=1, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(SuspectError, match=r"timed out.*2 attempts"):
        suspect.predict(torch.rand(*IMAGES))
    assert time.monotonic() - started < 2 * TIMEOUT_S + 0.05 + SLACK_S


def test_an_endless_body_stops_at_the_size_cap_quickly(servers):
    base, _ = servers
    suspect = _suspect(f"{base}/endless", timeout_s=10)
    limit = suspect.answer_size_limit(IMAGES)
    assert limit < 1 << 20  # 2 × 16 × 16 values: well under a megabyte
    started = time.monotonic()
    with pytest.raises(ResponseTooLargeError, match=r"exceeds the \d+ bytes") as info:
        suspect.predict(torch.rand(*IMAGES))
    assert time.monotonic() - started < 5.0  # the cap, not the 10 s deadline, ended it
    assert f"{base}/endless" in str(info.value) and isinstance(info.value, SuspectError)


def test_a_huge_content_length_is_refused_before_reading(servers):
    base, _ = servers
    suspect = _suspect(f"{base}/huge_length")
    started = time.monotonic()
    with pytest.raises(ResponseTooLargeError, match=r"1500000000 bytes \(Content-Length\)") as info:
        suspect.predict(torch.rand(*IMAGES))
    assert time.monotonic() - started < 1.0
    assert f"{base}/huge_length" in str(info.value) and suspect.requests == 1  # not retried either


def test_a_cross_origin_redirect_is_refused_and_the_target_never_sees_the_token(servers, monkeypatch):
    base, recorder = servers
    _Recorder.seen.clear()
    monkeypatch.setenv("MEDMARK_TEST_TOKEN", TOKEN)
    suspect = _suspect(f"{base}/redirect", token_env="MEDMARK_TEST_TOKEN", allow_insecure_token=True, retries=2)
    with pytest.raises(RedirectRefusedError, match=r"HTTP 302 redirecting to .*/stolen") as info:
        suspect.predict(torch.rand(*IMAGES))
    assert TOKEN not in str(info.value)
    assert suspect.requests == 1  # not retried
    time.sleep(0.2)
    assert _Recorder.seen == []   # nothing reached the other origin, with or without the token


def test_a_token_over_plain_http_is_refused_unless_allowed(servers, monkeypatch):
    base, _ = servers
    monkeypatch.setenv("MEDMARK_TEST_TOKEN", TOKEN)
    with pytest.raises(InsecureTokenError, match=r"http.allow_insecure_token") as info:
        _suspect(f"{base}/ok", token_env="MEDMARK_TEST_TOKEN")
    assert TOKEN not in str(info.value) and f"{base}/ok" in str(info.value)
    allowed = _suspect(f"{base}/ok", token_env="MEDMARK_TEST_TOKEN", allow_insecure_token=True)
    assert allowed.predict(torch.rand(*IMAGES)).shape == (2, 1, 16, 16)
    # no token: plain http is fine
    assert _suspect(f"{base}/ok").predict(torch.rand(*IMAGES)).shape == (2, 1, 16, 16)


def test_allow_insecure_token_is_a_config_key_defaulting_to_false():
    from omegaconf import OmegaConf

    from conftest import CONFIGS
    cfg = OmegaConf.load(CONFIGS / "verify.yaml")
    assert cfg.http.allow_insecure_token is False
    assert HttpOptions.from_config(cfg.http).allow_insecure_token is False


@pytest.mark.parametrize("mode,error,message", [
    ("shape", SuspectError, r"answered shape \(2, 3, 5\)"),
    ("nan", NonFiniteOutputError, r"non-finite"),
    ("inf_json", NonFiniteOutputError, r"non-finite"),
    ("lying_npy", SuspectError, r"corrupt \.npy.*declares shape"),
])
def test_wrong_shape_and_non_finite_answers_are_named(servers, mode, error, message):
    base, _ = servers
    suspect = _suspect(f"{base}/{mode}")
    with pytest.raises(error, match=message) as info:
        suspect.predict(torch.rand(*IMAGES))
    assert f"{base}/{mode}" in str(info.value) and suspect.queries == 0


def test_a_well_behaved_server_still_answers(servers):
    base, _ = servers
    suspect = _suspect(f"{base}/ok")
    probs = suspect.predict(torch.rand(*IMAGES))
    assert torch.allclose(probs, torch.full((2, 1, 16, 16), 0.25)) and suspect.queries == 2
