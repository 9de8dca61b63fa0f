"""benchmarks/medlocker_transfer.py: member/unseen labels from the run's own config, reuse keyed by what a
cell depends on, bad arguments named with exit 2 (verify.py's protocol is replaced by a fake here; the
protocol itself is tested in tests/verification/test_medlocker_learned_view.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def _run(folder: Path, surrogate: Path, ensemble: list[Path]) -> Path:
    (folder / "owner").mkdir(parents=True)
    (folder / "owner" / "secret.json").write_text(json.dumps({"made_at": folder.name}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": {
        "surrogate_checkpoint": str(surrogate), "ensemble_checkpoints": [str(p) for p in ensemble]}}))
    return folder


@pytest.fixture()
def fake_verify(monkeypatch):
    from benchmarks import medlocker_transfer

    calls = []

    def run_verify(overrides, out):
        calls.append(dict(o.split("=", 1) for o in overrides))
        suspect = Path(calls[-1]["suspect"]).name
        accuracy = {"clean": 0.6, "protected": 0.1 if suspect == "member.ckpt" else 0.3,
                    "inpaint": 0.2 if suspect == "member.ckpt" else 0.55}
        report = {"mode": "evaluate", "num_images": 75, "accuracy": accuracy}
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report))
        return 0, report, None

    monkeypatch.setattr(medlocker_transfer, "run_verify", run_verify)
    return calls


def test_transfer_matrix_labels_members_by_content_and_reuses_finished_cells(tmp_path, fake_verify, capsys):
    from benchmarks import medlocker_transfer

    surrogate, member, unseen = (tmp_path / n for n in ("surrogate.ckpt", "member.ckpt", "unseen.ckpt"))
    for path, content in ((surrogate, b"resnet"), (member, b"vgg11"), (unseen, b"vgg16")):
        path.write_bytes(content)
    copy_of_member = tmp_path / "elsewhere" / "copy.ckpt"  # the same weights under another path
    copy_of_member.parent.mkdir()
    copy_of_member.write_bytes(b"vgg11")
    plain = _run(tmp_path / "plain", surrogate, [])
    ensemble = _run(tmp_path / "ensemble", surrogate, [member])
    argv = ["--run", str(plain), str(ensemble), "--suspect", f"vgg11={member}", f"vgg16={unseen}",
            f"vgg11_copy={copy_of_member}", "--learned-steps", "50", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    assert medlocker_transfer.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "medlocker_transfer.json").read_text())
    roles = {(c["run"], c["suspect"]): c["role"] for c in doc["cells"]}
    assert roles == {("plain", "vgg11"): "unseen", ("plain", "vgg16"): "unseen", ("plain", "vgg11_copy"): "unseen",
                     ("ensemble", "vgg11"): "member", ("ensemble", "vgg16"): "unseen",
                     ("ensemble", "vgg11_copy"): "member"}
    assert len(fake_verify) == 6 and {c["removal.learned.steps"] for c in fake_verify} == {"50"}
    assert {c["secret"] for c in fake_verify} == {str(plain / "owner" / "secret.json"),
                                                 str(ensemble / "owner" / "secret.json")}
    table = (tmp_path / "out" / "medlocker_transfer.md").read_text()
    assert "| ensemble | vgg16 | unseen | 0.600 | 0.300 | 0.550 |" in table
    assert (tmp_path / "out" / "medlocker_transfer.png").stat().st_size > 0
    capsys.readouterr()

    # a second invocation reuses every finished cell ...
    assert medlocker_transfer.main(argv) == 0
    assert len(fake_verify) == 6
    assert all(c["reused"] for c in json.loads((tmp_path / "out" / "medlocker_transfer.json").read_text())["cells"])
    # ... but not when the learned remover's budget or the run's secret (a run re-made in place) differ
    assert medlocker_transfer.main(argv[:-6] + ["--learned-steps", "0"] + argv[-4:]) == 0
    assert len(fake_verify) == 12
    (ensemble / "owner" / "secret.json").write_text(json.dumps({"made_at": "again"}))
    assert medlocker_transfer.main(argv) == 0
    assert len(fake_verify) == 15 and all(c["secret"].startswith(str(ensemble)) for c in fake_verify[-3:])


@pytest.mark.parametrize("bad, named", [
    ("run", "secret.json"), ("suspect_missing", "no such file"), ("suspect_form", "expected NAME=CHECKPOINT"),
    ("suspect_twice", "given twice"), ("steps", "--learned-steps"),
])
def test_transfer_matrix_refuses_bad_arguments_with_exit_2(tmp_path, fake_verify, capsys, bad, named):
    from benchmarks import medlocker_transfer

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")
    run = _run(tmp_path / "run", checkpoint, [])
    runs, suspects, steps = [str(run)], [f"a={checkpoint}"], "200"
    if bad == "run":
        runs = [str(tmp_path / "not_a_run")]
    elif bad == "suspect_missing":
        suspects = [f"a={tmp_path / 'missing.ckpt'}"]
    elif bad == "suspect_form":
        suspects = [str(checkpoint)]
    elif bad == "suspect_twice":
        suspects = [f"a={checkpoint}", f"a={checkpoint}"]
    else:
        steps = "-1"
    argv = ["--run", *runs, "--suspect", *suspects, "--learned-steps", steps, "--out", str(tmp_path / "out")]
    assert medlocker_transfer.main(argv) == 2
    assert named in capsys.readouterr().err and not fake_verify and not (tmp_path / "out").exists()
