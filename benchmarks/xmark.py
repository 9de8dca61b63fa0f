"""X-Mark costs, measured in one process; prints JSON.

1. Generator training step, split by loss term: the shared forward (G, saliency from the
   cache, the proxy/surrogate/reference logits every term reads), then each configured
   generator term's value + its own backward (``retain_graph``), then the optimiser step;
   plus the proxy-Mal CE step that precedes it. Median over ``--steps`` repetitions after
   ``--warmup`` untimed ones.
2. Marking throughput (images/s): :func:`watermark.xmark.marker.mark_native` on 8-bit
   images of the native size (resize, EigenCAM, G, up-sampling, exact rounding), as the
   release does per file; and batched ``XMarkMarker.mark`` on tensors.
3. Verification time for m = ``--m`` (default 100) non-target images: marking them,
   2·m suspect queries (a ``small_cnn`` classifier) and the paired t-test.

    python benchmarks/xmark.py                        # the xmark_synthetic experiment, 64 px
    python benchmarks/xmark.py --image-size 128 --backbone resnet18
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import utils.resolvers  # noqa: E402,F401
from watermark.imageio import quantise  # noqa: E402
from watermark.xmark.marker import mark_native, query_pairs  # noqa: E402
from watermark.xmark.stats import xmark_test  # noqa: E402


def build_module(args: argparse.Namespace, tmp: Path):
    overrides = [
        "experiment=xmark_synthetic", "logger=none", f"backbone={args.backbone}",
        f"paths.root_dir={ROOT}", f"paths.output_dir={tmp / 'run'}", f"paths.log_dir={tmp / 'logs'}",
        f"paths.data_dir={tmp / 'data'}", f"data.image_size={args.image_size}", "method.warmup_steps=0",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    module.surrogate.eval().requires_grad_(False)
    return module, cfg


def timed(fn, repeats: int, warmup: int) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def generator_step(module, batch: dict, args: argparse.Namespace) -> dict:
    generator_opt = instantiate(module.hparams.generator_optimizer, params=list(module.generator.parameters()))
    proxy_opt = instantiate(module.hparams.optimizer, params=list(module.model.parameters()))
    saliency = module.saliency(batch["image"])

    def proxy_step():
        module.model.train()
        loss = torch.nn.functional.cross_entropy(module.model(batch["image"]), batch["label"])
        proxy_opt.zero_grad()
        loss.backward()
        proxy_opt.step()

    rows: dict[str, list[float]] = {"proxy_step": [], "saliency_eigencam": [], "forward": [], "optimizer_step": []}
    rows.update({f"term/{name}": [] for name in module.generator_terms})
    for i in range(args.warmup + args.steps):
        record = i >= args.warmup
        t = time.perf_counter()
        proxy_step()
        t1 = time.perf_counter()
        module.saliency(batch["image"])  # uncached: the first epoch's cost; later epochs read the cache
        t2 = time.perf_counter()
        outputs = module.generator_outputs(batch, saliency, train=True)
        t3 = time.perf_counter()
        generator_opt.zero_grad()
        term_times = {}
        for name in module.generator_terms:
            term = module.loss_terms[name]
            s = time.perf_counter()
            value = term.weight * term(outputs, batch)
            value.backward(retain_graph=True)
            term_times[name] = time.perf_counter() - s
        s = time.perf_counter()
        generator_opt.step()
        t4 = time.perf_counter() - s
        if record:
            rows["proxy_step"].append(t1 - t)
            rows["saliency_eigencam"].append(t2 - t1)
            rows["forward"].append(t3 - t2)
            rows["optimizer_step"].append(t4)
            for name, value in term_times.items():
                rows[f"term/{name}"].append(value)
    medians = {k: round(statistics.median(v) * 1000, 2) for k, v in rows.items()}
    generator_total = medians["forward"] + medians["optimizer_step"] + sum(
        v for k, v in medians.items() if k.startswith("term/"))
    return {"unit": "ms (median)", "batch_size": len(batch["image"]), **medians,
            "generator_step_total": round(generator_total, 2),
            "note": "term/<name> = that term's value + its own backward through G (retain_graph); the shared "
                    "forward is counted once"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mark-images", type=int, default=64)
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp_dir:
        module, cfg = build_module(args, Path(tmp_dir))
    size, channels = args.image_size, int(cfg.data.channels)
    batch = {"image": torch.rand(args.batch_size, channels, size, size),
             "label": torch.arange(args.batch_size) % 2, "id": [str(i) for i in range(args.batch_size)]}
    step = generator_step(module, batch, args)

    marker = module.marker(size)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, size=(size, size), dtype=np.uint8) for _ in range(args.mark_images)]
    start = time.perf_counter()
    for p in pixels:
        mark_native(marker, p, channels)
    per_file = args.mark_images / (time.perf_counter() - start)
    tensors = torch.rand(args.mark_images, channels, size, size)
    batched_seconds, _ = timed(lambda: marker.mark(tensors), repeats=3, warmup=1)

    suspect = instantiate({**dict(cfg.backbone), "_target_": "models.build_timm_classifier"}).eval()
    queries = {"n": 0}

    def predict(x):
        queries["n"] += len(x)
        with torch.no_grad():
            return torch.softmax(suspect(x), 1)

    images = torch.rand(args.m, channels, size, size)
    start = time.perf_counter()
    marked = quantise(marker.mark(images)["marked"])
    pairs = query_pairs(predict, images, marked, target_class=1, batch_size=250)
    result = xmark_test(pairs["p_benign"], pairs["p_marked"], 0.2, 0.01, pairs["pred_marked"], 1)
    verify_seconds = time.perf_counter() - start

    print(json.dumps({
        "device": "cpu", "torch_threads": torch.get_num_threads(), "image_size": size, "backbone": args.backbone,
        "generator": dict(cfg.method.generator),
        "generator_training_step": step,
        "marking_throughput": {"per_file_images_per_s": round(per_file, 1),
                               "batched_images_per_s": round(args.mark_images / batched_seconds, 1),
                               "images": args.mark_images},
        "verification": {"m": args.m, "seconds": round(verify_seconds, 3), "queries": queries["n"],
                         "p_value_random_suspect": result["p_value"]},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
