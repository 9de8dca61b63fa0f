"""Weights manifest + command (models/weights_cli.py) and backbone.pretrained=true for timm
classifiers, all offline: fake files whose digests go into a temporary manifest."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from models import build_timm_classifier
from models.weights import WeightsManifestError, load_manifest, locate_timm_pretrained
from models.weights_cli import fetch_entry, main

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(path: Path, entries: dict[str, dict]) -> Path:
    lines = ["files:"]
    for name, spec in entries.items():
        lines.append(f"  {name}:")
        for key, value in spec.items():
            lines.append(f"    {key}: {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A weights folder with one fake file, and a manifest holding its full sha256 / prefix / md5."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no real cache consulted
    weights = tmp_path / "weights"
    weights.mkdir()
    data = os.urandom(4096)
    (weights / "thing-abc.pth").write_bytes(data)
    sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    manifest = write_manifest(tmp_path / "weights.yaml", {
        "thing": {"file": "thing-abc.pth", "url": "https://example.invalid/thing-abc.pth", "sha256": sha},
        "prefixed": {"file": "thing-abc.pth", "url": "https://example.invalid/x", "sha256_prefix": sha[:8], "md5": md5},
        "absent": {"file": "absent-0000.pth", "url": "https://example.invalid/absent", "sha256_prefix": "0000"},
    })
    return weights, manifest


def run(*args) -> int:
    return main([*args])


def test_shipped_manifest_is_valid_and_names_the_defaults():
    entries = load_manifest()
    files = {e.file for e in entries.values()}
    assert {"sam_vit_b_01ec64.pth", "sam_vit_l_0b3195.pth", "sam_vit_h_4b8939.pth", "resnet18-f37072fd.pth",
            "resnet34-b627a593.pth", "vgg16-397923af.pth", "vgg19-dcbb9e9d.pth", "alexnet-owt-7be5be79.pth"} <= files
    for entry in entries.values():
        assert entry.url.startswith("https://") and entry.url.endswith(entry.file)
        if entry.sha256_prefix:  # torch hub convention: the name carries the sha256 prefix
            assert entry.file.rsplit("-", 1)[1].startswith(entry.sha256_prefix)
        if entry.md5:  # segment-anything: the name carries the md5's first six digits
            assert entry.md5[:6] in entry.file


def test_check_ok_then_modified_byte_is_a_named_exit_2(fake, capsys):
    weights, manifest = fake
    assert run("check", "thing", "prefixed", "--weights-dir", str(weights), "--manifest", str(manifest)) == 0
    out = capsys.readouterr().out
    assert out.count(" ok ") == 2
    path = weights / "thing-abc.pth"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    for name in ("thing", "prefixed"):
        assert run("check", name, "--weights-dir", str(weights), "--manifest", str(manifest)) == 2
        captured = capsys.readouterr()
        assert "CORRUPT" in captured.out and f"corrupt weights file {path} ({name})" in captured.err


def test_check_missing_says_where_to_put_it(fake, capsys):
    weights, manifest = fake
    assert run("check", "--weights-dir", str(weights), "--manifest", str(manifest)) == 0  # not named: a report
    assert f"missing, put it at {weights / 'absent-0000.pth'}" in capsys.readouterr().out
    assert run("check", "absent", "--weights-dir", str(weights), "--manifest", str(manifest)) == 2  # named: an error


def test_list_shows_status_without_hashing(fake, capsys):
    weights, manifest = fake
    assert run("list", "--weights-dir", str(weights), "--manifest", str(manifest)) == 0
    out = capsys.readouterr().out
    assert "thing" in out and "present" in out and "missing" in out


@pytest.mark.parametrize("spec, field", [
    ({"file": "../evil.pth", "url": "https://x/y", "sha256_prefix": "ab"}, "files.bad.file"),
    ({"file": "a.pth", "url": "https://x/y", "sha256": "abc"}, "files.bad.sha256"),
    ({"file": "a.pth", "url": "https://x/y"}, "files.bad has no digest"),
    ({"file": "a.pth", "sha256_prefix": "ab"}, "files.bad.url"),
])
def test_bad_manifest_names_the_field_and_exits_2(tmp_path, capsys, spec, field):
    manifest = write_manifest(tmp_path / "m.yaml", {"bad": spec})
    with pytest.raises(WeightsManifestError, match=field.replace(".", r"\.")):
        load_manifest(manifest)
    assert run("list", "--manifest", str(manifest)) == 2
    assert field in capsys.readouterr().err


def test_unknown_name_and_bare_fetch_exit_2(fake, capsys):
    weights, manifest = fake
    assert run("check", "nope", "--weights-dir", str(weights), "--manifest", str(manifest)) == 2
    assert run("fetch", "--weights-dir", str(weights), "--manifest", str(manifest)) == 2  # nothing unless asked
    assert "nothing is downloaded unless asked" in capsys.readouterr().err


def test_fetch_with_wrong_bytes_leaves_nothing_behind(fake, monkeypatch):
    """A download whose digest differs is refused and no file (final or temporary) remains."""
    weights, manifest = fake
    entry = load_manifest(manifest)["absent"]
    monkeypatch.setattr("models.weights_cli._download", lambda url, handle, quiet: handle.write(b"not the file"))
    with pytest.raises(RuntimeError, match="do not match the manifest"):
        fetch_entry(entry, weights, quiet=True)
    assert sorted(p.name for p in weights.iterdir()) == ["thing-abc.pth"]


def test_fetch_keeps_a_correct_file_without_network(fake, monkeypatch):
    weights, manifest = fake
    monkeypatch.setattr("models.weights_cli._download", lambda *a: pytest.fail("must not download"))
    assert fetch_entry(load_manifest(manifest)["thing"], weights) == weights / "thing-abc.pth"


def test_module_runs_as_a_command(tmp_path):
    """python -m models.weights_cli exists; a manifest error is exit 2 naming the file."""
    bad = tmp_path / "m.yaml"
    bad.write_text("files: 3\n")
    proc = subprocess.run([sys.executable, "-m", "models.weights_cli", "list", "--manifest", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{bad}: field 'files'" in proc.stderr


# --------------------------------------------------------------------------------------
# backbone.pretrained=true for timm classifiers
# --------------------------------------------------------------------------------------
def timm_manifest(tmp_path: Path, name: str, data: bytes) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    return write_manifest(tmp_path / "timm.yaml", {
        name: {"file": f"{name}-{sha[:8]}.pth", "url": f"https://example.invalid/{name}-{sha[:8]}.pth",
               "sha256_prefix": sha[:8], "timm": f"[{name}]"},
    })


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches, so only the test's files can be found."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)


def test_pretrained_true_loads_the_local_file(tmp_path, monkeypatch, offline_caches):
    source = timm.create_model("resnet18", num_classes=1000)
    state_path = tmp_path / "state.pth"
    torch.save(source.state_dict(), state_path)
    data = state_path.read_bytes()
    manifest = timm_manifest(tmp_path, "resnet18", data)
    weights = tmp_path / "weights"
    weights.mkdir()
    entry = load_manifest(manifest)["resnet18"]
    (weights / entry.file).write_bytes(data)
    monkeypatch.setattr("models.weights.MANIFEST_PATH", manifest)

    model = build_timm_classifier("resnet18", num_classes=2, pretrained=True, weights_dir=str(weights))
    assert model.weights_source == str(weights / entry.file)
    assert model.weights_report["reinitialised"] == ["fc.weight", "fc.bias"]  # 1000-way head dropped
    assert torch.equal(model.net.conv1.weight, source.conv1.weight)
    assert torch.equal(model.net.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    random = build_timm_classifier("resnet18", num_classes=2, pretrained=False, weights_dir=str(weights))
    assert random.weights_source is None and not torch.equal(random.net.conv1.weight, source.conv1.weight)


def test_pretrained_true_reads_the_torch_hub_cache_and_refuses_a_corrupt_copy(tmp_path, monkeypatch,
                                                                               offline_caches):
    source = timm.create_model("resnet18", num_classes=1000)
    state_path = tmp_path / "state.pth"
    torch.save(source.state_dict(), state_path)
    manifest = timm_manifest(tmp_path, "resnet18", state_path.read_bytes())
    entry = load_manifest(manifest)["resnet18"]
    hub_file = tmp_path / "hub" / "checkpoints" / entry.file
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(state_path.read_bytes())
    assert locate_timm_pretrained("resnet18", tmp_path / "empty", manifest) == hub_file
    hub_file.write_bytes(state_path.read_bytes()[:-10])  # a partial copy
    with pytest.raises(ValueError, match=rf"'{hub_file}' is corrupt"):
        locate_timm_pretrained("resnet18", tmp_path / "empty", manifest)


def test_pretrained_true_missing_is_a_clear_error(tmp_path, monkeypatch, offline_caches):
    manifest = timm_manifest(tmp_path, "resnet18", b"whatever")
    monkeypatch.setattr("models.weights.MANIFEST_PATH", manifest)
    entry = load_manifest(manifest)["resnet18"]
    expected = tmp_path / "weights" / entry.file
    with pytest.raises(FileNotFoundError) as info:
        build_timm_classifier("resnet18", num_classes=2, pretrained=True, weights_dir=str(tmp_path / "weights"))
    message = str(info.value)
    assert f"put the file at '{expected}'" in message and "models.weights_cli fetch resnet18" in message
    assert "never downloads" in message


def test_pretrained_true_for_small_cnn_is_refused():
    with pytest.raises(ValueError, match="small_cnn.*no pretrained"):
        build_timm_classifier("small_cnn", num_classes=2, pretrained=True)


def test_torchvision_vgg_layout_is_converted(tmp_path):
    """A torchvision VGG file (classifier.0/3/6) fits timm's VGG via timm's own key conversion."""
    import torchvision

    tv = torchvision.models.vgg11(num_classes=1000)
    path = tmp_path / "vgg11-tv.pth"
    torch.save(tv.state_dict(), path)
    model = build_timm_classifier("vgg11", num_classes=3, weights_path=str(path))
    assert torch.equal(model.net.features[0].weight, tv.features[0].weight)
    assert torch.equal(model.net.pre_logits.fc1.weight.flatten(), tv.classifier[0].weight.flatten())
    assert model.weights_report["reinitialised"] == ["head.fc.weight", "head.fc.bias"]
