"""The weights command: which pretrained files medmark knows, whether the local copies are
right, and (only when asked, online) fetching them. The list is ``configs/weights.yaml``.

    python -m models.weights_cli list   [--weights-dir DIR] [--manifest FILE]
    python -m models.weights_cli check  [NAME ...] [--weights-dir DIR] [--manifest FILE]
    python -m models.weights_cli fetch  NAME ... | --all [--weights-dir DIR] [--manifest FILE]

``list`` shows name, path and whether the file is present (no hashing); ``check`` hashes each
present file and compares it with the manifest's digests. ``fetch`` downloads into the weights
folder through a temporary file in the same folder, checks the digests, and only then renames it
into place (a failed or corrupt download leaves nothing under the final name).

Exit status: 0 all good (``check``: every named/known file present and right; missing files are
reported but only an error when named explicitly); 2 a corrupt file (named with expected and
found digest), an unknown entry name, a bad manifest, or a failed download.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

from models.weights import (
    WeightEntry,
    WeightsManifestError,
    candidate_paths,
    default_weights_dir,
    find_local,
    load_manifest,
    verify_file,
)


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _select(entries: dict[str, WeightEntry], names: list[str]) -> list[WeightEntry]:
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise KeyError(f"unknown weights entry {unknown}; known: {sorted(entries)}")
    return [entries[n] for n in names] if names else list(entries.values())


def cmd_list(entries: dict[str, WeightEntry], weights_dir: Path) -> int:
    rows = []
    for entry in entries.values():
        found = find_local(entry, weights_dir)
        rows.append((entry.name, str(found or candidate_paths(entry, weights_dir)[0]),
                     "present" if found else "missing", entry.used_by))
    print(_table(rows, ("name", "path", "status", "used by")))
    return 0


def cmd_check(entries: dict[str, WeightEntry], weights_dir: Path, names: list[str]) -> int:
    rows, corrupt, missing_named = [], [], []
    for entry in _select(entries, names):
        found = find_local(entry, weights_dir)
        if found is None:
            expected = candidate_paths(entry, weights_dir)[0]
            rows.append((entry.name, "missing", f"missing, put it at {expected} ({entry.url})"))
            if names:
                missing_named.append(entry.name)
            continue
        problem = verify_file(entry, found)
        if problem:
            rows.append((entry.name, "CORRUPT", f"{found}: {problem}"))
            corrupt.append(f"{found} ({entry.name}): {problem}")
        else:
            rows.append((entry.name, "ok", f"{found} ({entry.digest_text()})"))
    print(_table(rows, ("name", "status", "detail")))
    for line in corrupt:
        print(f"error: corrupt weights file {line}; delete it and fetch it again", file=sys.stderr)
    for name in missing_named:
        print(f"error: {name} is missing", file=sys.stderr)
    return 2 if corrupt or missing_named else 0


def _download(url: str, handle, quiet: bool) -> None:
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (https URLs from the manifest)
        total = int(response.headers.get("Content-Length") or 0)
        done, last = 0, -1
        while block := response.read(1 << 20):
            handle.write(block)
            done += len(block)
            percent = int(100 * done / total) if total else -1
            if not quiet and percent != last:
                print(f"\r  {done / 2**20:8.1f} MiB" + (f" {percent:3d}%" if total else ""), end="", file=sys.stderr)
                last = percent
    if not quiet:
        print(file=sys.stderr)


def fetch_entry(entry: WeightEntry, weights_dir: Path, quiet: bool = False) -> Path:
    """Download ``entry`` into ``weights_dir`` atomically and check its digests.

    Returns:
        The final path. An already present, correct file is kept (nothing downloaded).

    Raises:
        RuntimeError: the download failed or the bytes do not match the manifest (the
            temporary file is removed; nothing is left under the final name).
    """
    target = weights_dir / entry.file
    if target.is_file() and verify_file(entry, target) is None:
        print(f"{entry.name}: {target} already present and correct", file=sys.stderr)
        return target
    if not entry.url.startswith("https://"):
        raise RuntimeError(f"{entry.name}: field url must be an https:// URL, got {entry.url!r}")
    weights_dir.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_name = tempfile.mkstemp(prefix=f".{entry.file}.", suffix=".part", dir=weights_dir)
    tmp = Path(tmp_name)
    try:
        print(f"{entry.name}: downloading {entry.url}", file=sys.stderr)
        with os.fdopen(descriptor, "wb") as handle:
            _download(entry.url, handle, quiet)
        problem = verify_file(entry, tmp)
        if problem:
            raise RuntimeError(f"{entry.name}: downloaded bytes from {entry.url} do not match the manifest ({problem})")
        os.replace(tmp, target)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError):
            raise
        raise RuntimeError(f"{entry.name}: download of {entry.url} failed ({type(exc).__name__}: {exc})") from exc
    print(f"{entry.name}: saved {target}", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.weights_cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("list", "check", "fetch"))
    parser.add_argument("names", nargs="*", help="manifest entry names (default: all, for list/check)")
    parser.add_argument("--all", action="store_true", help="fetch: every entry")
    parser.add_argument("--weights-dir", default=None,
                        help="weights folder (default $MEDMARK_WEIGHTS_DIR, else ./weights, as paths.weights_dir)")
    parser.add_argument("--manifest", default=None, help="manifest file (default configs/weights.yaml)")
    parser.add_argument("--quiet", action="store_true", help="fetch: no progress line")
    args = parser.parse_args(argv)
    try:
        entries = load_manifest(args.manifest)
    except WeightsManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    weights_dir = Path(os.path.expanduser(args.weights_dir)) if args.weights_dir else default_weights_dir()
    try:
        if args.command == "list":
            return cmd_list(entries, weights_dir)
        if args.command == "check":
            return cmd_check(entries, weights_dir, args.names)
        if not args.names and not args.all:
            print("error: fetch needs entry names or --all (nothing is downloaded unless asked)", file=sys.stderr)
            return 2
        for entry in _select(entries, [] if args.all else args.names):
            fetch_entry(entry, weights_dir, args.quiet)
        return 0
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
