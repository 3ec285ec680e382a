"""How a decoder LM is cut for split learning and run in pieces (FL-GLM, FedSEA-LLaMA).

A decoder with ``L`` blocks is cut at ``split.head-layers`` (k) and ``split.tail-layers`` (m):

* the **silo** keeps the embeddings (and GPT-2's learned positions) + blocks ``[0, k)`` (head) and
  blocks ``[L-m, L)`` + the final norm + the LM head (tail);
* the **server** keeps blocks ``[k, L-m)`` (middle) and never the embeddings nor the LM head.

:class:`Arch` finds the pieces of a supported model; :class:`SplitLayout` says where the cut is;
:func:`run_blocks` runs a range of blocks with the model's own rotary embedding and causal-mask
builders, so a split forward is the unsplit forward, cut in three. The silo's part is
:mod:`.silo_model`, the server's :mod:`.middle`, what crosses between them :mod:`.packing`.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedshield_flwr.config import LoraSettings
from fedshield_flwr.models.lora import (
    AdapterMismatchError,
    apply_lora,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


class SplitError(RuntimeError):
    """The model cannot be split as configured, or a split step failed; says what to change."""


@dataclass
class Arch:
    """Where the pieces of a supported causal LM live (attributes of the HF model)."""

    config: Any
    model_type: str
    backbone: nn.Module  # model.model or model.transformer
    layers: nn.ModuleList
    causal_lm: nn.Module
    layer_types: list[str]

    @classmethod
    def of(cls, model: nn.Module) -> Arch:
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = hf.config
        mt = config.model_type
        if mt not in SUPPORTED_MODEL_TYPES:
            raise SplitError(
                f"split mode does not support model_type '{mt}' yet (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}); choose another model.name or strategy"
            )
        backbone = hf.transformer if mt == "gpt2" else hf.model
        layers = backbone.h if mt == "gpt2" else backbone.layers
        n = config.num_hidden_layers
        if mt == "mistral":
            kind = (
                "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
            )
            types = [kind] * n
        else:
            types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        return cls(config, mt, backbone, layers, hf, types)

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"


class Absent(nn.Module):
    """Stands in for a module this party does not hold; calling it is a clear error."""

    def __init__(self, what: str, party: str):
        super().__init__()
        self.what, self.party = what, party

    def forward(self, *args, **kwargs):
        raise SplitError(f"the {self.party} does not hold {self.what} in split mode")


@dataclass(frozen=True)
class SplitLayout:
    """Which blocks each party runs.

    Parameters
    ----------
    model_type : str
    num_layers : int
    hidden_size : int
    head_layers, tail_layers : int
        k and m: silo blocks ``[0, k)`` and ``[L-m, L)``, server blocks ``[k, L-m)``.
    digest : str
        Short hash of the architecture config, so two parties with different models disagree.
    max_positions : int
        The model's context length.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    head_layers: int
    tail_layers: int
    digest: str = ""
    max_positions: int = 2048

    @classmethod
    def for_model(cls, model: nn.Module, head_layers: int, tail_layers: int) -> SplitLayout:
        arch = Arch.of(model)
        c = arch.config
        n = c.num_hidden_layers
        if head_layers < 1 or tail_layers < 1 or head_layers + tail_layers >= n:
            raise SplitError(
                f"split.head-layers={head_layers} and split.tail-layers={tail_layers} do not fit "
                f"a {n}-block {arch.model_type} model: each must be >= 1 and together < {n} so "
                "that the server holds at least one block; lower them"
            )
        keys = (
            "model_type",
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "n_inner",
        )
        desc = {k: getattr(c, k, None) for k in keys}
        digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]
        max_pos = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 2048)
        return cls(
            arch.model_type, n, c.hidden_size, head_layers, tail_layers, digest, int(max_pos)
        )

    @property
    def head(self) -> range:
        return range(0, self.head_layers)

    @property
    def middle(self) -> range:
        return range(self.head_layers, self.num_layers - self.tail_layers)

    @property
    def tail(self) -> range:
        return range(self.num_layers - self.tail_layers, self.num_layers)

    def fingerprint(self) -> str:
        """Compared by the relay at connection time: both parties must cut the same model."""
        return (
            f"{self.model_type}/L{self.num_layers}/H{self.hidden_size}/head{self.head_layers}"
            f"/tail{self.tail_layers}/{self.digest}"
        )


def run_blocks(
    arch: Arch,
    indices: range,
    h: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache=None,
) -> torch.Tensor:
    """Run decoder blocks ``indices`` of ``arch`` on padded ``h`` with the model's own masks."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    builders = {
        "full_attention": create_causal_mask,
        "sliding_attention": create_sliding_window_causal_mask,
    }
    masks: dict[str, Any] = {}
    for i in indices:
        t = arch.layer_types[i]
        if t not in masks:
            if t not in builders:
                raise SplitError(f"layer type '{t}' of block {i} is not supported in split mode")
            masks[t] = builders[t](
                config=arch.config,
                inputs_embeds=h,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=i,
            )
    use_cache = cache is not None
    if arch.is_gpt2:
        for i in indices:
            h = arch.layers[i](
                h,
                cache,
                masks[arch.layer_types[i]],
                None,
                use_cache=use_cache,
                position_ids=position_ids,
            )
            h = h[0] if isinstance(h, tuple) else h
        return h
    pe = arch.backbone.rotary_emb(h, position_ids)
    for i in indices:
        h = arch.layers[i](
            h,
            attention_mask=masks[arch.layer_types[i]],
            position_embeddings=pe,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache,
        )
        h = h[0] if isinstance(h, tuple) else h
    return h


def embed(arch: Arch, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    if arch.is_gpt2:
        b = arch.backbone
        return b.drop(b.wte(input_ids) + b.wpe(position_ids))
    return arch.backbone.embed_tokens(input_ids)


def new_kv_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def strip_parts(arch: Arch, layout: SplitLayout, keep: str) -> None:
    """Replace the modules the ``keep`` party must not hold by :class:`Absent` and free them."""
    if keep == "silo":
        for i in layout.middle:
            arch.layers[i] = Absent(f"middle block {i}", "silo")
    else:
        for i in (*layout.head, *layout.tail):
            arch.layers[i] = Absent(f"block {i}", "server")
        b = arch.backbone
        if arch.is_gpt2:
            b.wte, b.wpe, b.ln_f = (
                Absent(w, "server")
                for w in ("the embeddings", "the position embeddings", "the final norm")
            )
        else:
            b.embed_tokens = Absent("the embeddings", "server")
            b.norm = Absent("the final norm", "server")
        arch.causal_lm.lm_head = Absent("the LM head", "server")
    gc.collect()


def build_peft(
    model_name: str, lora: LoraSettings, seed: int, quantization: int, cache_dir: str | None
):
    from fedshield_flwr.models.load import load_base_model

    base = load_base_model(model_name, quantization=quantization, cache_dir=cache_dir)
    return apply_lora(base, lora, seed=seed)


def merge_adapter_states(
    silo_state: Mapping[str, np.ndarray], middle_state: Mapping[str, np.ndarray]
):
    """One full-model adapter from the silo (head + tail) and server (middle) adapters.

    The result is what :func:`fedshield_flwr.models.lora.export_adapter` writes as a standard
    PEFT adapter for the unsplit model.
    """
    overlap = sorted(set(silo_state) & set(middle_state))
    if overlap:
        raise AdapterMismatchError(
            f"silo and middle adapters both contain {overlap[:3]}; they must come from the same "
            "split layout (split.head-layers / split.tail-layers)"
        )
    merged = {**silo_state, **middle_state}
    return dict(sorted(merged.items()))
