"""The data config stored in secret.json is rebuilt from an exact data-module name, never from
nested Hydra targets (a copied or restored secret must not run code on the verifier)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from verification.protocols import BadInput, data_config

NO_OVERRIDES = OmegaConf.create({"root": None, "image_size": None})


def stored(**extra):
    return {"_target_": "datamodules.MedicalImageDataModule", "root": "/data", "image_size": 64, **extra}


def test_plain_stored_data_config_is_accepted_with_overrides_applied():
    config = data_config(stored(augment={"hflip": 0.5}), OmegaConf.create({"root": "/mine", "image_size": None}),
                         "kit/secret.json")
    assert config["root"] == "/mine" and config["image_size"] == 64 and config["augment"] == {"hflip": 0.5}


@pytest.mark.parametrize("target", ["datamodules.os.system", "builtins.open", "datamodules.", None])
def test_outer_target_must_be_an_exact_data_module(target):
    with pytest.raises(BadInput, match=r"kit/secret.json: field 'verification.data._target_'"):
        data_config(stored(_target_=target), NO_OVERRIDES, "kit/secret.json")


@pytest.mark.parametrize("payload, where", [
    ({"augment": {"_target_": "builtins.open", "file": "/tmp/x", "mode": "w"}}, "verification.data.augment._target_"),
    ({"synthetic": {"gen": {"_partial_": True}}}, "verification.data.synthetic.gen._partial_"),
    ({"transforms": [{"_target_": "os.system"}]}, r"verification.data.transforms\[0\]._target_"),
    ({"_args_": ["x"]}, "verification.data._args_"),
    ({"_recursive_": False}, "verification.data._recursive_"),
])
def test_nested_hydra_keys_are_refused_and_named(payload, where):
    with pytest.raises(BadInput, match=where):
        data_config(stored(**payload), NO_OVERRIDES, "kit/secret.json")


def test_published_certificate_file_is_bounded_and_must_be_an_object(tmp_path, monkeypatch):
    from watermark import certificates

    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(certificates.CertificateFormatError, match="list.json: a certificate is a JSON object"):
        certificates.load_certificate(listed)
    big = tmp_path / "big.json"
    big.write_text('{"entries": []}' + " " * 64)
    monkeypatch.setattr(certificates, "MAX_CERTIFICATE_BYTES", 32)
    with pytest.raises(certificates.CertificateFormatError, match="big.json is larger than 32 bytes"):
        certificates.load_certificate(big)
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'{"entries": [\xff')
    with pytest.raises(certificates.CertificateFormatError, match="broken.json is not valid JSON"):
        certificates.load_certificate(broken)
