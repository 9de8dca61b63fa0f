"""Every repository path that README.md and docs/**/*.md cite exists.

Checked: words in inline code and fenced code blocks that start with a top-level entry of the
repository (``configs/…``, ``models/safe_reader.py``, ``tests/test_dicom.py::test_name``, ``train.py``),
and markdown links/images to local files (relative to the document, ``#anchor`` dropped).
Not checked: run outputs (``<run>/…``, ``logs/…``, ``outputs/…``: their first component is in
``RUN_OUTPUT``, or not a repository entry at all), placeholders (``<name>``, ``*``, ``{stem}``,
``$VAR``, ``…``). Checkpoint names are checked against the real naming of
``configs/callbacks/default.yaml`` (``last.ckpt``, ``best-epochNNN.ckpt``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# top-level folders that runs, caches and installs create: cited as outputs, never checked
RUN_OUTPUT = {"logs", "outputs", "runs", "data", "weights", "multirun", "wandb", "medmark.egg-info"}
REPO_ENTRIES = {p.name for p in ROOT.iterdir()
                if not p.name.startswith((".", "__")) and p.name not in RUN_OUTPUT}
PLACEHOLDER = re.compile(r"[<>*{}$…|\[\]]|\.\.\.|NNN")
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
WORD_SPLIT = re.compile(r"[\s=,;()\"']+")
CHECKPOINT = re.compile(r"checkpoints/([^/\s`]+\.ckpt)")
CHECKPOINT_NAMES = re.compile(r"last\.ckpt|best-epoch(\d{3}|NNN)\.ckpt|best-\*\.ckpt")


def code_words(text: str) -> list[str]:
    """Words of the inline code spans and fenced blocks of one markdown text."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    spans = INLINE_CODE.findall(prose)
    return [w for chunk in [*blocks, *spans] for w in WORD_SPLIT.split(chunk) if w]


def cited_paths(text: str) -> list[str]:
    """Repository-relative paths among the code words (``::test`` kept, trailing punctuation dropped)."""
    paths = []
    for word in code_words(text):
        word = word.rstrip(".:,`").removeprefix("./")
        if PLACEHOLDER.search(word) or "://" in word:
            continue
        head = word.split("/", 1)[0].split("::", 1)[0]
        if head in REPO_ENTRIES:
            paths.append(word)
    return paths


def missing(doc: Path) -> list[str]:
    """What ``doc`` cites that is not in the repository, one line each."""
    text = doc.read_text(encoding="utf-8")
    problems = []
    for cited in sorted(set(cited_paths(text))):
        file, _, test = cited.partition("::")
        target = ROOT / file
        if not target.exists():
            problems.append(f"{cited}: no such path")
        elif test and not re.search(rf"^def {re.escape(test.split('[')[0])}\(", target.read_text(), re.M):
            problems.append(f"{cited}: no test of that name")
    for link in LINK.findall(text):
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        target = (doc.parent / link.split("#", 1)[0]).resolve()
        if not target.exists():
            problems.append(f"link {link}: no such file")
    for name in CHECKPOINT.findall(text):
        if not (CHECKPOINT_NAMES.fullmatch(name) or PLACEHOLDER.search(name)):
            problems.append(f"checkpoints/{name}: runs write last.ckpt and best-epochNNN.ckpt")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_every_cited_path_exists(doc):
    assert missing(doc) == []


def test_the_check_catches_a_missing_path_a_bad_link_and_a_wrong_checkpoint_name(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("See `models/safe_reader.py` and `models/no_such.py`, `<run>/owner/secret.json`,\n"
                   "`logs/x/y.txt`, [gone](gone.md), [web](https://example.org), `configs/data/<name>.yaml`,\n"
                   "```bash\npython benchmarks/nothing_here.py --x 1\npython -m pytest tests/test_dicom.py::no_test\n```\n"
                   "resume with `ckpt_path=<run>/checkpoints/best.ckpt` or `checkpoints/best-epoch007.ckpt`.\n")
    assert missing(doc) == [
        "benchmarks/nothing_here.py: no such path",
        "models/no_such.py: no such path",
        "tests/test_dicom.py::no_test: no test of that name",
        "link gone.md: no such file",
        "checkpoints/best.ckpt: runs write last.ckpt and best-epochNNN.ckpt",
    ]
