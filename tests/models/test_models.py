"""Model factories: pixel contract (shapes, in-model normalisation), offline weights, gradients."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file
from segment_anything import sam_model_registry

from models import build_sam_model, build_smp_model, build_timm_classifier, count_parameters, resolve_local_weights
from models.sam import SAM_SPECS, _build_sam_module
from models.pixels import IMAGENET_MEAN, IMAGENET_STD

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "backbone"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a socket or reach the HF hub fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    import segmentation_models_pytorch.encoders as smp_encoders

    monkeypatch.setattr(smp_encoders, "hf_hub_download", refuse)


def capture_input(module: torch.nn.Module) -> dict:
    """Record the first positional input of ``module``'s next forward call."""
    seen: dict = {}

    def hook(mod, args):
        seen.setdefault("x", args[0].detach().clone())  # returns None: the input is left untouched

    module.register_forward_pre_hook(hook)
    return seen


# ---------------------------------------------------------------- weights policy


def test_resolve_local_weights_policy(tmp_path):
    assert resolve_local_weights(None, "anything") is None
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert resolve_local_weights(str(f), "anything") == f.absolute()
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(FileNotFoundError) as err:
        resolve_local_weights(str(missing), "SAM vit_b checkpoint")
    msg = str(err.value)
    assert str(missing) in msg and "SAM vit_b checkpoint" in msg and "segment-anything" in msg
    with pytest.raises(FileNotFoundError, match="directory"):
        resolve_local_weights(str(tmp_path), "encoder")
    with pytest.raises(FileNotFoundError, match="empty path"):
        resolve_local_weights("", "encoder")


# ---------------------------------------------------------------- smp


@pytest.mark.parametrize("channels", [1, 3])
def test_smp_unet_shapes(channels):
    model = build_smp_model("Unet", "resnet18", in_channels=channels)
    out = model(torch.rand(2, channels, 64, 64))
    assert out.shape == (2, 1, 64, 64) and out.dtype == torch.float32
    assert model.task == "segmentation" and model.input_channels == channels
    # Sides that are not multiples of 32 are padded inside and cropped back.
    assert model(torch.rand(1, channels, 70, 50)).shape == (1, 1, 70, 50)
    with pytest.raises(ValueError, match="B x"):
        model(torch.rand(2, 4 - channels, 64, 64))


def test_smp_normalises_inside_once():
    # Grey data into an RGB network: the grey channel is repeated, then ImageNet-normalised.
    model = build_smp_model("Unet", "resnet18", in_channels=1, network_channels=3).eval()
    seen = capture_input(model.net)
    model(torch.full((2, 1, 64, 64), 0.5))
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert seen["x"].shape == (2, 3, 64, 64)
    torch.testing.assert_close(seen["x"][0, :, 10, 10], expected)
    # 1-channel network default: 0.5 / 0.25, so 0.5 maps to 0 and 1.0 to 2.
    grey = build_smp_model("Unet", "resnet18", in_channels=1).eval()
    seen = capture_input(grey.net)
    grey(torch.ones(1, 1, 64, 64))
    assert torch.allclose(seen["x"], torch.full_like(seen["x"], 2.0))


def test_smp_refuses_non_logit_options():
    with pytest.raises(ValueError, match="logits"):
        build_smp_model("Unet", "resnet18", activation="sigmoid")


def test_smp_position_table_is_resized_to_any_image_and_learned():
    model = build_smp_model("Unet", "resnet18", encoder_depth=3, decoder_channels=(32, 16, 8),
                            position_embedding=[4, 16])
    assert model.position_table.shape == (1, 4, 16, 16)
    assert model.net.encoder.conv1.in_channels == 3 + 4
    for size in (40, 64):
        logits = model(torch.rand(2, 3, size, size))
        assert logits.shape == (2, 1, size, size)
    logits.sum().backward()
    assert model.position_table.grad is not None and model.position_table.grad.abs().sum() > 0
    # the table is an input: the same image at another place in the batch gets the same logits
    image = torch.rand(1, 3, 64, 64)
    model.eval()
    assert torch.allclose(model(image), model(torch.cat([torch.rand(1, 3, 64, 64), image]))[1:], atol=1e-5)
    with pytest.raises(ValueError, match="position_embedding"):
        build_smp_model("Unet", "resnet18", position_embedding=[0, 16])


def test_lr_multipliers_put_named_parameters_in_their_own_group(tmp_path):
    from conftest import TINY_SEG, compose_config

    cfg = compose_config(TINY_SEG + ["backbone.position_embedding=[4,8]", "+method.lr_multipliers.position_table=30"],
                         tmp_path)
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    optimizer = module.configure_optimizers()["optimizer"]
    base = cfg.method.optimizer.lr
    table = [g for g in optimizer.param_groups if any(p is module.model.position_table for p in g["params"])]
    assert len(table) == 1 and table[0]["lr"] == pytest.approx(30 * base) and len(table[0]["params"]) == 1
    rest = [g for g in optimizer.param_groups if g is not table[0]]
    assert rest[0]["lr"] == pytest.approx(base)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
    typo = compose_config(TINY_SEG + ["+method.lr_multipliers.positon_table=30"], tmp_path)
    module = instantiate(typo.method, backbone=typo.backbone, loss=typo.loss, _recursive_=False)
    with pytest.raises(ValueError, match="positon_table"):
        module.configure_optimizers()


def test_smp_encoder_weights_from_local_file(tmp_path):
    torch.manual_seed(0)
    source = build_smp_model("Unet", "resnet18", in_channels=3).eval()
    path = tmp_path / "resnet18_encoder.pth"
    torch.save(source.net.encoder.state_dict(), path)

    torch.manual_seed(1)  # different seed: equality below can only come from the file
    loaded = build_smp_model("Unet", "resnet18", in_channels=3, encoder_weights_path=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(source.net.encoder(x), loaded.net.encoder(x)):
        torch.testing.assert_close(a, b)
    assert not torch.equal(source.net.decoder.blocks[0].conv1[0].weight, loaded.net.decoder.blocks[0].conv1[0].weight)
    assert loaded.weights_source == str(path.absolute())

    # The RGB stem is adapted to grey data by summing over RGB (smp's/timm's rule).
    grey = build_smp_model("Unet", "resnet18", in_channels=1, encoder_weights_path=str(path))
    torch.testing.assert_close(grey.net.encoder.conv1.weight, source.net.encoder.conv1.weight.sum(1, keepdim=True))


def test_smp_encoder_weights_mismatch_lists_missing_keys(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_smp_model("Unet", "resnet18").net.encoder.state_dict(), path)
    with pytest.raises(RuntimeError, match=r"missing keys .*layer1\.2\.conv1\.weight"):
        build_smp_model("Unet", "resnet34", encoder_weights_path=str(path))


def test_smp_missing_encoder_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "resnet34.pth"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        build_smp_model("Unet", "resnet34", encoder_weights_path=str(missing))


def test_smp_named_weights_only_from_local_cache(tmp_path, monkeypatch):
    import segmentation_models_pytorch as smp

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    # Not cached: a clear error (the autouse fixture makes any download attempt fail differently).
    with pytest.raises(FileNotFoundError, match="encoder_weights_path"):
        build_smp_model("Unet", "resnet18", encoder_weights="imagenet")

    # Cached (the layout huggingface_hub writes): loaded from disk, no network.
    settings = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snapshot = tmp_path / "models--smp-hub--resnet18.imagenet" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    torch.manual_seed(3)
    reference = build_smp_model("Unet", "resnet18").net.encoder
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    model = build_smp_model("Unet", "resnet18", encoder_weights="imagenet")
    torch.testing.assert_close(model.net.encoder.conv1.weight, reference.conv1.weight)


# ---------------------------------------------------------------- SAM


def test_sam_tiny_no_prompt_shapes_and_boxes_ignored():
    torch.manual_seed(0)
    model = build_sam_model("tiny", prompt_mode="none").eval()
    assert model.task == "segmentation" and model.input_channels == 3 and model.image_size == 64
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 1, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(model(x, torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)), out)
    grey = build_sam_model("tiny", in_channels=1, multimask=True).eval()
    assert grey(torch.rand(3, 1, 48, 80)).shape == (3, 1, 48, 80)


def test_sam_tiny_box_mode_depends_on_box():
    torch.manual_seed(0)
    model = build_sam_model("tiny", prompt_mode="box").eval()
    x = torch.rand(2, 3, 64, 64)
    a = model(x, torch.tensor([[4.0, 4.0, 30.0, 30.0], [4.0, 4.0, 30.0, 30.0]]))
    b = model(x, torch.tensor([[20.0, 10.0, 63.0, 50.0], [20.0, 10.0, 63.0, 50.0]]))
    assert a.shape == b.shape == (2, 1, 64, 64)
    assert (a - b).abs().max() > 1e-4
    # No box in box mode = the full-image box, in input pixels (here 32x32 -> encoder 64x64).
    small = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(model(small), model(small, torch.tensor([[0.0, 0.0, 31.0, 31.0]])))
    # Boxes are rescaled from input pixels to the encoder frame before prompting.
    seen = {}
    model.sam.prompt_encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(boxes=kwargs["boxes"].clone()), with_kwargs=True
    )
    model(torch.rand(1, 3, 32, 16), torch.tensor([[2.0, 4.0, 8.0, 30.0]]))
    torch.testing.assert_close(seen["boxes"], torch.tensor([[8.0, 8.0, 32.0, 60.0]]))
    with pytest.raises(ValueError, match="boxes"):
        model(x, torch.zeros(2, 2))


def test_sam_normalises_with_its_pixel_stats():
    model = build_sam_model("tiny", in_channels=1).eval()
    seen = capture_input(model.sam.image_encoder)
    model(torch.full((2, 1, 32, 32), 0.5))
    # Resized to the encoder's 64x64, grey repeated to RGB, SAM's 0-255 statistics applied once.
    assert seen["x"].shape == (2, 3, 64, 64)
    expected = (127.5 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(seen["x"][1, :, 5, 7], expected)


@pytest.mark.parametrize("freeze_image_encoder", [False, True])
def test_sam_gradients_respect_freezing(freeze_image_encoder):
    torch.manual_seed(0)
    model = build_sam_model("tiny", prompt_mode="box", freeze_image_encoder=freeze_image_encoder)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    model(images).square().mean().backward()
    decoder = model.sam.mask_decoder
    # The single-mask output uses mask token 0's hypernetwork; the 3 multimask MLPs and the IoU head
    # do not reach the logits, so only the parts on the path are checked.
    on_path = [decoder.transformer, decoder.output_upscaling, decoder.output_hypernetworks_mlps[0]]
    assert all(p.grad is not None for part in on_path for p in part.parameters())
    assert all(p.grad is None for p in model.sam.prompt_encoder.parameters())  # frozen by default
    encoder_grads = [p.grad for p in model.sam.image_encoder.parameters()]
    if freeze_image_encoder:
        assert all(g is None for g in encoder_grads)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    # Pixel-space watermarks need d(logits)/d(pixels) even through a frozen encoder.
    assert images.grad is not None and images.grad.abs().sum() > 0
    frozen = count_parameters(model.sam.prompt_encoder)
    frozen += count_parameters(model.sam.image_encoder) if freeze_image_encoder else 0
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


def test_sam_checkpoint_round_trip_and_resolution_change(tmp_path):
    torch.manual_seed(0)
    source = build_sam_model("tiny").eval()
    path = tmp_path / "sam_tiny.pth"
    torch.save(source.sam.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_sam_model("tiny", checkpoint=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), source(x))
    # Fine-tuning at another encoder resolution: position tables are interpolated, not dropped.
    bigger = build_sam_model("tiny", checkpoint=str(path), image_size=128).eval()
    assert bigger.sam.image_encoder.pos_embed.shape == (1, 16, 16, 64)
    torch.testing.assert_close(bigger.sam.mask_decoder.iou_token.weight, source.sam.mask_decoder.iou_token.weight)
    assert bigger(x).shape == (2, 1, 64, 64)


def test_sam_full_size_needs_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth"):
        build_sam_model("vit_b")
    missing = tmp_path / "weights" / "sam_vit_l_0b3195.pth"
    with pytest.raises(FileNotFoundError) as err:
        build_sam_model("vit_l", checkpoint=str(missing))
    assert str(missing) in str(err.value) and "dl.fbaipublicfiles.com" in str(err.value)


def test_sam_vit_b_matches_official_registry_and_random_init_on_request():
    # Same architecture as segment-anything's registry (checked on the meta device: no memory, no time).
    with torch.device("meta"):
        official = sam_model_registry["vit_b"]().state_dict()
        ours = _build_sam_module(SAM_SPECS["vit_b"], 1024).state_dict()
    assert {k: v.shape for k, v in official.items()} == {k: v.shape for k, v in ours.items()}
    model = build_sam_model("vit_b", allow_random_init=True)
    assert model.image_size == 1024 and 90e6 < count_parameters(model) < 95e6


# ---------------------------------------------------------------- classifiers


@pytest.mark.parametrize("name, channels", [("resnet18", 3), ("vgg16", 1), ("small_cnn", 1)])
def test_classifier_shapes_at_64px(name, channels):
    model = build_timm_classifier(name, num_classes=3, in_channels=channels).eval()
    out = model(torch.rand(2, channels, 64, 64))
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert model.task == "classification" and model.input_channels == channels and model.num_classes == 3


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "efficientnet_b0"])
def test_other_timm_families_take_grey_64px(name):
    assert build_timm_classifier(name, num_classes=2, in_channels=1).eval()(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_classifier_normalises_inside_and_gradients_flow():
    model = build_timm_classifier("small_cnn", num_classes=2, in_channels=3)
    seen = capture_input(model.net)
    x = torch.full((2, 3, 32, 32), 0.5)
    model(x).sum().backward()
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(seen["x"][0, :, 3, 3], expected)
    assert all(p.grad is not None for p in model.parameters())
    # 0-255 input is not silently rescaled: the wrapper normalises exactly once. (A fresh model:
    # the constant batch above has skewed the first one's BatchNorm running statistics.)
    fresh = build_timm_classifier("small_cnn", num_classes=2, in_channels=3).eval()
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(fresh(x), fresh(x * 255), atol=1e-3)


def test_classifier_weights_from_local_file(tmp_path):
    torch.manual_seed(0)
    source = build_timm_classifier("resnet18", num_classes=5, in_channels=3).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(source.net.state_dict(), path)
    torch.manual_seed(1)
    same = build_timm_classifier("resnet18", num_classes=5, weights_path=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(same(x), source(x))
    assert same.weights_report == {"adapted": [], "reinitialised": []}

    # Another number of classes: the head stays random and is reported; the trunk is loaded.
    other = build_timm_classifier("resnet18", num_classes=2, in_channels=1, weights_path=str(path)).eval()
    assert other.weights_report == {"adapted": ["conv1.weight"], "reinitialised": ["fc.weight", "fc.bias"]}
    torch.testing.assert_close(other.net.layer4[1].conv2.weight, source.net.layer4[1].conv2.weight)
    torch.testing.assert_close(other.net.conv1.weight, source.net.conv1.weight.sum(1, keepdim=True))

    with pytest.raises(RuntimeError, match="missing keys"):
        build_timm_classifier("resnet34", num_classes=5, weights_path=str(path))
    missing = tmp_path / "none.pth"
    with pytest.raises(FileNotFoundError, match="none.pth"):
        build_timm_classifier("resnet18", weights_path=str(missing))


# ---------------------------------------------------------------- configs


def _compose(name: str, tmp_path: Path, channels: int = 1):
    cfg = OmegaConf.create(
        {
            "data": {"channels": channels, "num_classes": 2},
            "paths": {"weights_dir": str(tmp_path)},
            "backbone": OmegaConf.load(CONFIG_DIR / f"{name}.yaml"),
        }
    )
    return cfg.backbone


@pytest.mark.parametrize(
    "name, task",
    [
        ("unet_resnet34", "segmentation"),
        ("unet_resnet18", "segmentation"),
        ("unetpp_resnet34", "segmentation"),
        ("deeplabv3p_resnet34", "segmentation"),
        ("sam_tiny", "segmentation"),
        ("resnet18", "classification"),
        ("resnet34", "classification"),
        ("vgg19", "classification"),
        ("small_cnn", "classification"),
    ],
)
def test_backbone_configs_instantiate(name, task, tmp_path):
    model = instantiate(_compose(name, tmp_path)).eval()
    assert model.task == task and model.input_channels == 1
    out = model(torch.rand(1, 1, 64, 64))
    assert out.shape == ((1, 1, 64, 64) if task == "segmentation" else (1, 2))


@pytest.mark.parametrize(
    "name, filename",
    [("sam_vit_b", "sam_vit_b_01ec64.pth"), ("sam_vit_l", "sam_vit_l_0b3195.pth"), ("sam_vit_h", "sam_vit_h_4b8939.pth")],
)
def test_full_sam_configs_point_at_weights_dir(name, filename, tmp_path):
    cfg = _compose(name, tmp_path, channels=3)
    assert cfg.checkpoint == str(tmp_path / filename)
    with pytest.raises(Exception) as err:  # hydra wraps the factory's error
        instantiate(cfg)
    cause = err.value if isinstance(err.value, FileNotFoundError) else err.value.__cause__
    assert isinstance(cause, FileNotFoundError) and str(tmp_path / filename) in str(cause)
