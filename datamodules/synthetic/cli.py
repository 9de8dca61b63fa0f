"""Command line: ``python -m datamodules.synthetic <name> --out DIR --num-images N --image-size PX``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.synthetic.cache import GENERATORS, ensure_synthetic


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, null, lists
    except ValueError:
        return key, value  # a bare string such as Lung Opacity


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write one synthetic dataset into ``--out`` (or cache it with ``--cache``)."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic",
        description="Write a deterministic synthetic dataset in a real dataset's on-disk layout.",
    )
    parser.add_argument("name", choices=sorted(GENERATORS))
    parser.add_argument("--out", type=Path, required=True, help="output folder (with --cache: the data_dir)")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--option", "-o", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
        help="generator option, repeatable (e.g. -o finding=Edema -o num_val=10)",
    )
    parser.add_argument(
        "--cache", action="store_true", help="generate into OUT/<name>_<hash>/ only if not there yet (ensure_synthetic)"
    )
    args = parser.parse_args(argv)
    options = dict(args.option)
    try:
        if args.cache:
            root = ensure_synthetic(args.name, args.out, args.num_images, args.image_size, args.seed, **options)
        else:
            root = GENERATORS[args.name](args.out, args.num_images, args.image_size, args.seed, **options)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    print(root)
    return 0
