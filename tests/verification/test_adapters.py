"""Suspect adapters, the reference server, exports and report.html (issue 6).

One tiny *marked* StealthMark model is built by hand -- no training: :class:`MarkedOracleNet`
answers like a perfectly marked model (probability ε on the visible dark QR modules iff the
owner's trigger is in the image, near-certain background otherwise), as the stub oracle of
test_stealthmark.py does, but as an ``nn.Module`` saved in a real medmark Lightning
checkpoint beside a real owner kit (secret.json, signed certificate.json) over synthetic
polyp data in the Kvasir-SEG layout. It is then exported to TorchScript and ONNX and served
over HTTP by ``python -m verification.serve``, and every form must give the same probabilities and
the same ``verify.py`` verdict.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, synthetic_datamodule
from verification.adapters import (
    CheckpointSuspect,
    HttpOptions,
    HttpSuspect,
    OnnxSuspect,
    Suspect,
    SuspectError,
    encode_npy,
    open_suspect,
    require_weights,
)
from verification.export import export
from verification.report_html import write_html_report
from watermark import certificates
from watermark.kit_io import file_sha256
from watermark.stealthmark.kit import (
    StealthMarkKey,
    build_model_certificate,
    build_secret,
    weights_sha256,
    write_certificate,
    write_secret,
)

PAYLOAD = "Ad4-pt9"  # 7 bytes (QR v1-H); appears nowhere else
TRIGGER_SEED = 5150
FACTORIES = ("models.", "test_adapters.")
THRESHOLDS = {"alpha": 1e-3, "response_margin": 0.01, "min_decoded": 1}
ENV = {**os.environ, "WANDB_MODE": "disabled",  # this folder: the suspect_factories test networks
       "PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / "tests", Path(__file__).resolve().parent)))}


class MarkedOracleNet(torch.nn.Module):
    """A perfectly marked segmentation net: ``forward(images B×C×H×W [0, 1], boxes=None) -> logits B×1×H×W``.

    Logit ``logit(ε)`` on the visible dark modules of the owner's QR code (buffer ``dark``)
    when the trigger (buffers ``pattern``/``region``) is exactly present, else a confident
    background logit around −6 that depends on the pixels through a small convolution (so the
    probabilities differ from image to image and the weights are something to prune). The key
    lives in buffers: the checkpoint's config names no secret. Scriptable and ONNX-exportable.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 50, grid: int = 21, quiet_zone: int = 2,
                 epsilon: float = 0.3):
        super().__init__()
        self.grid, self.quiet_zone = grid, quiet_zone
        self.cell_px = image_size // (grid + 2 * quiet_zone)
        self.mark_logit = float(np.log(epsilon / (1 - epsilon)))
        self.register_buffer("dark", torch.zeros(grid, grid))
        self.register_buffer("pattern", torch.zeros(in_channels, image_size, image_size))
        self.register_buffer("region", torch.zeros(1, image_size, image_size))
        self.base = torch.nn.Conv2d(in_channels, 1, 3, padding=1)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        q, g = self.quiet_zone, self.grid
        visible = F.avg_pool2d(images.mean(1, keepdim=True), self.cell_px) > 0.05
        present = ((images - self.pattern).abs() * self.region).flatten(1).amax(1) < 1e-6
        inner = visible[:, :, q:q + g, q:q + g] & (self.dark > 0.5) & present[:, None, None, None]
        cells = F.pad(inner.float(), [q, q, q, q])
        marked = F.interpolate(cells, scale_factor=float(self.cell_px), mode="nearest")
        background = -6.0 + 0.5 * torch.tanh(self.base(images))
        return torch.where(marked > 0.5, torch.full_like(background, self.mark_logit), background)


BACKBONE = {"_target_": "test_adapters.MarkedOracleNet", "in_channels": 3, "image_size": 50}


def _save_checkpoint(path: Path, net: torch.nn.Module) -> Path:
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"backbone": dict(BACKBONE), "task": "segmentation"}}, path)
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Owner kit + marked checkpoint + its TorchScript and ONNX exports + verification images."""
    base = tmp_path_factory.mktemp("adapters")
    data, datamodule = synthetic_datamodule(["experiment=stealthmark_synthetic", "data.synthetic.num_images=80",
                                           "data.synthetic.image_size=64", "data.image_size=50"], base)
    dataset = datamodule.dataset("test", train_transforms=False)
    ids = [s.id for s in dataset.samples]
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])

    key = StealthMarkKey(payload=PAYLOAD, qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                         trigger={"kind": "patch", "size": 4, "position": "top-left", "seed": TRIGGER_SEED})
    trigger = key.build_trigger()
    torch.manual_seed(0)
    net = MarkedOracleNet()
    net.dark.copy_(torch.from_numpy(key.modules()).float())
    net.pattern.copy_(trigger.apply(torch.zeros(1, 3, 50, 50))[0])
    net.region.copy_(trigger.region(50, 50).float()[None])
    ckpt = _save_checkpoint(base / "marked.ckpt", net)
    clean = MarkedOracleNet()
    clean.load_state_dict({**net.state_dict(), "dark": torch.zeros(21, 21)})
    clean_ckpt = _save_checkpoint(base / "clean.ckpt", clean)

    owner = base / "owner"
    doc = build_secret(key, ids, "test", data, THRESHOLDS, checkpoint=str(ckpt))
    secret = write_secret(owner / "secret.json", doc)
    private_pem, public_pem = certificates.generate_owner_keys()
    certificates.save_public_key(owner / "owner_public_key.pem", public_pem)
    cert = build_model_certificate("lab-adapters", doc, key, {"checkpoint": ckpt.name, "checkpoint_sha256":
                                   file_sha256(ckpt), "weights_sha256": weights_sha256(net.state_dict())},
                                   {"num_train": 0})
    write_certificate(owner / "certificate.json", cert, private_pem)

    scripted = export(ckpt, "torchscript", base / "marked.pt", factories=FACTORIES)
    onnx_proc = subprocess.run([sys.executable, "-m", "verification.export", str(ckpt), "--format", "onnx", "--out",
                                str(base / "marked.onnx"), "--factories", *FACTORIES], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=300)
    assert onnx_proc.returncode == 0, onnx_proc.stderr[-3000:]
    return {"base": base, "secret": secret, "ckpt": ckpt, "clean_ckpt": clean_ckpt, "ts": base / "marked.pt",
            "onnx": base / "marked.onnx", "images": images, "trigger": trigger, "ids": ids, "net": net,
            "export": {"torchscript": scripted, "onnx": json.loads(onnx_proc.stdout)}, "timings": {}}


@pytest.fixture(scope="module")
def server(case):
    """``python -m verification.serve marked.ckpt --port 0`` as a subprocess; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "verification.serve", str(case["ckpt"]), "--port", "0", "--max-batch",
                             "16", "--factories", *FACTORIES], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), (url, proc.stderr.read() if proc.poll() is not None else "")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def verify(case, suspect, out: Path, *extra: str) -> subprocess.CompletedProcess:
    base = case["base"]
    cmd = [sys.executable, str(ROOT / "verify.py"), f"secret={case['secret']}", f"suspect={suspect}", f"out={out}",
           f"paths.data_dir={base / 'data'}", f"paths.log_dir={base / 'logs'}", "verify.num_images=12",
           "verify.qr_evidence=readout", "verify.null_k=999", "verify.batch_size=500", "verify.num_figures=1",
           f"suspect_factories=[{','.join(FACTORIES)}]", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    case["timings"][out.name] = round(time.perf_counter() - started, 2)
    return proc


# ----------------------------------------------------------------------------- in process


def test_every_adapter_gives_the_checkpoints_probabilities(case, server):
    images = case["images"][:10]
    batch = torch.cat([images, case["trigger"].apply(images)])
    n = len(batch)
    reference = CheckpointSuspect(case["ckpt"], factories=FACTORIES)
    expected = reference.predict(batch)
    assert expected.shape == (n, 1, 50, 50) and n >= 16 and float(expected.max()) == pytest.approx(0.3, abs=1e-5)
    suspects = [open_suspect(case["ts"], task="segmentation"), open_suspect(case["onnx"], task="segmentation"),
                open_suspect(server + "/predict", task="segmentation", http={"json": False}),
                open_suspect(server + "/predict", task="segmentation", http={"json": True, "max_batch": 7})]
    kinds = [type(s).__name__ for s in suspects]
    assert kinds == ["TorchScriptSuspect", "OnnxSuspect", "HttpSuspect", "HttpSuspect"]
    for suspect in suspects:
        assert isinstance(suspect, Suspect)
        got = suspect.predict(batch)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"{suspect.kind}: {m}")
        assert suspect.queries == n
        ident = suspect.identity()
        assert ident["kind"] == suspect.kind and len(ident["sha256"]) == 64
    http_json = suspects[3]
    assert suspects[2].last_content_type == "application/x-npy" and http_json.last_content_type == "application/json"
    assert http_json.requests == -(-n // 7) and http_json.max_batch == 7  # n images in requests of 7
    assert suspects[2].identity()["sha256"] == file_sha256(case["ckpt"])  # the server's /health
    assert suspects[2].max_batch == 16  # 413 from --max-batch 16: the client split its batch and went on
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as bad:  # the server's own input checks
        urllib.request.urlopen(urllib.request.Request(server + "/predict", data=b"junk", method="POST"))
    assert bad.value.code == 400 and "not a .npy array" in json.loads(bad.value.read())["error"]
    assert case["export"]["onnx"]["max_abs_diff"] < 1e-4 and case["export"]["torchscript"]["how"] in ("script",
                                                                                                      "trace")


@pytest.mark.filterwarnings("ignore::UserWarning")  # the exporter's constant-folding notes
def test_onnx_with_a_fixed_batch_is_queried_in_chunks(case, tmp_path):
    from verification.export import ExportWrapper

    wrapper = ExportWrapper(case["net"], "segmentation").eval()
    path = tmp_path / "fixed4.onnx"
    torch.onnx.export(wrapper, (torch.rand(4, 3, 50, 50),), str(path), input_names=["x"], dynamo=False)
    suspect = OnnxSuspect(path, task="segmentation")
    assert suspect.fixed_batch == 4 and suspect.input_name == "x"
    images = case["trigger"].apply(case["images"][:10])
    torch.testing.assert_close(suspect.predict(images), CheckpointSuspect(case["ckpt"], factories=FACTORIES)
                               .predict(images), atol=1e-5, rtol=1e-4)
    assert suspect.queries == 10  # padding rows are not queries
    with pytest.raises(SuspectError, match="fixed shape"):
        suspect.predict(torch.rand(2, 3, 40, 40))


def test_bad_files_and_weightless_suspects_are_named(case, tmp_path):
    for name in ("model.h5", "model", "weights.safetensors"):
        with pytest.raises(SuspectError, match=name.replace(".", r"\.")):
            open_suspect(tmp_path / name)
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")  # a torch.save file named like TorchScript
    with pytest.raises(SuspectError, match=r"plain\.pt.*not a TorchScript archive.*torch\.save"):
        open_suspect(tmp_path / "plain.pt")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(SuspectError, match=r"junk\.onnx.*not a loadable ONNX"):
        open_suspect(tmp_path / "junk.onnx")
    with pytest.raises(SuspectError, match="classification"):  # the export record says segmentation
        open_suspect(case["onnx"], task="classification")
    assert require_weights(open_suspect(case["ckpt"], factories=FACTORIES), "prune") is not None
    with pytest.raises(SuspectError, match="attack=prune needs the suspect's weights; an HTTP suspect has none"):
        require_weights(HttpSuspect("http://127.0.0.1:9/predict"), "prune")
    with pytest.raises(SuspectError, match="an ONNX suspect has none"):
        require_weights(open_suspect(case["onnx"]), "finetune")


# ----------------------------------------------------------------------------- misbehaving endpoints


class _Garbage(BaseHTTPRequestHandler):
    """Answers per ``?mode=`` / path: nan, shape, logits, text, json_noprob, http500, slow, ok."""

    calls = 0

    def log_message(self, *args):  # silence
        pass

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = len(np.load(__import__("io").BytesIO(body)))
        mode = self.path.strip("/")
        probs = np.full((n, 1, 50, 50), 0.1, dtype=np.float32)
        if mode == "slow":
            time.sleep(3)
        if mode == "http500":
            self.send_response(500)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"oops!")
            return
        payload = {"nan": lambda: encode_npy(np.full_like(probs, np.nan)),
                   "shape": lambda: encode_npy(np.repeat(probs, 3, axis=1)),
                   "batch": lambda: encode_npy(probs[:1]),
                   "logits": lambda: encode_npy(probs * 80 - 3),
                   "text": lambda: b"<html>hello</html>",
                   "json_noprob": lambda: json.dumps({"result": 1}).encode(),
                   "json": lambda: json.dumps({"probabilities": probs.tolist()}).encode(),
                   "slow": lambda: encode_npy(probs), "ok": lambda: encode_npy(probs)}[mode]()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out ("slow")
            pass


@pytest.fixture(scope="module")
def garbage():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode,message", [
    ("nan", "non-finite"), ("shape", r"shape \(2, 3, 50, 50\)"), ("batch", "for 2 images"),
    ("logits", "not probabilities"), ("text", "neither .npy nor JSON"), ("json_noprob", "no field 'probabilities'"),
])
def test_garbage_answers_raise_a_named_suspect_error(garbage, mode, message):
    suspect = HttpSuspect(f"{garbage}/{mode}", options=HttpOptions(retries=0, timeout_s=5))
    with pytest.raises(SuspectError, match=message) as err:
        suspect.predict(torch.rand(2, 3, 50, 50))
    assert f"/{mode}" in str(err.value) and suspect.queries == 0


def test_retries_budget_and_timeouts(garbage):
    _Garbage.calls = 0
    suspect = HttpSuspect(f"{garbage}/http500", options=HttpOptions(retries=2, backoff_s=0.01, timeout_s=5))
    with pytest.raises(SuspectError, match=r"HTTP 500.*oops!.*3 attempts"):
        suspect.predict(torch.rand(2, 3, 50, 50))
    assert _Garbage.calls == 3 and suspect.requests == 3 and suspect.queries == 0
    ok = HttpSuspect(f"{garbage}/json", options=HttpOptions(max_queries=5))
    assert ok.predict(torch.rand(4, 3, 50, 50)).shape == (4, 1, 50, 50) and ok.queries == 4
    with pytest.raises(SuspectError, match=r"query budget exceeded.*http\.max_queries=5"):
        ok.predict(torch.rand(2, 3, 50, 50))
    slow = HttpSuspect(f"{garbage}/slow", options=HttpOptions(retries=0, timeout_s=0.5))
    started = time.perf_counter()
    with pytest.raises(SuspectError, match=r"timed out after 0.5 s"):
        slow.predict(torch.rand(1, 3, 50, 50))
    assert time.perf_counter() - started < 2.5
    with pytest.raises(SuspectError, match="cannot connect"):
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        HttpSuspect(f"http://127.0.0.1:{port}/predict", options=HttpOptions(retries=0)).predict(torch.rand(1, 3, 4, 4))


# ----------------------------------------------------------------------------- verify.py end to end


class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br", "hr", "link", "input"):
            self.stack.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> (open: {self.stack[-3:]})"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_every_adapter_gives_the_same_verdict_through_verify_py(case, server):
    base = case["base"]
    reports = {}
    for name, suspect in (("ckpt", case["ckpt"]), ("torchscript", case["ts"]), ("onnx", case["onnx"]),
                          ("http", server + "/predict")):
        out = base / f"verify_{name}"
        proc = verify(case, suspect, out)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        reports[name] = json.loads((out / "report.json").read_text())
        assert PAYLOAD not in proc.stdout + proc.stderr
    ref = reports["ckpt"]
    print("verify.py wall seconds per adapter:", {k: v for k, v in case["timings"].items() if k.startswith("verify_")},
          "report seconds:", {k: r["seconds"] for k, r in reports.items()})
    assert ref["verified"] and ref["asr"] == 1.0 and ref["queries"] == 2 * min(12, len(case["ids"]))
    for name, report in reports.items():
        assert report["verified"] == ref["verified"]
        for field in ("p_value", "response_p_value", "qr_p_value", "bit_accuracy"):
            assert report[field] == pytest.approx(ref[field], rel=1e-6), (name, field)
        s = report["suspect"]
        assert s["queries"] == report["queries"] == report["suspect_queries"] == ref["queries"]
        assert s["kind"] == {"ckpt": "checkpoint"}.get(name, name) and len(s["sha256"]) == 64
    assert reports["http"]["suspect"]["url"] == server + "/predict"
    assert reports["http"]["suspect"]["sha256"] == file_sha256(case["ckpt"])
    with __import__("urllib.request").request.urlopen(server + "/health") as r:
        health = json.loads(r.read())
    assert health["queries"] >= ref["queries"] and health["task"] == "segmentation"

    # report.html: valid, verdict first, figures embedded, certificate checked, no payload
    page = (base / "verify_ckpt" / "report.html").read_text()
    parser = _Html()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert page.index("VERIFIED") < page.index("Evidence")
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "valid signature" in page and "ed25519:" in page and "lab-adapters" in page
    for name in reports:
        assert PAYLOAD not in (base / f"verify_{name}" / "report.html").read_text()
    md = (base / "verify_http" / "report.md").read_text()
    assert "http " + server in md


def test_clean_twin_is_not_verified_through_onnx_too(case, tmp_path):
    onnx = tmp_path / "clean.onnx"
    export(case["clean_ckpt"], "onnx", onnx, factories=FACTORIES)
    proc = verify(case, onnx, tmp_path / "verify_clean_onnx")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "verify_clean_onnx" / "report.json").read_text())
    assert not report["verified"] and report["suspect"]["kind"] == "onnx"
    assert "NOT VERIFIED" in (tmp_path / "verify_clean_onnx" / "report.html").read_text()


def test_bad_suspects_exit_2_with_a_message_and_no_verdict(case, garbage, tmp_path):
    runs = {
        "garbage": (f"{garbage}/nan", ["http.retries=0"], "non-finite"),
        "timeout": (f"{garbage}/slow", ["http.retries=0", "http.timeout_s=0.5"], "timed out after 0.5 s"),
        "extension": (tmp_path / "model.h5", [], "model.h5"),
    }
    for name, (suspect, extra, message) in runs.items():
        out = tmp_path / f"bad_{name}"
        proc = verify(case, suspect, out, *extra)
        assert proc.returncode == 2, (name, proc.stdout[-2000:], proc.stderr[-3000:])
        assert message in proc.stderr, (name, proc.stderr[-3000:])
        assert "VERIFIED" not in proc.stdout and not (out / "report.json").exists()
        assert "Traceback" not in proc.stderr


def test_html_report_escapes_and_leaves_secrets_out(tmp_path):
    report = {"method": "stealthmark", "verified": False, "p_value": 0.5, "payload": PAYLOAD,
              "decoded": [{"id": "<img src=x onerror=alert(1)>", "text": PAYLOAD, "matches": False}],
              "suspect": {"kind": "http", "url": "http://h/<script>", "sha256": None, "queries": 3}}
    page = write_html_report(tmp_path, report, [tmp_path / "missing.png"], "T <b>").read_text()
    assert PAYLOAD not in page and "<script>" not in page and "<img src=x" not in page
    assert "NOT VERIFIED" in page and "&lt;script&gt;" in page and "No signed certificate" in page


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_classification_checkpoint_exports_agree_and_need_an_image_size(tmp_path):
    from models.classification import build_timm_classifier
    from verification.export import main as export_main

    config = {"_target_": "models.build_timm_classifier", "name": "small_cnn", "num_classes": 3, "in_channels": 1}
    torch.manual_seed(0)
    net = build_timm_classifier(name="small_cnn", num_classes=3, in_channels=1)
    ckpt = tmp_path / "cls.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"backbone": config, "task": "classification", "num_classes": 3}}, ckpt)
    assert export_main([str(ckpt), "--format", "onnx", "--out", str(tmp_path / "cls.onnx")]) == 2  # no image size
    images = torch.rand(5, 1, 32, 32)
    expected = CheckpointSuspect(ckpt, task="classification").predict(images)
    for fmt, name in (("torchscript", "cls.ts"), ("onnx", "cls.onnx")):
        assert export_main([str(ckpt), "--format", fmt, "--out", str(tmp_path / name), "--image-size", "32"]) == 0
        suspect = open_suspect(tmp_path / name, task=None)  # the task comes from the export record
        assert suspect.task == "classification"
        torch.testing.assert_close(suspect.predict(images), expected, atol=1e-5, rtol=1e-4)
        with pytest.raises(SuspectError, match="segmentation model"):
            open_suspect(tmp_path / name, task="segmentation")
    assert export_main([str(ckpt), "--format", "onnx", "--out", str(tmp_path / "cls.pt")]) == 2  # wrong suffix
    ts = open_suspect(tmp_path / "cls.ts", task="classification", num_classes=2)  # X-Mark passes the secret's K
    with pytest.raises(SuspectError, match="answers 3 classes; this verification has 2"):
        ts.predict(images)
