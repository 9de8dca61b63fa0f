"""Secrets stay secret: no public defaults, salted redaction, secret files, kits never silently
replaced, private files 0600 from creation, atomic kit writes.

The end-to-end part is one tiny StealthMark run (train.py in a subprocess, the real config,
shrunk) whose payload and trigger seed are left null, plus one with a secret file; everything
else calls the writers directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from conftest import compose_config, run_train
from utils.run import (
    DRAWN_SECRETS_FILE,
    SALT_FILE,
    KitExistsError,
    redacted_config,
    refuse_existing_kit,
    resolve_secrets,
    secret_digest,
)

# A tiny StealthMark run (as tests/test_sweeps.py): 50 px = 25 cells of 2 px, one epoch.
TINY_SM = [
    "experiment=stealthmark_synthetic", "logger=csv",
    "data.synthetic.num_images=32", "data.synthetic.image_size=64", "data.image_size=50",
    "data.batch_size=8", "trainer.max_epochs=1", "method.trigger.patch.size=4",
    "callbacks.watermark_check.num_images=4", "callbacks.validation_panels=null", "test=false",
]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _drawn(run: Path) -> dict:
    return json.loads((run / "owner" / DRAWN_SECRETS_FILE).read_text())["values"]


def _everything_written(run: Path, proc) -> str:
    """stdout + stderr + every text file of the run folder except the owner kit."""
    text = [proc.stdout, proc.stderr]
    for path in run.rglob("*"):
        if path.is_file() and "owner" not in path.relative_to(run).parts and path.suffix in (".yaml", ".log", ".json", ".csv", ".txt"):
            text.append(path.read_text(errors="replace"))
    return "\n".join(text)


@pytest.fixture(scope="module")
def drawn_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drawn")
    proc, run = run_train(TINY_SM, tmp, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, run, proc


# ----------------------------------------------------------------------------- no public defaults


def test_secret_defaults_are_null_in_every_method_config(tmp_path):
    sm = compose_config(["experiment=stealthmark_synthetic"], tmp_path)
    assert sm.method.payload is None and sm.method.trigger.seed is None
    xm = compose_config(["experiment=xmark_synthetic"], tmp_path)
    assert xm.callbacks.xmark_release.seed is None and xm.callbacks.xmark_release.verification.seed is None


def test_null_secrets_are_drawn_stored_0600_and_never_written_elsewhere(drawn_run):
    tmp, run, proc = drawn_run
    values = _drawn(run)
    payload, seed = values["method.payload"], values["method.trigger.seed"]
    assert len(payload) == 7 and payload != "medmark" and seed != 20240917 and 0 <= seed < 2**31
    secret = json.loads((run / "owner" / "secret.json").read_text())
    assert secret["key"]["payload"] == payload and secret["key"]["trigger"]["seed"] == seed  # the model carries them
    for name in ("secret.json", DRAWN_SECRETS_FILE, SALT_FILE, "owner_private_key.pem"):
        assert _mode(run / "owner" / name) == 0o600, name
    written = _everything_written(run, proc)
    assert payload not in written and f"seed: {seed}" not in written and str(seed) not in written
    log = (run / "train.log").read_text()
    assert log.count("drawn at random") == 1 and "method.payload" in log  # the one line, naming keys only


def test_two_runs_draw_different_secrets(drawn_run, tmp_path):
    _tmp, run, _proc = drawn_run
    other = compose_config(["experiment=stealthmark_synthetic"], tmp_path)
    drawn = resolve_secrets(other).drawn
    first = _drawn(run)
    assert drawn["method.payload"] != first["method.payload"]
    assert drawn["method.trigger.seed"] != first["method.trigger.seed"]
    xm = compose_config(["experiment=xmark_synthetic"], tmp_path)
    xm2 = compose_config(["experiment=xmark_synthetic"], tmp_path)
    a, b = resolve_secrets(xm).drawn, resolve_secrets(xm2).drawn
    assert set(a) == {"callbacks.xmark_release.seed", "callbacks.xmark_release.verification.seed"}
    assert a != b and xm.callbacks.xmark_release.seed == a["callbacks.xmark_release.seed"]


# ----------------------------------------------------------------------------- salted redaction


def test_config_yaml_holds_a_salted_hmac_not_a_plain_hash(drawn_run):
    _tmp, run, _proc = drawn_run
    public = yaml.safe_load((run / "config.yaml").read_text())
    payload = _drawn(run)["method.payload"]
    stored = public["method"]["payload"]
    assert stored.startswith("<secret hmac-sha256:")
    plain = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert plain[:16] not in stored and plain not in stored
    # the owner (with the kit's salt) can show the config referred to their payload; a guess without it can't
    salt = bytes.fromhex((run / "owner" / SALT_FILE).read_text().strip())
    assert len(salt) == 32 and stored == f"<secret hmac-sha256:{secret_digest(payload, salt)}>"
    assert secret_digest(payload, b"\0" * 32) not in stored


# ----------------------------------------------------------------------------- secret file


def test_secret_file_overrides_and_stays_out_of_config_and_stdout(tmp_path):
    secret_file = tmp_path / "mine.yaml"
    secret_file.write_text("method:\n  payload: zq8kv2w\n  trigger: {seed: 7654321}\n")
    secret_file.chmod(0o600)
    proc, run = run_train(TINY_SM, tmp_path, "run", env={"MEDMARK_SECRET_FILE": str(secret_file)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = json.loads((run / "owner" / "secret.json").read_text())["key"]
    assert key["payload"] == "zq8kv2w" and key["trigger"]["seed"] == 7654321
    assert not (run / "owner" / DRAWN_SECRETS_FILE).exists()  # nothing drawn: nothing to record
    written = _everything_written(run, proc)
    assert "zq8kv2w" not in written and "7654321" not in written


def test_secret_file_with_a_non_secret_field_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": {"payload": "abc1234", "epsilon": 0.49}}))
    bad.chmod(0o600)
    cfg = compose_config(["experiment=stealthmark_synthetic", f"secret_file={bad}"], tmp_path)
    with pytest.raises(ValueError, match="method.epsilon.*not a secret field") as err:
        resolve_secrets(cfg)
    assert "abc1234" not in str(err.value)


def test_world_readable_secret_file_warns(tmp_path, caplog):
    loose = tmp_path / "loose.json"
    loose.write_text(json.dumps({"method.payload": "abc1234"}))
    loose.chmod(0o644)
    cfg = compose_config(["experiment=stealthmark_synthetic", f"secret_file={loose}"], tmp_path)
    with caplog.at_level("WARNING", logger="medmark"):
        resolve_secrets(cfg)
    assert cfg.method.payload == "abc1234" and "readable by group/others" in caplog.text


# ----------------------------------------------------------------------------- resume


def test_resume_reuses_the_kits_secret_and_never_draws(drawn_run, tmp_path):
    _tmp, run, _proc = drawn_run
    cfg = compose_config(["experiment=stealthmark_synthetic", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
                         tmp_path)
    result = resolve_secrets(cfg)
    assert not result.drawn and result.reused == _drawn(run)
    assert cfg.method.payload == _drawn(run)["method.payload"]
    assert cfg.method.trigger.patch.seed == _drawn(run)["method.trigger.seed"]
    lost = compose_config(["experiment=stealthmark_synthetic", f"ckpt_path={tmp_path / 'x' / 'checkpoints' / 'last.ckpt'}"],
                          tmp_path)
    with pytest.raises(ValueError, match="null on resume"):
        resolve_secrets(lost)


# ----------------------------------------------------------------------------- no silent kit replacement


def test_second_run_into_the_same_folder_exits_2_and_keeps_the_old_kit(drawn_run):
    tmp, run, _proc = drawn_run
    before = {p.name: p.read_bytes() for p in (run / "owner").iterdir()}
    proc, again = run_train(TINY_SM, tmp, "run")
    assert again == run
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(run / "owner") in proc.stderr and "overwrite_kit=true" in proc.stderr
    assert {p.name: p.read_bytes() for p in (run / "owner").iterdir()} == before


def test_refusal_spares_resume_and_overwrite(tmp_path):
    kit = tmp_path / "owner"
    kit.mkdir()
    (kit / "secret.json").write_text("{}")
    cfg = compose_config(["experiment=stealthmark_synthetic"], tmp_path)
    with pytest.raises(KitExistsError, match="secret.json"):
        refuse_existing_kit(cfg, kit)
    refuse_existing_kit(compose_config(["experiment=stealthmark_synthetic", "overwrite_kit=true"], tmp_path), kit)
    refuse_existing_kit(compose_config(["experiment=stealthmark_synthetic", "ckpt_path=/x/last.ckpt"], tmp_path), kit)


# ----------------------------------------------------------------------------- private files 0600 from creation


@pytest.fixture
def open_spy(monkeypatch):
    """Record (path, mode) of every os.open that creates a file; umask 0 so only the code's mode counts."""
    created: list[tuple[str, int]] = []
    real = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            created.append((str(path), mode))
        return real(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)
    yield created
    os.umask(old)


def test_every_methods_private_files_are_created_0600(tmp_path, open_spy):
    from watermark.xmark.marker import XMarkMarker
    from models import build_timm_classifier
    from models.generator import ConditionalUNetGenerator
    from watermark.certificates import owner_signing_key
    from watermark.medlocker.keyed_removal import generate_master_key, save_master_key
    from watermark.stealthmark.kit import StealthMarkKey, build_secret, write_secret

    owner = tmp_path / "owner"
    key = StealthMarkKey(payload="abc1234", qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                         trigger={"kind": "patch", "size": 4, "position": "top-left", "seed": 3})
    data = {"_target_": "datamodules.MedicalImageDataModule"}
    thresholds = {"alpha": 1e-3, "response_margin": 0.01, "min_decoded": 1}
    private = [
        write_secret(owner / "secret.json", build_secret(key, ["a"], "test", data, thresholds)),  # StealthMark
        owner_signing_key(owner)[1],  # every method's Ed25519 key
        save_master_key(owner / "master_key.hex", generate_master_key()),  # MedLocker / MIAD-MARK
    ]
    gen_cfg = {"in_channels": 1, "saliency_channels": 1, "base_width": 4, "depth": 2, "epsilon": 8 / 255}
    sur_cfg = {"_target_": "models.build_timm_classifier", "name": "small_cnn", "num_classes": 2, "in_channels": 1}
    marker = XMarkMarker(ConditionalUNetGenerator(**gen_cfg), build_timm_classifier(name="small_cnn", num_classes=2,
                                                                                   in_channels=1), gen_cfg, sur_cfg, 32)
    private.append(marker.save(owner / "generator.pt"))  # X-Mark
    for path in private:
        assert _mode(Path(path)) == 0o600, path
        made = [mode for name, mode in open_spy if Path(name).parent == Path(path).parent and Path(path).name in name]
        assert made and all(mode == 0o600 for mode in made), (path, made)
    assert _mode(owner / "owner_public_key.pem") == 0o644  # meant to be shared


def test_xmark_secret_and_medlocker_secret_are_0600(tmp_path):
    from watermark.xmark.kit import build_xmark_secret, write_xmark_secret

    doc = build_xmark_secret(
        target_class=1, classes=["a", "b"], marker_checkpoint="generator.pt", marker_sha256="0" * 64, image_size=32,
        verification_ids=["x", "y"], verification_split="test", verification_seed=3,
        data_config={"_target_": "datamodules.MedicalImageDataModule"}, tau=0.2, alpha=0.01, release={})
    assert _mode(write_xmark_secret(tmp_path / "secret.json", doc)) == 0o600
    source = Path(__file__).resolve().parents[2] / "callbacks" / "medlocker.py"
    assert 'write_secret_file(out / "owner" / "secret.json"' in source.read_text()  # no plain write_text of the kit


# ----------------------------------------------------------------------------- atomic writes


def test_interrupted_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    from watermark import certificates
    from watermark.stealthmark.kit import StealthMarkKey, build_secret, write_secret

    key = StealthMarkKey(payload="abc1234", qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                         trigger={"kind": "patch", "size": 4, "position": "top-left", "seed": 3})
    doc = build_secret(key, ["a"], "test", {"_target_": "x"}, {"alpha": 1e-3, "response_margin": 0.01, "min_decoded": 1})
    path = write_secret(tmp_path / "secret.json", doc)
    old = path.read_bytes()

    def crash(*_args, **_kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    other = build_secret(StealthMarkKey(payload="zzz9999", qr_version=1, error_correction="H", image_size=50,
                                        quiet_zone=2, trigger=key.trigger), ["b"], "test", {"_target_": "x"},
                         doc["thresholds"])
    with pytest.raises(OSError, match="simulated"):
        write_secret(path, other)
    with pytest.raises(OSError, match="simulated"):
        certificates.save_certificate(tmp_path / "secret.json", {"x": 1})
    assert path.read_bytes() == old and _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json"]  # no temporary file left behind


def test_ddp_processes_adopt_rank_zero_key(tmp_path):
    """Two processes that drew different keys (launched separately, e.g. one command per node)
    train on rank 0's: StealthMarkModule.setup compares key hashes and takes rank 0's key."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from watermark.stealthmark.kit import StealthMarkKey

    cfg = compose_config(["experiment=stealthmark_synthetic"], tmp_path)
    resolve_secrets(cfg)
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    data = module.key.to_dict()
    data["payload"] = "other00" if data["payload"] != "other00" else "other01"
    data["trigger"]["seed"] = data["trigger"]["seed"] + 1
    rank0 = StealthMarkKey.from_dict(data)
    assert rank0.sha256() != module.key.sha256()

    class Rank1Strategy:  # what rank 1 sees: rank 0 holds `rank0`
        def broadcast(self, obj, src=0):
            return rank0.sha256() if isinstance(obj, str) else rank0.to_dict()

        def reduce_boolean_decision(self, decision, all=True):
            return decision

    module._trainer = SimpleNamespace(world_size=2, strategy=Rank1Strategy(), is_global_zero=False)
    module.setup("fit")
    assert module.key.sha256() == rank0.sha256()
