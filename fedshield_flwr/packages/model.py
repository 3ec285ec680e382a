"""What every model package carries, whatever its kind: the model config, tokenizer files, arrays.

lpp's quantized base and split's silo parts both ship the model's config (JSON) and its tokenizer
files (``tokenizer:<file>`` uint8 arrays), so that a silo builds its model and tokenizer from the
package alone, with no hub access and no model of its own.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshield_flwr.packages.format import Package, PackageError

TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy().copy()


def config_dict(config) -> dict:
    cfg = json.loads(config.to_json_string(use_diff=False))
    if cfg.get("auto_map"):
        raise PackageError(
            "the base model needs custom code (config.auto_map); lpp rebuilds only architectures "
            "that transformers ships, so silos never run code sent by the server"
        )
    for key in ("quantization_config", "_name_or_path", "auto_map"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    cfg["use_cache"] = False
    return cfg


def tokenizer_files(tokenizer) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file() and path.suffix in TOKENIZER_SUFFIXES:
                out[path.name] = np.frombuffer(path.read_bytes(), dtype=np.uint8).copy()
    return out


def config_from_manifest(pkg) -> tuple[Any, str]:
    """The transformers config a package's manifest describes, and its model type.

    Only architectures that transformers ships: a config asking for remote code is refused,
    so a silo never runs code sent by the server.
    """
    from transformers import AutoConfig

    cfg = dict(pkg.manifest["config"])
    model_type = cfg.pop("model_type", pkg.manifest["model_type"])
    cfg.pop("dtype", None)
    if cfg.get("auto_map") or cfg.get("trust_remote_code"):
        raise PackageError(f"package {pkg.content_hash[:12]} asks for remote code; a silo only "
                           "rebuilds architectures that transformers ships")
    try:
        return AutoConfig.for_model(model_type, **cfg), model_type
    except (KeyError, ValueError) as exc:
        raise PackageError(
            f"model_type '{model_type}' of package {pkg.content_hash[:12]} is unknown to "
            f"transformers here ({exc}); upgrade transformers on this silo"
        ) from exc


def package_tokenizer(pkg: Package):
    """The tokenizer shipped in the package (see ``build_quantized_package(tokenizer=...)``).

    Returns ``None`` when the package has no tokenizer files. Only JSON/text/sentencepiece
    files are accepted, never code; the pad token defaults to EOS as in ``load_tokenizer``.
    """
    from transformers import AutoTokenizer

    files = pkg.manifest.get("tokenizer_files") or []
    if not files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for fname in files:
            if Path(fname).name != fname or Path(fname).suffix not in TOKENIZER_SUFFIXES:
                raise PackageError(f"package tokenizer file '{fname}' is not allowed")
            (Path(tmp) / fname).write_bytes(pkg.arrays[f"tokenizer:{fname}"].tobytes())
        tok = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
