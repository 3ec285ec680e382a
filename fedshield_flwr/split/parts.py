"""Silo parts package for ``split``: the only form in which a silo receives the model.

In ``split`` the owner keeps the middle blocks on the server. What a silo needs (the embeddings,
its head and tail blocks, the final norm, the LM head, their buffers, the tokenizer and the
seeded initial LoRA of those parts) travels as one *parts package*: plain fp32 numpy arrays and
a JSON manifest (config, cut, tensor list) identified by a SHA-256 content hash, exactly like
``lpp``'s quantized base (:mod:`.quantize`: same hashing, validation, ``safetensors`` disk cache,
no pickle). The middle blocks are never in it: a silo instantiates the architecture on the
``meta`` device, replaces the middle blocks by stand-ins that refuse to run, and allocates and
fills only its own parts (:func:`silo_from_parts`). The initial adapter travels too, so a silo
starts from the LoRA initialization of the unsplit model (the one split-vs-unsplit exactness is
measured against), which it could not recompute without the middle blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedshield_flwr.packages.format import (
    PackageError,
    canonical_json,
    check_array_index,
    compute_content_hash,
    verified_arrays,
)
from fedshield_flwr.packages.model import (
    config_dict,
    config_from_manifest,
    to_numpy,
    tokenizer_files,
)
from fedshield_flwr.split.arch import Absent, Arch, SplitLayout
from fedshield_flwr.split.silo_model import SplitSilo

PARTS_FORMAT = "fedshield-split-parts"
PARTS_VERSION = 1
PARTS_KIND = "split-parts"  # cache directory name (``<cache>/split-parts/<hash>``)
PARAM, BUFFER, ADAPTER = "param:", "buffer:", "adapter:"


@dataclass(frozen=True)
class SiloPartsPackage:
    """A silo's parts of a split model as they travel: JSON manifest + arrays + content hash."""

    manifest: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    content_hash: str

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values())) + len(canonical_json(self.manifest))

    @property
    def layout(self) -> SplitLayout:
        return SplitLayout(**self.manifest["layout"])

    def adapter(self) -> OrderedDict[str, np.ndarray]:
        """The seeded initial head + tail LoRA (PEFT names, fp32)."""
        return OrderedDict((name, np.array(self.arrays[ADAPTER + name]))
                           for name in self.manifest["adapter"])


def _middle_prefixes(model: nn.Module, layout: SplitLayout) -> tuple[str, ...]:
    arch = Arch.of(model)
    prefix = next((n for n, m in model.named_modules() if m is arch.layers), None)
    if prefix is None:
        raise PackageError("could not locate the decoder blocks of the model")
    return tuple(f"{prefix}.{i}." for i in layout.middle)


def build_parts_package(
    model: nn.Module,
    layout: SplitLayout,
    tokenizer=None,
    adapter: Mapping[str, np.ndarray] | None = None,
    source: str = "",
) -> SiloPartsPackage:
    """Package what a silo holds of ``model`` (server side).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The full base model, without LoRA (tied weights travel once).
    layout : SplitLayout
        Where to cut; the blocks of ``layout.middle`` are left out.
    tokenizer : optional
        Its JSON/text files travel in the package.
    adapter : mapping, optional
        The initial head + tail LoRA (from the seeded unsplit LoRA model).
    source : str
        The model's name on the server (``model.name``); silos record it in exported adapters.
    """
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise PackageError("build_parts_package takes the base model, before apply_lora")
    middle = _middle_prefixes(model, layout)

    def held(name: str) -> bool:
        return not name.startswith(middle)

    arrays: dict[str, np.ndarray] = {}
    params: dict[str, list[int]] = {}
    for name, p in model.named_parameters():  # a tied parameter is listed once
        if held(name):
            arrays[PARAM + name] = to_numpy(p.to(torch.float32))
            params[name] = list(p.shape)
    persistent = set(model.state_dict())
    buffers: dict[str, dict] = {}
    for name, b in model.named_buffers():
        if held(name):
            value = b.detach().to(torch.float32) if b.is_floating_point() else b.detach()
            arrays[BUFFER + name] = to_numpy(value)
            buffers[name] = {"persistent": name in persistent}
    for name, value in (adapter or {}).items():
        arrays[ADAPTER + name] = np.ascontiguousarray(value, dtype=np.float32)
    tok_files = tokenizer_files(tokenizer) if tokenizer is not None else {}
    for fname, data in tok_files.items():
        arrays[f"tokenizer:{fname}"] = data
    config = config_dict(model.config)
    config["use_cache"] = bool(getattr(model.config, "use_cache", True))
    manifest = {
        "format": PARTS_FORMAT,
        "version": PARTS_VERSION,
        "model_type": model.config.model_type,
        "source": source,
        "config": config,
        "layout": asdict(layout),
        "params": params,
        "buffers": buffers,
        "adapter": sorted(adapter or {}),
        "tokenizer_files": sorted(tok_files),
        "num_params_full": int(sum(p.numel() for p in model.parameters())),
        "array_index": {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                        for k, v in arrays.items()},
    }
    arrays = OrderedDict((k, arrays[k]) for k in sorted(arrays))
    return SiloPartsPackage(manifest, arrays, compute_content_hash(manifest, arrays))


def parts_from_arrays(
    arrays: Mapping[str, np.ndarray], expected_hash: str | None = None, who: str = "server"
) -> SiloPartsPackage:
    """Validate and rebuild a parts package received as arrays (silo side).

    Raises :class:`PackageError` naming ``who`` on a missing or malformed manifest, arrays that
    differ from it, a non-float tensor, or a hash other than ``expected_hash``.
    """
    return SiloPartsPackage(*verified_arrays(arrays, expected_hash, who, _validate_parts))


def _validate_parts(manifest: Any, body: Mapping[str, np.ndarray], who: str) -> None:
    def fail(msg: str) -> None:
        raise PackageError(f"parts package from {who}: {msg}; the server must rebuild and "
                           "resend it")

    if not isinstance(manifest, dict) or manifest.get("format") != PARTS_FORMAT:
        fail(f"not a {PARTS_FORMAT} manifest")
    if manifest.get("version") != PARTS_VERSION:
        fail(f"version {manifest.get('version')!r}, this silo reads {PARTS_VERSION}")
    for key in ("model_type", "config", "layout", "params", "buffers", "adapter", "array_index"):
        if key not in manifest:
            fail(f"manifest lacks '{key}'")
    check_array_index(manifest, body, fail)
    SplitLayout(**manifest["layout"])
    for name, shape in manifest["params"].items():
        arr = body.get(PARAM + name)
        if arr is None or arr.dtype != np.float32 or list(arr.shape) != shape:
            fail(f"parameter '{name}' does not match its array")
    for name in manifest["buffers"]:
        if BUFFER + name not in body:
            fail(f"buffer '{name}' is missing")
    for name in manifest["adapter"]:
        arr = body.get(ADAPTER + name)
        if arr is None or arr.dtype != np.float32:
            fail(f"adapter tensor '{name}' is missing or not float32")


def model_from_parts(pkg: SiloPartsPackage) -> nn.Module:
    """The silo's frozen base (middle blocks absent) rebuilt from the package alone.

    The architecture is built on the ``meta`` device (no weight allocated), the middle blocks
    are replaced by stand-ins that raise if called, and only then is memory allocated and
    filled from the package. Only architectures that transformers ships; no remote code.
    """
    from transformers import AutoModelForCausalLM

    manifest = pkg.manifest
    config, model_type = config_from_manifest(pkg)
    layout = pkg.layout
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = Arch.of(model)
    if len(arch.layers) != layout.num_layers:
        raise PackageError(f"parts package {pkg.content_hash[:12]} cuts {layout.num_layers} "
                           f"blocks, its config builds {len(arch.layers)}")
    for i in layout.middle:
        arch.layers[i] = Absent(f"middle block {i}", "silo")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, shape in manifest["params"].items():
            try:
                param = model.get_parameter(name)
            except AttributeError as exc:
                raise PackageError(f"parts package tensor '{name}' has no place in a '{model_type}'"
                                   " model here; server and silo transformers differ") from exc
            if list(param.shape) != shape:
                raise PackageError(f"parts package tensor '{name}' is {shape}, the model "
                                   f"expects {list(param.shape)}")
            param.copy_(torch.from_numpy(pkg.arrays[PARAM + name]))
        for name, info in manifest["buffers"].items():
            parent, _, attr = name.rpartition(".")
            value = torch.from_numpy(np.array(pkg.arrays[BUFFER + name]))
            model.get_submodule(parent).register_buffer(attr, value,
                                                        persistent=info["persistent"])
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    held = set(manifest["params"])
    missing = [n for n, _ in model.named_parameters() if n not in held]
    if missing:
        raise PackageError(f"parts package {pkg.content_hash[:12]} leaves {len(missing)} "
                           f"parameters unfilled ({missing[:3]}); server and silo transformers "
                           "versions differ")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def silo_from_parts(pkg: SiloPartsPackage, lora, seed: int = 0) -> SplitSilo:
    """The silo's trainable :class:`SplitSilo` from the package: base parts + LoRA at the
    package's initial values (``lora`` must be the LoRA settings the server used)."""
    from fedshield_flwr.models.lora import AdapterMismatchError, apply_lora, set_adapter_state

    peft_model = apply_lora(model_from_parts(pkg), lora, seed=seed)
    layout = SplitLayout.for_model(peft_model, pkg.layout.head_layers, pkg.layout.tail_layers)
    if layout != pkg.layout:
        raise PackageError(f"parts package {pkg.content_hash[:12]} was cut as "
                           f"{pkg.layout.fingerprint()}, its config gives {layout.fingerprint()}")
    silo = SplitSilo(peft_model, layout)
    if pkg.manifest["adapter"]:
        try:
            set_adapter_state(peft_model, pkg.adapter())
        except AdapterMismatchError as exc:
            raise PackageError(f"{exc} (the initial adapter of parts package "
                               f"{pkg.content_hash[:12]} does not fit this silo's LoRA: "
                               "model.lora settings differ between server and silo)") from exc
    return silo
