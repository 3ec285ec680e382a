"""A silo's tokenized rows (:class:`SiloData`) and their on-disk cache.

In deployment Flower starts a fresh ClientApp process for every message, so without a cache each
train and evaluate message would import ``datasets``, re-read, re-partition and re-tokenize the
silo's data (seconds per message, see ``benchmarks/deploy.py``). The rows are cached as plain JSON
under ``<cache>/silo-data/<key>.json``; the key covers everything the rows depend on: the data
settings, the node's partition or ``data-path`` (with the file's size and modification time), the
seed, the tokenizer files and the source of the code that builds the rows. A stale or corrupt
entry is rebuilt, never trusted: the cache is a local file of the silo, JSON only (no pickle), and
validated on load.

This module imports neither ``datasets`` nor ``torch``: a cache hit costs a JSON read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fedshield_flwr.config import DataSettings, NodeSettings

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# The code that turns a data source into rows; a change to any of these invalidates the cache.
_CODE_FILES = ("load.py", "partition.py", "templates.py", "embedded.py", "silo_cache.py")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                    "chat_template.json", "added_tokens.json")


@dataclass
class SiloData:
    """Tokenized rows (``input_ids``/``labels`` lists) of one silo."""

    train: list[dict]
    eval: list[dict]
    source: str


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _path_fingerprint(path: str) -> str:
    """Size and mtime of a local file, or of every file below a directory ('' if not local)."""
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if p.is_dir():
        entries = sorted(
            f"{f.relative_to(p)}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
            for f in p.rglob("*") if f.is_file()
        )
        return f"{p.resolve()}|" + "|".join(entries)
    return ""


def _source_fingerprint(data: DataSettings, node: NodeSettings) -> str:
    if node.data_path:
        return "node:" + _path_fingerprint(node.data_path)
    if data.name.startswith("embedded:"):
        try:
            return data.name + ":" + importlib.metadata.version("chatterbot-corpus")
        except importlib.metadata.PackageNotFoundError:
            return data.name
    # A local file or save_to_disk directory; a hub name is keyed by its name alone.
    return data.name + ":" + _path_fingerprint(data.name)


def tokenizer_fingerprint(tokenizer, model_path: str) -> str:
    """Digest of the tokenizer files in ``model_path`` (or of the tokenizer's identity)."""
    d = Path(model_path)
    if d.is_dir():
        files = [d / n for n in _TOKENIZER_FILES if (d / n).is_file()]
        if files:
            return _sha(*(f.name.encode() + f.read_bytes() for f in files))
    template = getattr(tokenizer, "chat_template", None) or ""
    ident = f"{getattr(tokenizer, 'name_or_path', model_path)}:{len(tokenizer)}:{template}"
    return _sha(ident.encode())


def silo_data_key(data: DataSettings, node: NodeSettings, seed: int, tokenizer_digest: str) -> str:
    """Cache key of a silo's rows: a digest of everything they depend on."""
    here = Path(__file__).resolve().parent
    code = _sha(*((here / f).read_bytes() for f in _CODE_FILES if (here / f).exists()))
    doc = {
        "format": CACHE_FORMAT, "code": code, "data": asdict(data), "seed": seed,
        "partition": [node.partition_id, node.num_partitions], "data_path": node.data_path,
        "source": _source_fingerprint(data, node), "tokenizer": tokenizer_digest,
    }
    return _sha(json.dumps(doc, sort_keys=True, default=str).encode())[:32]


def _valid_rows(rows) -> bool:
    if not isinstance(rows, list):
        return False
    for r in rows:
        if not isinstance(r, dict):
            return False
        ids, labels = r.get("input_ids"), r.get("labels")
        if not (isinstance(ids, list) and isinstance(labels, list) and len(ids) == len(labels)
                and ids and all(type(t) is int for t in ids)
                and all(type(t) is int for t in labels)):
            return False
    return True


def read_cached(path: Path, key: str) -> SiloData | None:
    """The cached rows at ``path`` if present, of this ``key`` and well-formed; else ``None``."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("silo data cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if (not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or doc.get("key") != key
            or not _valid_rows(doc.get("train")) or not _valid_rows(doc.get("eval"))
            or not isinstance(doc.get("source"), str)):
        log.warning("silo data cache %s does not match its key or is malformed; rebuilding it",
                    path)
        return None
    return SiloData(doc["train"], doc["eval"], doc["source"])


def write_cached(path: Path, key: str, silo: SiloData) -> None:
    """Write ``silo`` atomically (a concurrent reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    doc = {"format": CACHE_FORMAT, "key": key, "source": silo.source,
           "train": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in silo.train],
           "eval": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in silo.eval]}
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)


def cached_silo_data(
    data: DataSettings,
    node: NodeSettings,
    tokenizer,
    seed: int,
    model_path: str,
    cache_dir: str | os.PathLike | None,
    build: Callable[[], SiloData],
) -> SiloData:
    """The silo's rows from ``cache_dir`` when cached, else ``build()`` them and cache them.

    Parameters
    ----------
    data, node, seed
        What the rows are built from (part of the key).
    tokenizer, model_path
        The tokenizer the rows were tokenized with (its files are part of the key).
    cache_dir : path or None
        Directory of the cache files; ``None`` disables the cache.
    build : callable
        Builds the rows on a miss (imports ``datasets`` only then).
    """
    if cache_dir is None:
        return build()
    key = silo_data_key(data, node, seed, tokenizer_fingerprint(tokenizer, model_path))
    path = Path(cache_dir) / f"{key}.json"
    hit = read_cached(path, key)
    if hit is not None:
        return hit
    silo = build()
    try:
        write_cached(path, key, silo)
    except OSError as exc:  # a read-only cache must not stop training
        log.warning("cannot write the silo data cache %s (%s); continuing without it", path, exc)
    return silo
