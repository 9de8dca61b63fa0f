"""The MedLocker demo on a real fundus photograph (``skimage.data.retina()``): figures for docs/medlocker.md.

Steps, all with medmark's own functions:

1. the photograph, area-downsampled to ``--size`` px (uint8, as it would be stored);
2. a lesion region: candidate lesions (small dark spots -- microaneurysm/haemorrhage-like --
   and bright spots -- exudate-like -- of the green channel, by a difference of Gaussians)
   plus the optic disc, turned into dilated bounding boxes (:mod:`watermark.medlocker.regions`).
   This heuristic stands in for a lesion segmentation model; on real data use IDRiD's
   lesion masks or a trained segmenter;
3. the owner's QR logo placed by the black-box basin-hopping search against a surrogate
   classifier (``--surrogate``, a ``method=task`` checkpoint trained on synthetic_dr; the
   photograph is resized to the surrogate's input size inside the query function), or, with
   no surrogate, at the region-free position farthest from the region;
4. the stored protected image (:func:`watermark.medlocker.logo.render_protected`), its encrypted
   restore record, and the bit-exact restoration with the master key.

    python docs/make_medlocker_figures.py --surrogate <run>/checkpoints/best-epochNNN.ckpt

Writes ``docs/figures/medlocker_retina_*.png`` and ``docs/figures/medlocker_retina_demo.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage import data  # noqa: E402

from watermark.medlocker.blackbox_search import QueryCounter, SearchConfig, blackbox_search  # noqa: E402
from watermark.medlocker.keyed_removal import encrypt_residual, generate_master_key, restore  # noqa: E402
from watermark.medlocker.logo import footprint, logo_mask, render_protected, render_qr_logo  # noqa: E402
from watermark.medlocker.regions import allowed_positions, boxes_from_mask, region_from_boxes  # noqa: E402


def lesion_candidates(image: np.ndarray) -> np.ndarray:
    """Bool H×W: small dark/bright spots of the green channel inside the field of view, and the optic disc."""
    green = image[..., 1].astype(np.float64) / 255.0
    fov = ndimage.binary_erosion(image.max(axis=2) > 20, iterations=6)
    dog = ndimage.gaussian_filter(green, 1.0) - ndimage.gaussian_filter(green, 4.0)
    spread = dog[fov].std()
    spots = ((dog < -3.0 * spread) | (dog > 3.5 * spread)) & fov
    spots = ndimage.binary_opening(spots, iterations=1)
    # optic disc: the brightest large blob of the smoothed image
    smooth = ndimage.gaussian_filter(image.mean(axis=2), 6)
    disc = (smooth >= np.quantile(smooth[fov], 0.995)) & fov
    return spots | disc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--surrogate", default=None)
    parser.add_argument("--surrogate-size", type=int, default=64, help="input side the surrogate was trained at")
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    original = cv2.resize(data.retina()[..., :3], (args.size, args.size), interpolation=cv2.INTER_AREA)
    lesions = lesion_candidates(original)
    boxes = boxes_from_mask(lesions, dilation_px=3, min_area_px=2)
    region = region_from_boxes(boxes, args.size, args.size)
    logo = render_qr_logo("medmark:owner", int(args.size * 0.25), dark_rgb=(0.0, 0.0, 0.0))
    allowed = allowed_positions(region, logo_mask(logo))
    # keep the mark inside the photograph's field of view (not on the black border)
    fov = ndimage.binary_erosion(original.max(axis=2) > 20, iterations=2)
    allowed &= allowed_positions(~fov, logo_mask(logo))
    if not allowed.any():
        raise SystemExit("no region-free position for the logo; use a smaller logo")

    image_t = torch.from_numpy(original).permute(2, 0, 1).float() / 255.0
    info = {"image_size": args.size, "lesion_boxes": len(boxes), "region_fraction": float(region.mean())}
    if args.surrogate:
        from models.safe_reader import load_model_checkpoint

        model, _ = load_model_checkpoint(args.surrogate, task="classification", default_task="classification")
        side = args.surrogate_size

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.softmax(model(F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)), 1)

        clean_label = int(predict(image_t[None]).argmax())
        counter = QueryCounter(predict)
        res = blackbox_search(counter, image_t, clean_label, logo, allowed,
                              SearchConfig(alpha_range=(0.6, 1.0), query_budget=600, seed=args.seed))
        x, y, alpha = res.x, res.y, round(res.alpha, 4)
        info.update({"surrogate": str(args.surrogate), "surrogate_grade_clean": clean_label,
                     "surrogate_grade_protected": res.predicted, "search_success": res.success,
                     "queries": res.queries})
    else:
        dist = ndimage.distance_transform_edt(~region)
        h, w = logo_mask(logo).shape
        centre = dist[h // 2: h // 2 + allowed.shape[0], w // 2: w // 2 + allowed.shape[1]]
        y, x = np.unravel_index(np.where(allowed, centre, -1).argmax(), allowed.shape)
        x, y, alpha = int(x), int(y), 0.85
    protected = render_protected(original, logo, x, y, alpha)
    fp = footprint(args.size, args.size, logo, x, y)
    key = generate_master_key()
    blob = encrypt_residual(original, protected, fp, key, "retina")
    restored = restore(protected, blob, key, "retina")
    info.update({"x": x, "y": y, "alpha": alpha, "footprint_px": int(fp.sum()),
                 "lesion_region_changed_px": int((protected != original).any(axis=2)[region].sum()),
                 "restore_bit_exact": bool(np.array_equal(restored, original)), "restore_blob_bytes": len(blob),
                 "psnr_db": float(10 * np.log10(255.0 ** 2 / ((protected.astype(float) - original) ** 2).mean()))})

    overlay = original.copy()
    overlay[region] = (0.45 * overlay[region] + 0.55 * np.array([255, 40, 40])).astype(np.uint8)
    mark = np.ones((args.size, args.size, 3))
    lg = logo.astype(np.float64)
    mark[y:y + lg.shape[0], x:x + lg.shape[1]] = 1 - alpha * lg[..., 3:4] * (1 - lg[..., :3])
    panels = {
        "region": (overlay, "lesion region (red): never touched"),
        "mark": ((mark * 255).astype(np.uint8), f"mark: QR at ({x}, {y}), alpha {alpha}"),
        "protected": (protected, "protected (stored, lossless PNG)"),
        "restored": (restored, f"restored with the key: bit-exact = {info['restore_bit_exact']}"),
    }
    for name, (img, _title) in panels.items():
        plt.imsave(out / f"medlocker_retina_{name}.png", img)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.9))
    for ax, (img, title) in zip(axes, panels.values()):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "medlocker_retina_panel.png", dpi=110)
    (out / "medlocker_retina_demo.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
