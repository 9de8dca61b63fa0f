"""Keyed restore writes only inside ``out=`` (MedLocker / MIAD-MARK, ``verify.py mode=restore``).

``restore/index.json`` is published with the protected images, so it is hostile input. A
tiny protected "run" (three images, real restore blobs, index, owner secret and key) is
built at run time with keyed_removal's own writer; each test edits the index (or the
folders) and checks that the restore exits 2 / raises BadInput naming the index and the
entry, that no file appears in ``out=`` or outside it, and -- for everything that can be
refused before decryption -- that nothing was decrypted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import verification.medlocker as verify_medlocker
import watermark.medlocker.keyed_removal as kr
from callbacks.medlocker import safe_name
from verification.protocols import EXIT_BAD_INPUT, BadInput

ROOT = Path(__file__).resolve().parents[2]
IDS = ("a1", "b2", "c3")


def _png(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path, format="PNG")


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        a = np.asarray(img)
    return a[..., None] if a.ndim == 2 else a


def _make_kit(base: Path, version_header: bytes | None = None) -> dict:
    """run/{protected/train_images/<id>.png, restore/<name>.mmrb + index.json, owner/...}."""
    run = base / "run"
    rng = np.random.default_rng(0)
    key = kr.generate_master_key()
    index, originals = {}, {}
    for i, image_id in enumerate(IDS):
        original = rng.integers(0, 256, (12, 10, 1 if i == 2 else 3), dtype=np.uint8)
        protected = original.copy()
        fp = np.zeros((12, 10), bool)
        fp[2:7, 3:8] = True
        protected[fp] = 255 - protected[fp]
        rel = f"train_images/{image_id}.png"
        if version_header is None:
            blob = kr.encrypt_residual(original, protected, fp, key, image_id, destination=rel)
        else:  # a legacy (version 1) blob: no destination bound
            blob = kr.encrypt_residual(original, protected, fp, key, image_id)
        _png(run / "protected" / rel, protected)
        (run / "restore").mkdir(parents=True, exist_ok=True)
        (run / "restore" / f"{safe_name(image_id)}.mmrb").write_bytes(blob)
        index[image_id] = {"restore": f"{safe_name(image_id)}.mmrb", "protected": rel}
        originals[image_id] = original
    (run / "restore" / "index.json").write_text(json.dumps(index, indent=2))
    kr.save_master_key(run / "owner" / "master_key.hex", key)
    secret = {"format": verify_medlocker.SECRET_FORMAT, "method": "miadmark", "ids": list(IDS),
              "certificates": str(run / "certificates.json"), "restore_dir": str(run / "restore"),
              "logo": str(run / "logo.npy"), "public_key": str(run / "owner" / "public_key.pem"),
              "dataset_root": str(base / "data")}
    (run / "owner" / "secret.json").write_text(json.dumps(secret))
    return {"run": run, "base": base, "index": run / "restore" / "index.json", "originals": originals,
            "secret": run / "owner" / "secret.json", "key": run / "owner" / "master_key.hex"}


@pytest.fixture
def kit(tmp_path):
    return _make_kit(tmp_path)


@pytest.fixture
def decrypts(monkeypatch):
    """Records every call of the decrypting function the restore mode uses."""
    calls: list[str] = []
    real = verify_medlocker.restore

    def recording(protected, blob, master_key, image_id, destination=""):
        calls.append(image_id)
        return real(protected, blob, master_key, image_id, destination=destination)

    monkeypatch.setattr(verify_medlocker, "restore", recording)
    return calls


def _edit_index(kit: dict, edit) -> None:
    index = json.loads(kit["index"].read_text())
    edit(index)
    kit["index"].write_text(json.dumps(index))


def _restore(kit: dict, out: Path, key: Path | None = None) -> int:
    cfg = OmegaConf.create({"mode": "restore", "secret": str(kit["secret"]), "key": str(key or kit["key"]),
                            "images": str(kit["run"] / "protected"), "out": str(out), "restore_dir": None})
    return verify_medlocker.run(cfg)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _refused(kit: dict, out: Path, *needles: str) -> str:
    with pytest.raises(BadInput) as err:
        _restore(kit, out)
    message = str(err.value)
    for needle in (str(kit["index"]), *needles):
        assert needle in message, message
    assert _files(out) == []
    return message


def _cli(kit: dict, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "verify.py"), f"secret={kit['secret']}", "mode=restore",
                           f"key={kit['key']}", f"images={kit['run'] / 'protected'}", f"out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


# ------------------------------------------------------------------------------ valid restore


def test_valid_restore_is_bit_exact_and_writes_only_the_layout(kit, tmp_path, decrypts):
    out = tmp_path / "out"
    assert _restore(kit, out) == 0
    assert sorted(decrypts) == list(IDS)
    assert _files(out) == ["restore_report.json", "train_images"] + [f"train_images/{i}.png" for i in IDS]
    for image_id, original in kit["originals"].items():
        assert np.array_equal(_read(out / "train_images" / f"{image_id}.png"), original)
    assert _restore(kit, out) == 0  # re-running over the same out= replaces the files


def test_legacy_blobs_restore_to_the_id_not_to_the_index_path(tmp_path, monkeypatch):
    monkeypatch.setattr(kr, "_HEADER", kr.BLOB_MAGIC + bytes([1]))
    kit = _make_kit(tmp_path, version_header=kr._HEADER)
    monkeypatch.undo()
    _edit_index(kit, lambda ix: ix["a1"].update(protected="train_images/a1.png"))
    out = tmp_path / "out"
    assert _restore(kit, out) == 0
    assert _files(out) == ["a1.png", "b2.png", "c3.png", "restore_report.json"]
    assert np.array_equal(_read(out / "a1.png"), kit["originals"]["a1"])


# ------------------------------------------------------------------ hostile index, via verify.py


def test_cli_absolute_destination_exits_2_and_writes_nothing(kit, tmp_path):
    target = tmp_path / "abs_target.png"
    _edit_index(kit, lambda ix: ix["a1"].update(protected=str(target)))
    out = tmp_path / "out"
    proc = _cli(kit, out)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "index.json" in proc.stderr and "'a1'" in proc.stderr and "protected" in proc.stderr
    assert not target.exists()
    assert set(_files(out)) <= {"verify.log"}


def test_cli_dotdot_destination_exits_2_and_writes_nothing(kit, tmp_path):
    _edit_index(kit, lambda ix: ix["b2"].update(protected="../escape.png"))
    out = tmp_path / "out"
    proc = _cli(kit, out)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "index.json" in proc.stderr and "'b2'" in proc.stderr and ".." in proc.stderr
    assert not (tmp_path / "escape.png").exists()
    assert set(_files(out)) <= {"verify.log"}


# ------------------------------------------------------------ hostile index, in process


@pytest.mark.parametrize("protected", [
    "/etc/passwd.png", "../escape.png", "train_images/../../escape.png", "train_images//a1.png",
    "./a1.png", "train_images\\a1.png", "C:/a1.png", "train_images/a1.exe", "a1.png/", "",
])
def test_unsafe_destination_is_refused_before_decryption(kit, tmp_path, decrypts, protected):
    if protected == "":  # "" = restore to <id>.png: allowed only for a legacy blob, this blob binds a path
        _edit_index(kit, lambda ix: ix["a1"].update(protected=""))
        out = tmp_path / "out"
        assert _restore(kit, out) == EXIT_BAD_INPUT  # authenticated destination differs: refused
        assert _files(out) == []
        return
    _edit_index(kit, lambda ix: ix["a1"].update(protected=protected))
    _refused(kit, tmp_path / "out", "'a1'", "protected")
    assert decrypts == []


@pytest.mark.parametrize("image_id", ["../escape", "/abs/evil", "sub/../../x", "evil\\x", "x\x00y"])
def test_id_with_a_separator_or_traversal_is_refused_before_decryption(kit, tmp_path, decrypts, image_id):
    secret = json.loads(kit["secret"].read_text())
    secret["ids"].append(image_id)  # even if the owner's secret listed it
    kit["secret"].write_text(json.dumps(secret))
    _edit_index(kit, lambda ix: ix.update({image_id: {"restore": "zz.mmrb", "protected": ""}}))
    _refused(kit, tmp_path / "out", "image id")
    assert decrypts == []


def test_id_not_in_the_owners_secret_is_refused(kit, tmp_path, decrypts):
    _edit_index(kit, lambda ix: ix.update({"sub/evil": dict(ix["a1"], restore="other.mmrb")}))
    _refused(kit, tmp_path / "out", "'sub/evil'", "'ids'")
    assert decrypts == []


@pytest.mark.parametrize("other", ["train_images/a1.png", "train_images/A1.png", "TRAIN_IMAGES/a1.png"])
def test_two_ids_with_one_destination_are_refused(kit, tmp_path, decrypts, other):
    _edit_index(kit, lambda ix: ix["b2"].update(protected=other))
    _refused(kit, tmp_path / "out", "'a1'", "'b2'", "same file")
    assert decrypts == []


def test_a_file_and_a_folder_of_the_same_name_are_refused(kit, tmp_path, decrypts):
    _edit_index(kit, lambda ix: ix["b2"].update(protected="train_images/a1.png/b2.png"))
    _refused(kit, tmp_path / "out", "as a folder")
    assert decrypts == []


@pytest.mark.parametrize("restore_file", ["../index.json", "/etc/passwd", "sub/x.mmrb", "x.bin", 7, None])
def test_bad_restore_file_field_is_refused(kit, tmp_path, decrypts, restore_file):
    _edit_index(kit, lambda ix: ix["c3"].update(restore=restore_file))
    _refused(kit, tmp_path / "out", "'c3'", "'restore'")
    assert decrypts == []


def test_two_ids_sharing_one_restore_file_are_refused(kit, tmp_path, decrypts):
    _edit_index(kit, lambda ix: ix["b2"].update(restore=ix["a1"]["restore"]))
    _refused(kit, tmp_path / "out", "'restore'")
    assert decrypts == []


@pytest.mark.parametrize("text,needle", [
    ('{"a1": {"restore": "a1', "not valid JSON"),                      # truncated after a valid header
    ('{"a1": {"restore": "x.mmrb", "protected": "train_images/a1.png"}}\x00\xff garbage', "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ("{}", "no entries"),
    ('{"a1": 3}', "must be an object"),
    ('{"a1": {"restore": "x.mmrb"}}', "'protected' is missing"),
    ('{"a1": {"restore": "x.mmrb", "protected": ["train_images/a1.png"]}}', "'protected' must be a string"),
    ('{"a1": {"restore": "x.mmrb", "protected": "p/a1.png"}, "a1": {"restore": "y.mmrb", "protected": "q.png"}}',
     "duplicate key"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_malformed_index_is_refused_naming_the_file(kit, tmp_path, decrypts, text, needle):
    kit["index"].write_bytes(text.encode("utf-8", "surrogateescape"))
    _refused(kit, tmp_path / "out", needle)
    assert decrypts == []


def test_oversized_or_non_utf8_or_linked_index_is_refused_unread(kit, tmp_path, decrypts):
    with open(kit["index"], "r+b") as handle:
        handle.truncate(kr.MAX_INDEX_BYTES + 1)  # sparse: nothing is allocated
    _refused(kit, tmp_path / "out", "limit")
    kit["index"].write_bytes(b'{"a1": "\xff"}')
    _refused(kit, tmp_path / "out", "UTF-8")
    real = tmp_path / "elsewhere.json"
    real.write_text("{}")
    kit["index"].unlink()
    kit["index"].symlink_to(real)
    _refused(kit, tmp_path / "out", "symlink")
    assert decrypts == []


# ------------------------------------------------------------------------------ hostile folders


def test_symlink_in_out_pointing_outside_is_refused(kit, tmp_path, decrypts):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_images").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BadInput, match="symlink") as err:
        _restore(kit, out)
    assert str(kit["index"]) in str(err.value)
    assert list(outside.iterdir()) == [] and _files(out) == ["train_images"]
    assert decrypts == []


def test_symlink_at_a_destination_is_refused_and_its_target_kept(kit, tmp_path, decrypts):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    (out / "train_images").mkdir(parents=True)
    (out / "train_images" / "b2.png").symlink_to(victim)
    with pytest.raises(BadInput, match="symlink"):
        _restore(kit, out)
    assert victim.read_text() == "keep me" and _files(out) == ["train_images", "train_images/b2.png"]
    assert decrypts == []


def test_symlink_in_images_pointing_outside_is_refused(kit, tmp_path, decrypts):
    elsewhere = tmp_path / "elsewhere.png"
    prot = kit["run"] / "protected" / "train_images" / "a1.png"
    prot.rename(elsewhere)
    prot.symlink_to(elsewhere)
    with pytest.raises(BadInput, match="outside images="):
        _restore(kit, tmp_path / "out")
    assert _files(tmp_path / "out") == [] and decrypts == []


def test_write_confined_never_follows_a_symlink_planted_after_the_checks(tmp_path):
    """The last line of defence (a race after phase 1): the writer itself refuses links."""
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(victim, target_is_directory=True)
    with pytest.raises(kr.RestoreIndexError):
        kr.write_confined(out, "sub/x.png", b"data")
    (out / "y.png").symlink_to(victim / "y.png")
    with pytest.raises(kr.RestoreIndexError):
        kr.write_confined(out, "y.png", b"data")
    with pytest.raises(ValueError):
        kr.write_confined(out, "../z.png", b"data")
    assert list(victim.iterdir()) == []
    assert kr.write_confined(out, "ok/z.png", b"data").read_bytes() == b"data"
    assert sorted(p.name for p in (out / "ok").iterdir()) == ["z.png"]  # no temp file left


# ------------------------------------------------------- authenticated binding (AES-GCM fields)


def test_wrong_key_is_refused_and_writes_nothing(kit, tmp_path):
    wrong = tmp_path / "wrong.hex"
    kr.save_master_key(wrong, kr.generate_master_key())
    out = tmp_path / "out"
    assert _restore(kit, out, key=wrong) == EXIT_BAD_INPUT
    assert _files(out) == []


def test_ciphertexts_swapped_between_ids_are_refused(kit, tmp_path, capsys):
    restore_dir = kit["run"] / "restore"
    a, b = restore_dir / f"{safe_name('a1')}.mmrb", restore_dir / f"{safe_name('b2')}.mmrb"
    blob_a, blob_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(blob_b)
    b.write_bytes(blob_a)
    out = tmp_path / "out"
    assert _restore(kit, out) == EXIT_BAD_INPUT
    assert "authentication failed" in capsys.readouterr().err and _files(out) == []


def test_whole_entries_swapped_between_ids_are_refused(kit, tmp_path, capsys):
    """id a1 now names b2's blob, image and destination: only the bound id tells them apart."""
    _edit_index(kit, lambda ix: ix.update(a1=ix["b2"], b2=ix["a1"]))
    out = tmp_path / "out"
    assert _restore(kit, out) == EXIT_BAD_INPUT
    assert "authentication failed" in capsys.readouterr().err and _files(out) == []


def test_a_destination_the_blob_was_not_made_for_is_refused(kit, tmp_path, capsys):
    """The index renames a1's destination to a safe, unique path: the bound destination refuses it."""
    _edit_index(kit, lambda ix: ix["a1"].update(protected="elsewhere/a1.png"))
    out = tmp_path / "out"
    assert _restore(kit, out) == EXIT_BAD_INPUT
    assert "authentication failed" in capsys.readouterr().err and _files(out) == []


def test_each_bound_field_is_checked_by_decryption():
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    protected, fp = original.copy(), np.zeros((8, 8), bool)
    fp[:3, :3] = True
    protected[fp] = 0
    key = kr.generate_master_key()
    blob = kr.encrypt_residual(original, protected, fp, key, "a", destination="d/a.png")
    assert np.array_equal(kr.restore(protected, blob, key, "a", destination="d/a.png"), original)
    for kwargs in ({"image_id": "b"}, {"destination": "d/b.png"}, {"destination": ""}):
        args = {"image_id": "a", "destination": "d/a.png", **kwargs}
        with pytest.raises(kr.RestoreError, match="authentication failed"):
            kr.restore(protected, blob, key, args["image_id"], destination=args["destination"])
    downgraded = blob[:4] + bytes([1]) + blob[5:]  # claim "legacy, nothing bound"
    with pytest.raises(kr.RestoreError, match="authentication failed"):
        kr.restore(protected, downgraded, key, "a")
    with pytest.raises(ValueError, match="not a safe file name"):
        kr.encrypt_residual(original, protected, fp, key, "a", destination="../a.png")


def test_symlinked_report_file_is_refused_before_anything_is_written(kit, tmp_path, decrypts):
    victim = tmp_path / "victim.json"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "restore_report.json").symlink_to(victim)
    with pytest.raises(BadInput, match="symlink"):
        _restore(kit, out)
    assert victim.read_text() == "keep me" and _files(out) == ["restore_report.json"] and decrypts == []
