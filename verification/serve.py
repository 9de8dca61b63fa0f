"""Reference prediction server: any suspect file behind the HTTP contract ``verify.py`` speaks.

    python -m verification.serve <model.ckpt | model.pt | model.onnx> [--host 127.0.0.1] [--port 0] [--max-batch N]

* ``POST /predict`` -- body: a ``.npy`` float32 array B×C×H×W in [0, 1]; answer: ``.npy``
  float32 probabilities (segmentation B×1×H×W, classification B×K), or JSON
  ``{"probabilities": [...], "shape": [...]}`` when the request says ``Accept: application/json``.
* ``GET /health`` -- JSON ``{"status", "task", "kind", "file", "sha256", "queries", "max_batch"}``.
* Bad requests get ``400`` (a batch over ``--max-batch``: ``413`` with ``max_batch``) and a
  JSON ``{"error": ...}`` body; a model failure ``500``.

The first line on stdout is the bound base URL (``http://127.0.0.1:PORT``; with ``--port 0`` the
OS picks a free port), so scripts and tests can read it. It binds to loopback by default and
has no authentication: put it behind a real gateway before exposing it. Standard library only
(``http.server.ThreadingHTTPServer``); predictions run one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

from verification.adapters import TASKS, SuspectError, decode_npy, encode_npy, is_url, open_suspect

log = logging.getLogger("medmark.serve")
MAX_BODY_BYTES = 1 << 30  # 1 GiB: far above any verification batch, below a memory accident


class PredictionServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` holding one suspect (``predict`` serialised by a lock)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], suspect, max_batch: int | None = None):
        super().__init__(address, PredictHandler)
        self.suspect = suspect
        self.max_batch = max_batch
        self.lock = threading.Lock()
        self.identity = suspect.identity()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class PredictHandler(BaseHTTPRequestHandler):
    server: PredictionServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    # -- replies
    def _send(self, code: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            log.info("client %s disconnected before the answer", self.address_string())

    def _json(self, code: int, doc: dict) -> None:
        self._send(code, json.dumps(doc).encode("utf-8"), "application/json")

    def _error(self, code: int, message: str, **extra: Any) -> None:
        self._json(code, {"error": message, **extra})

    # -- routes
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path.split("?")[0].rstrip("/") != "/health":
            self._error(404, f"no route {self.path!r}: POST /predict, GET /health")
            return
        ident = self.server.identity
        self._json(200, {"status": "ok", "task": self.server.suspect.task, "kind": ident.get("kind"),
                         "file": ident.get("path"), "sha256": ident.get("sha256"),
                         "queries": int(self.server.suspect.queries), "max_batch": self.server.max_batch})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self.path.split("?")[0].rstrip("/") != "/predict":
            self._error(404, f"no route {self.path!r}: POST /predict, GET /health")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "Content-Length is required")
            return
        if length <= 0 or length > MAX_BODY_BYTES:
            self._error(400, f"body of {length} bytes; expected a .npy array of at most {MAX_BODY_BYTES} bytes")
            return
        body = self.rfile.read(length)
        try:
            array = decode_npy(body)
        except Exception as err:
            self._error(400, f"body is not a .npy array ({type(err).__name__}: {err}); send np.save bytes of a "
                             "float32 B×C×H×W array")
            return
        if array.ndim != 4 or array.dtype.kind != "f":
            self._error(400, f"expected a float B×C×H×W array, got dtype {array.dtype} shape {list(array.shape)}")
            return
        if len(array) == 0:
            self._error(400, "empty batch")
            return
        if self.server.max_batch and len(array) > self.server.max_batch:
            self._error(413, f"batch of {len(array)} images exceeds --max-batch {self.server.max_batch}",
                        max_batch=self.server.max_batch)
            return
        if not np.isfinite(array).all():
            self._error(400, "images contain NaN/inf")
            return
        images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        try:
            with self.server.lock:
                probs = self.server.suspect.predict(images)
        except (SuspectError, ValueError, RuntimeError) as err:
            code = 400 if isinstance(err, (SuspectError, ValueError)) and "shape" in str(err) else 500
            self._error(code, f"prediction failed: {type(err).__name__}: {str(err)[:500]}")
            return
        out = probs.detach().float().cpu().numpy()
        accept = self.headers.get("Accept") or ""
        if "application/json" in accept and "application/x-npy" not in accept:
            self._json(200, {"probabilities": out.tolist(), "shape": list(out.shape)})
        else:
            self._send(200, encode_npy(out), "application/x-npy")


def serve(model: str, host: str = "127.0.0.1", port: int = 0, max_batch: int | None = None, device: str = "cpu",
          task: str | None = None, factories: tuple[str, ...] = ()) -> PredictionServer:
    """Build the server (bound, not yet serving): ``server.serve_forever()`` runs it."""
    if is_url(model):
        raise SuspectError(f"{model}: serve a local file (.ckpt, .pt/.ts/.torchscript, .onnx), not a URL")
    suspect = open_suspect(model, task=task, device=device, factories=factories)
    return PredictionServer((host, port), suspect, max_batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verification.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="checkpoint (.ckpt), TorchScript (.pt/.ts/.torchscript) or ONNX (.onnx)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = a free one; the URL is printed first)")
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch accepted (413 above)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="for files without a medmark.json record (default: the file's own task)")
    parser.add_argument("--factories", nargs="+", default=[],
                        help="extra trusted factories for a checkpoint's backbone _target_ (exact names, or "
                             "'module.' for what that module defines); models.safe_reader's table always applies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        server = serve(args.model, args.host, args.port, args.max_batch, args.device, args.task,
                       tuple(args.factories))
    except (SuspectError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(server.url, flush=True)  # first line: the bound URL
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: this server has no authentication", args.host)
    ident = server.identity
    log.info("serving %s %s (%s, sha256 %s) at %s/predict", ident["kind"], ident.get("path"), server.suspect.task,
             str(ident.get("sha256"))[:16], server.url)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        log.info("stopped after %d queries", server.suspect.queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
