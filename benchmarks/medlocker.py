"""MedLocker / MIAD-MARK throughput, measured in one process; prints JSON.

1. White-box protection: images protected per second by ``MedLockerModule.test_step``
   (lesion region, placement with restarts, exact render, removal-attempt evaluation),
   for ``medlocker`` (mark only) and ``miadmark`` (Grad-CAM region + PGD δ).
2. Black-box protection: images per second and queries per image of the basin-hopping
   evolution search against the same surrogate seen only through its probabilities.
3. Keyed restore: images restored (AES-256-GCM decrypt + zlib + residual) per second.

The surrogate is ``--surrogate`` (a trained ``method=task`` checkpoint of the same
backbone; recommended, success rates then mean something) or a randomly initialised
network of the experiment's backbone (timings only).

    python benchmarks/medlocker.py
    python benchmarks/medlocker.py --surrogate logs/.../checkpoints/best.ckpt --num-images 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import utils.resolvers  # noqa: E402,F401
from watermark.medlocker.keyed_removal import encrypt_residual, generate_master_key, restore  # noqa: E402


def build(method: str, args: argparse.Namespace, tmp: Path, search: str):
    overrides = [
        f"experiment={method}_synthetic", "logger=none", f"paths.root_dir={ROOT}",
        f"paths.output_dir={tmp / method}", f"paths.log_dir={tmp / 'logs'}",
        f"data.batch_size={args.batch_size}", f"backbone={args.backbone}", f"method.search={search}",
    ]
    if args.surrogate:
        overrides.append(f"method.surrogate_checkpoint={args.surrogate}")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False).eval()
    return module, datamodule


def time_protection(module, datamodule, num_images: int) -> dict:
    loader = DataLoader(datamodule.dataset("test"), batch_size=module_batch(datamodule), shuffle=False)
    module.on_test_start()
    seen, seconds = 0, 0.0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if seen >= num_images:
                break
            start = time.perf_counter()
            module.test_step(batch, i)
            seconds += time.perf_counter() - start
            seen += len(batch["id"])
    records = [r for r in module.records if r["protected_ok"]]
    queries = [r["queries"] for r in records if r["queries"] is not None]
    out = {
        "images": seen,
        "seconds": round(seconds, 3),
        "images_per_s": round(seen / seconds, 3),
        "success_rate": round(sum(r["pred_protected"] != r["label"] for r in records) / max(1, len(records)), 3),
        "placements": {k: sum(r.get("placement", "mark") == k for r in module.records)
                       for k in ("mark", "delta_only", "none")},
    }
    if queries:
        out["queries_per_image_median"] = statistics.median(queries)
        out["queries_per_image_mean"] = round(statistics.mean(queries), 1)
    return out, records


def module_batch(datamodule) -> int:
    return datamodule.eval_batch_size


def time_restore(records: list[dict], repeats: int) -> dict:
    key = generate_master_key()
    blobs = [(r, encrypt_residual(r["original"], r["protected"], r["footprint"], key, r["id"])) for r in records]
    start = time.perf_counter()
    for _ in range(repeats):
        for r, blob in blobs:
            restored = restore(r["protected"], blob, key, r["id"])
    seconds = time.perf_counter() - start
    assert (restored == blobs[-1][0]["original"]).all()
    n = len(blobs) * repeats
    return {"images": n, "seconds": round(seconds, 4), "images_per_s": round(n / seconds, 1),
            "blob_bytes_mean": round(statistics.mean(len(b) for _, b in blobs), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--surrogate", default=None, help="trained method=task checkpoint of --backbone")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--restore-repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"backbone": args.backbone, "surrogate": args.surrogate or "random init (timings only)",
              "device": "cpu", "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        module, dm = build("medlocker", args, tmp, "whitebox")
        result["image_size"] = dm.image_size
        result["whitebox_medlocker"], records = time_protection(module, dm, args.num_images)
        module, dm = build("miadmark", args, tmp, "whitebox")
        result["whitebox_miadmark"], _ = time_protection(module, dm, args.num_images)
        module, dm = build("medlocker", args, tmp, "blackbox")
        result["blackbox_medlocker"], _ = time_protection(module, dm, args.num_images)
        result["restore"] = time_restore(records, args.restore_repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
