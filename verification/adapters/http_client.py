"""HTTP suspects: a client that survives hostile endpoints (total deadline, answer size cap, no redirects,
bearer token over https only)."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verification.adapters.base import _check_images, _check_task, check_probabilities
from verification.suspect import SuspectError


@dataclass
class HttpOptions:
    """Client settings of :class:`HttpSuspect` (``verify.py http.*``).

    Attributes:
        timeout_s: seconds per request (connect + answer).
        retries: extra attempts after a timeout, a connection error, HTTP 5xx or 429.
        backoff_s: wait before retry i is ``backoff_s * 2**i`` (or the server's ``Retry-After``, capped at 60 s).
        max_queries: the query budget (images sent, retries included); ``None`` = unlimited. A
            batch that would exceed it is not sent: :class:`SuspectError`.
        json: ask for JSON answers (``Accept: application/json``) instead of .npy.
        max_batch: images per request (``None`` = the caller's batches as they come); a 413
            answer with ``max_batch`` in its JSON body lowers it automatically.
        token_env: name of an environment variable holding a bearer token (sent as
            ``Authorization: Bearer ...``; never written to reports or logs).
        allow_insecure_token: send that token over plain ``http://`` too (default: refused,
            only ``https://`` carries it; a loopback test server needs this set).

    ``timeout_s`` is the *total* time of one request (connect, send, headers and the whole
    body) on a monotonic clock, not a per-read socket timeout: a server that drips one byte at
    a time is cut off when it passes.
    """

    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    max_queries: int | None = None
    json: bool = False
    max_batch: int | None = None
    token_env: str | None = None
    allow_insecure_token: bool = False

    @classmethod
    def from_config(cls, cfg: Any | None) -> HttpOptions:
        """From a mapping / DictConfig (unknown keys are an error naming ``http.<key>``)."""
        if cfg is None:
            return cls()
        data = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SuspectError(f"http.{unknown[0]}: unknown option (known: {', '.join(sorted(known))})")
        options = cls(**{k: v for k, v in data.items() if v is not None or k in ("max_queries", "max_batch",
                                                                                  "token_env")})
        if not options.timeout_s or float(options.timeout_s) <= 0:
            raise SuspectError(f"http.timeout_s must be > 0, got {options.timeout_s}")
        if int(options.retries) < 0:
            raise SuspectError(f"http.retries must be >= 0, got {options.retries}")
        if options.max_queries is not None and int(options.max_queries) < 1:
            raise SuspectError(f"http.max_queries must be >= 1 or null, got {options.max_queries}")
        if options.max_batch is not None and int(options.max_batch) < 1:
            raise SuspectError(f"http.max_batch must be >= 1 or null, got {options.max_batch}")
        return options


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """A .npy body (no pickles); ValueError for anything else.

    The header's shape × itemsize must fit the bytes received: a 100-byte body declaring a
    terabyte array is refused before numpy allocates it.
    """
    if not data.startswith(b"\x93NUMPY"):
        raise ValueError("not .npy bytes (no \\x93NUMPY magic)")
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are not accepted")
    declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if all(d >= 0 for d in shape) else -1
    if declared < 0 or declared > len(data) - stream.tell():
        raise ValueError(f"header declares shape {tuple(shape)} of {dtype} ({declared} bytes) but the body has "
                         f"{len(data) - stream.tell()} bytes after the header")
    return np.load(io.BytesIO(data), allow_pickle=False)


class InsecureTokenError(SuspectError):
    """A bearer token would travel over plain ``http://`` (``http.allow_insecure_token`` is false)."""


class RedirectRefusedError(SuspectError):
    """The endpoint answered a 3xx redirect; redirects are not followed (see :class:`HttpSuspect`)."""


class ResponseTooLargeError(SuspectError):
    """The answer is larger than the request can justify (:meth:`HttpSuspect.answer_size_limit`)."""


class _DeadlinePassed(Exception):
    """Internal: a request ran past its total deadline."""


# Response size: the request fixes how many values an answer may hold (B×K or B×1×H×W); each
# value may take 8 bytes (.npy float64) and JSON text is longer than binary (a double prints as
# up to ~25 characters plus separators and indentation): factor 6 on 8 bytes = 48 bytes a value.
# The headroom covers the .npy header or JSON wrapper.
_BYTES_PER_VALUE = 8
_JSON_OVERHEAD = 6
_RESPONSE_HEADROOM = 64 << 10
_UNKNOWN_CLASSES = 1000      # classification without a known K: at most max(1000, H×W) classes
_ERROR_BODY_BYTES = 4 << 10  # of a 4xx/5xx answer, only this much is read (for the message)
_HEALTH_BYTES = 64 << 10
_READ_CHUNK = 64 << 10


class _Deadline:
    """One request's total deadline: at ``time.monotonic() >= end`` a timer shuts its sockets down.

    Socket timeouts restart on every byte; shutting the socket down is what interrupts a read
    blocked inside ``http.client`` (status line, headers or body) when the total time is up.
    """

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(self.seconds, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)
        return sock

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def check(self) -> None:
        if self.expired or self.remaining() <= 0:
            self.expire()
            raise _DeadlinePassed

    def cancel(self) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched_connection(base: type, deadline: _Deadline) -> type:
    """``base`` (HTTPConnection / HTTPSConnection) whose sockets ``deadline`` can shut down."""

    class Watched(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            create = self._create_connection
            self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))

    return Watched


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):  # noqa: ANN001 - urllib signature
        return self.do_open(_watched_connection(http.client.HTTPConnection, self._deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def https_open(self, req):  # noqa: ANN001 - urllib signature
        kwargs: dict[str, Any] = {"context": self._context}
        if hasattr(self, "_check_hostname"):  # Python < 3.12
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(_watched_connection(http.client.HTTPSConnection, self._deadline), req, **kwargs)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is refused, never followed: a redirect would carry the bearer token (and the images)
    to whatever origin the endpoint names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib signature
        if fp is not None:
            fp.close()
        raise RedirectRefusedError(f"{req.full_url}: answered HTTP {code} redirecting to {newurl[:200]!r}; "
                                   "redirects are not followed (the token and images would go to another "
                                   "origin) -- give the final URL as suspect=")


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline),
                                       _RefuseRedirects())


def _read_capped(response: Any, limit: int, deadline: _Deadline, where: str, what: str = "answer") -> bytes:
    """The body in chunks: Content-Length checked up front, bytes counted, deadline checked per chunk."""
    length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise SuspectError(f"{where}: answered a malformed Content-Length {length[:50]!r}") from None
        if declared > limit:
            raise ResponseTooLargeError(f"{where}: {what} of {declared} bytes (Content-Length) exceeds the "
                                        f"{limit} bytes this request can need; not read")
    read = getattr(response, "read1", None) or response.read
    buffer = bytearray()
    while True:
        deadline.check()
        chunk = read(_READ_CHUNK)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > limit:
            raise ResponseTooLargeError(f"{where}: {what} exceeds the {limit} bytes this request can need; "
                                        f"stopped reading after {len(buffer)} bytes")
    deadline.check()  # an EOF caused by the deadline's shutdown is a timeout, not an answer
    return bytes(buffer)


class HttpSuspect:
    """A model behind an HTTP endpoint (see the module docstring for the wire format).

    ``queries`` counts images answered; ``images_sent`` also counts images of failed attempts
    (what the endpoint's owner would see); ``requests`` counts HTTP requests. ``model`` is
    ``None``: an HTTP suspect offers no weights to attack.

    Hostile endpoints: each request has a *total* deadline (``http.timeout_s``, monotonic
    clock, enforced by shutting the socket down); an answer may be at most
    :meth:`answer_size_limit` bytes (Content-Length checked before reading, bytes counted while
    reading); 3xx redirects are refused, not followed (:class:`RedirectRefusedError`); a bearer
    token is sent only over ``https://`` unless ``http.allow_insecure_token``
    (:class:`InsecureTokenError`); NaN/inf answers raise :class:`NonFiniteOutputError`.
    """

    kind = "http"
    model = None
    num_classes: int | None = None

    def __init__(self, url: str, task: str = "segmentation", options: HttpOptions | None = None):
        _check_task(task, url)
        if task is None:
            raise SuspectError(f"{url}: an HTTP suspect needs the task (segmentation or classification)")
        self.url = url
        self.task = task
        self.options = options or HttpOptions()
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if self.options.token_env and scheme != "https" and not self.options.allow_insecure_token:
            raise InsecureTokenError(f"{url}: http.token_env={self.options.token_env} would send the bearer token "
                                     f"over plain {scheme}:// (readable on the way); use https://, or set "
                                     "http.allow_insecure_token=true for a trusted network (e.g. loopback)")
        self.queries = 0
        self.images_sent = 0
        self.requests = 0
        self.retried = 0
        self.seconds = 0.0
        self.max_batch = int(self.options.max_batch) if self.options.max_batch else None
        self.last_content_type: str | None = None
        self._health: dict | None = None

    # -- wire
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/octet-stream",
                   "Accept": "application/json" if self.options.json else "application/x-npy, application/json;q=0.5",
                   "User-Agent": "medmark-verify"}
        if self.options.token_env:
            token = os.environ.get(self.options.token_env)
            if not token:
                raise SuspectError(f"http.token_env={self.options.token_env}: environment variable is not set")
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def answer_size_limit(self, shape: tuple[int, ...]) -> int:
        """Most bytes an answer to images of ``shape`` (B×C×H×W) may have.

        Values an answer may hold (segmentation B×H×W, classification B×K with K the
        verification's classes, else at most max(1000, H×W)) × 8 bytes × 6 (JSON text) + 64 KiB.
        """
        batch, _, height, width = (int(d) for d in shape)
        per_image = height * width if self.task == "segmentation" else \
            int(self.num_classes or max(_UNKNOWN_CLASSES, height * width))
        return batch * per_image * _BYTES_PER_VALUE * _JSON_OVERHEAD + _RESPONSE_HEADROOM

    def _timed_out(self) -> str:
        return f"timed out after {float(self.options.timeout_s):g} s (http.timeout_s, total per request)"

    def _post(self, body: bytes, n: int, limit: int) -> tuple[bytes, str]:
        """POST with retries; returns ``(body, content type)``; raises SuspectError naming the URL."""
        attempts = int(self.options.retries) + 1
        timeout = float(self.options.timeout_s)
        last = ""
        for attempt in range(attempts):
            budget = self.options.max_queries
            if budget is not None and self.images_sent + n > int(budget):
                raise SuspectError(f"{self.url}: query budget exceeded: sending {n} more images would make "
                                   f"{self.images_sent + n} > http.max_queries={budget} "
                                   f"({self.queries} answered so far)")
            request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            self.requests += 1
            self.images_sent += n
            retry_after = None
            started = time.perf_counter()
            deadline = _Deadline(timeout)
            try:
                with _opener(deadline).open(request, timeout=timeout) as response:
                    data = _read_capped(response, limit, deadline, self.url)
                    content_type = response.headers.get("Content-Type", "") or ""
                return data, content_type
            except SuspectError:  # too large, redirect: the endpoint's answer is refused, not retried
                raise
            except urllib.error.HTTPError as err:
                try:
                    text = _excerpt(err.read(_ERROR_BODY_BYTES) if err.fp else b"")
                except Exception:  # noqa: BLE001 - the error body is only for the message
                    text = ""
                if deadline.expired:
                    last = self._timed_out()
                else:
                    if err.code == 413:
                        raise _TooLarge(text) from None
                    last = f"HTTP {err.code} {err.reason}" + (f": {text}" if text else "")
                    if not (err.code >= 500 or err.code == 429):
                        raise SuspectError(f"{self.url}: {last}") from None
                    retry_after = _retry_after(err.headers.get("Retry-After") if err.headers else None)
            except (_DeadlinePassed, TimeoutError, socket.timeout):
                last = self._timed_out()
            except urllib.error.URLError as err:
                reason = err.reason
                if deadline.expired or isinstance(reason, (TimeoutError, socket.timeout)):
                    last = self._timed_out()
                else:
                    last = f"cannot connect ({reason})"
            except (ConnectionError, OSError, ValueError, http.client.HTTPException) as err:
                # resets, incomplete reads, bad URL -- or the deadline's shutdown in the middle of a read
                last = self._timed_out() if deadline.expired else f"{type(err).__name__}: {str(err)[:200]}"
            finally:
                deadline.cancel()
                self.seconds += time.perf_counter() - started
            if attempt + 1 < attempts:
                self.retried += 1
                time.sleep(retry_after if retry_after is not None else float(self.options.backoff_s) * 2 ** attempt)
        raise SuspectError(f"{self.url}: {last} ({attempts} attempt{'s' if attempts > 1 else ''}, "
                           f"http.retries={self.options.retries})")

    def _decode(self, data: bytes, content_type: str, n: int) -> Tensor:
        where = self.url
        if data.startswith(b"\x93NUMPY"):
            try:
                array = decode_npy(data)
            except Exception as err:
                raise SuspectError(f"{where}: answered a corrupt .npy body ({type(err).__name__}: {err})") from None
        else:
            try:
                doc = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                raise SuspectError(f"{where}: answered neither .npy nor JSON (Content-Type {content_type!r}, "
                                   f"{len(data)} bytes: {_excerpt(data)!r})") from None
            if isinstance(doc, dict):
                if "probabilities" not in doc:
                    raise SuspectError(f"{where}: JSON answer has no field 'probabilities' (fields: "
                                       f"{sorted(doc)[:10]})")
                doc = doc["probabilities"]
            try:
                array = np.asarray(doc, dtype=np.float64)
            except (TypeError, ValueError):
                raise SuspectError(f"{where}: JSON field 'probabilities' is not a rectangular array of numbers") \
                    from None
        if array.dtype.kind not in "fiu":
            raise SuspectError(f"{where}: answered an array of dtype {array.dtype}, expected numbers")
        probs = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return check_probabilities(probs, self.task, n, where, self.num_classes)

    def _predict_batch(self, images: np.ndarray) -> Tensor:
        n = len(images)
        try:
            data, content_type = self._post(encode_npy(images), n, self.answer_size_limit(images.shape))
        except _TooLarge as err:
            limit = _max_batch_hint(str(err))
            if limit is None or limit >= n or limit < 1:
                raise SuspectError(f"{self.url}: HTTP 413 for a batch of {n} images ({err}); set http.max_batch")\
                    from None
            self.max_batch = limit
            return torch.cat([self._predict_batch(images[i:i + limit]) for i in range(0, n, limit)])
        probs = self._decode(data, content_type, n)
        self.last_content_type = content_type
        self.queries += n
        return probs

    def predict(self, images: Tensor) -> Tensor:
        array = _check_images(images).numpy()
        outs, start = [], 0
        while start < len(array):
            step = self.max_batch or len(array)
            outs.append(self._predict_batch(array[start:start + step]))
            start += step
        return torch.cat(outs)

    def health(self) -> dict | None:
        """``GET <base>/health`` of a medmark reference server (``None`` when there is none)."""
        if self._health is None:
            base = self.url.rsplit("/", 1)[0] if self.url.rstrip("/").endswith("/predict") else self.url.rstrip("/")
            timeout = min(float(self.options.timeout_s), 5.0)
            deadline = _Deadline(timeout)
            try:  # same limits as a prediction: total deadline, size cap, no redirects, no token
                with _opener(deadline).open(base + "/health", timeout=timeout) as response:
                    doc = json.loads(_read_capped(response, _HEALTH_BYTES, deadline, base + "/health",
                                                  "/health answer").decode("utf-8"))
                self._health = doc if isinstance(doc, dict) else {}
            except Exception:  # noqa: BLE001 - not every endpoint has /health: identity lacks the model hash
                self._health = {}
            finally:
                deadline.cancel()
        return self._health or None

    def identity(self) -> dict[str, Any]:
        health = self.health() or {}
        return {"kind": self.kind, "url": self.url, "sha256": health.get("sha256"),
                "sha256_source": "the endpoint's /health (self-reported)" if health.get("sha256") else None,
                "task": self.task, "requests": self.requests, "images_sent": self.images_sent,
                "retries": self.retried, "http_seconds": round(self.seconds, 3)}


class _TooLarge(Exception):
    """HTTP 413 (internal: the batch is split)."""


def _excerpt(data: bytes, limit: int = 200) -> str:
    text = data[:limit].decode("utf-8", errors="replace").strip().replace("\n", " ")
    return text + ("…" if len(data) > limit else "")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else None
    except ValueError:
        return None


def _max_batch_hint(text: str) -> int | None:
    try:
        doc = json.loads(text.rstrip("…"))
        return int(doc["max_batch"]) if isinstance(doc, dict) and "max_batch" in doc else None
    except (ValueError, TypeError, KeyError):
        return None


# ----------------------------------------------------------------------------- factory


def is_url(spec: str) -> bool:
    """Whether ``suspect=`` names an ``http(s)://`` endpoint (case-insensitive)."""
    return str(spec).lower().startswith(("http://", "https://"))
