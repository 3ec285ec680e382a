"""How a decoder LM is cut for split learning and run in pieces (FL-GLM, FedSEA-LLaMA).

A decoder with ``L`` blocks is cut at ``split.head-layers`` (k) and ``split.tail-layers`` (m):

* the **silo** keeps the embeddings (and any learned positions) + blocks ``[0, k)`` (head) and
  blocks ``[L-m, L)`` + the final norm + the LM head (tail);
* the **server** keeps blocks ``[k, L-m)`` (middle) and never the embeddings nor the LM head.

:class:`Arch` finds the pieces in the model itself (no per-family table): the decoder's
``ModuleList`` of ``num_hidden_layers`` blocks, the module that owns it (the backbone), the
embedding, the LM head. :func:`run_blocks` runs a range of blocks *through the model's own
forward*: the backbone builds its masks (causal, sliding window, per-layer types), position
embeddings (rotary, per-layer rotary, learned, ALiBi) and embedding scaling exactly as it does
unsplit, the blocks outside the range are skipped, the input of the first block in the range is
replaced by the hidden states that arrived, and the run stops after the last block. So a split
forward is the unsplit forward, cut in three, for every family ``transformers`` ships in that
shape. The silo's part is :mod:`.silo_model`, the server's :mod:`.middle`, what crosses between
them :mod:`.packing`.
"""

from __future__ import annotations

import contextvars
import gc
import hashlib
import inspect
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

# While a split run is inside the model's forward, a module this party does not hold returns a
# zero scalar instead of raising: the model computes e.g. learned positions before its first
# block, and :func:`run_blocks` discards whatever reaches a block before its range.
_IN_SPLIT_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("split_run", default=False)


class SplitError(RuntimeError):
    """The model cannot be split as configured, or a split step failed; says what to change."""


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


@dataclass
class Arch:
    """Where the pieces of a decoder-only causal LM live, found from the model itself.

    Attributes
    ----------
    config : the (text) config
    model_type : str
    backbone : nn.Module
        The module whose forward embeds, runs the blocks and applies the final norm.
    layers : nn.ModuleList
        The decoder blocks (``config.num_hidden_layers`` of them).
    layers_attr : str
        The attribute of ``backbone`` that holds ``layers``.
    causal_lm : nn.Module
        The ``...ForCausalLM`` model (LM head, logit scaling, loss).
    layer_types : list of str
        ``config.layer_types`` or ``full_attention`` per block (informative).
    cache_kwarg : str
        How the backbone's forward names its KV cache (``cache`` or ``past_key_values``).
    """

    config: Any
    model_type: str
    backbone: nn.Module
    layers: nn.ModuleList
    layers_attr: str
    causal_lm: nn.Module
    layer_types: list[str]
    cache_kwarg: str = "cache"

    @classmethod
    def of(cls, model: nn.Module) -> Arch:
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = _text_config(hf.config)
        mt = getattr(hf.config, "model_type", type(hf).__name__)
        looked = (
            "a decoder-only causal LM: a ModuleList of config.num_hidden_layers decoder blocks, "
            "input embeddings and an LM head"
        )
        if getattr(hf.config, "is_encoder_decoder", False):
            raise SplitError(
                f"split mode needs {looked}; model_type '{mt}' is an encoder-decoder model; "
                "choose a decoder-only model.name or another strategy"
            )
        n = getattr(config, "num_hidden_layers", None)
        found = None
        for name, module in hf.named_modules():
            if isinstance(module, nn.ModuleList) and n and len(module) == n and name:
                # the shallowest such list is the decoder's (a vision tower sits deeper or has
                # another length); several at the same depth means a multimodal stack
                depth = name.count(".")
                if found is None or depth < found[0]:
                    found = (depth, name, module)
                elif depth == found[0]:
                    found = (depth, None, None)
        if found is None or found[1] is None:
            what = "no" if found is None else "more than one"
            raise SplitError(
                f"split mode needs {looked}; model_type '{mt}' has {what} ModuleList of "
                f"num_hidden_layers={n} blocks (multimodal or unusual layout); choose a "
                "decoder-only model.name or another strategy"
            )
        _, name, layers = found
        parent_name, _, attr = name.rpartition(".")
        backbone = hf.get_submodule(parent_name) if parent_name else hf
        if backbone is hf or hf.get_output_embeddings() is None:
            raise SplitError(
                f"split mode needs {looked}; model_type '{mt}' has no LM head "
                "(get_output_embeddings) or no backbone module above its blocks; choose a "
                "...ForCausalLM model or another strategy"
            )
        if hf.get_input_embeddings() is None:
            raise SplitError(f"split mode needs {looked}; model_type '{mt}' has no input embeddings")
        params = inspect.signature(type(backbone).forward).parameters
        if "inputs_embeds" not in params:
            raise SplitError(
                f"split mode needs {looked}; the forward of {type(backbone).__name__} takes no "
                "inputs_embeds, so the server cannot feed it hidden states"
            )
        cache_kwarg = "cache" if "cache" in params else "past_key_values"
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        return cls(config, mt, backbone, layers, attr, hf, types, cache_kwarg)

    def silo_only_modules(self) -> list[str]:
        """Attributes of the backbone that hold weights and are not the blocks: embeddings,
        learned positions, the final norm (the server never holds them)."""
        return [
            name
            for name, m in self.backbone.named_children()
            if m is not self.layers and any(True for _ in m.parameters())
        ]


class Absent(nn.Module):
    """Stands in for a module this party does not hold; calling it is a clear error."""

    def __init__(self, what: str, party: str):
        super().__init__()
        self.what, self.party = what, party

    def forward(self, *args, **kwargs):
        if _IN_SPLIT_RUN.get():
            return torch.zeros(())
        raise SplitError(f"the {self.party} does not hold {self.what} in split mode")


class _Skip(nn.Module):
    """A block outside the range being run: passes its input on untouched.

    Returns a 1-tuple, which works both for forwards that take ``block(...)[0]`` (Falcon, Bloom)
    and for those that keep the return value (its content is replaced at the range's start).
    """

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,)


class _Stop(Exception):
    def __init__(self, output):
        super().__init__("split run stopped after its last block")
        self.output = output


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def new_kv_cache(config):
    """A KV cache whose length queries go to a block this party runs.

    The model asks the cache for its length at layer 0 (or its first full-attention layer) to
    build masks and positions; on the server layer 0 is never written. :func:`run_blocks` sets
    ``held`` to the blocks being run and such queries are answered by the first held block of the
    same kind (sliding or full).
    """
    from transformers import DynamicCache

    class _PartyCache(DynamicCache):
        held: range | None = None

        def _map(self, layer_idx: int) -> int:
            held = self.held
            if held is None or layer_idx in held or not len(held):
                return layer_idx
            sliding = getattr(self, "is_sliding", None)
            if sliding is not None and layer_idx < len(sliding):
                for j in held:
                    if j < len(sliding) and sliding[j] == sliding[layer_idx]:
                        return j
            return held.start

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(self._map(layer_idx))

        def get_mask_sizes(self, query_length, layer_idx):
            return super().get_mask_sizes(query_length, self._map(layer_idx))

        def get_query_offset(self, layer_idx: int = 0):
            return super().get_query_offset(self._map(layer_idx))

    return _PartyCache(config=config)


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


def _run(
    arch: Arch,
    module: nn.Module,
    indices: range,
    h: torch.Tensor | None,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache,
    input_ids: torch.Tensor | None = None,
):
    """Call ``module`` (the backbone or the causal LM) with only blocks ``indices`` live.

    With ``h``, the first block of the range takes ``h`` as its input; the run stops after the
    last block unless that is the model's last (then ``module``'s output is returned whole).
    """
    n = len(arch.layers)
    live = nn.ModuleList(
        [arch.layers[i] if i in indices else _Skip() for i in range(n)]
    )
    hooks = []
    if h is not None:
        def substitute(_mod, args, kwargs):
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        hooks.append(
            arch.layers[indices.start].register_forward_pre_hook(substitute, with_kwargs=True)
        )
    stop = indices.stop < n
    if stop:
        def finish(_mod, _args, out):
            raise _Stop(_first(out))

        hooks.append(arch.layers[indices.stop - 1].register_forward_hook(finish))
    if cache is not None and hasattr(cache, "held"):
        cache.held = indices
    kwargs = {
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        arch.cache_kwarg: cache,
        "use_cache": cache is not None,
        "return_dict": True,
    }
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    else:
        kwargs["inputs_embeds"] = h
    original = getattr(arch.backbone, arch.layers_attr)
    token = _IN_SPLIT_RUN.set(True)
    try:
        setattr(arch.backbone, arch.layers_attr, live)
        out = module(**kwargs)
    except _Stop as s:
        return s.output
    finally:
        _IN_SPLIT_RUN.reset(token)
        setattr(arch.backbone, arch.layers_attr, original)
        for hk in hooks:
            hk.remove()
        if cache is not None and hasattr(cache, "held"):
            cache.held = None
    if stop:
        raise SplitError(f"the model's forward did not reach block {indices.stop - 1}")
    return out


def run_blocks(
    arch: Arch,
    indices: range,
    h: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache=None,
) -> torch.Tensor:
    """Run decoder blocks ``indices`` of ``arch`` on padded ``h`` with the model's own masks,
    position embeddings and per-layer attention kinds (through the backbone's forward)."""
    return _run(arch, arch.backbone, indices, h, attention_mask, position_ids, cache)


def run_head(
    arch: Arch,
    indices: range,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache=None,
) -> torch.Tensor:
    """Embeddings (scaled, with learned positions where the model has them) + blocks
    ``indices`` (which must start at 0), exactly as the backbone's forward computes them."""
    return _run(arch, arch.backbone, indices, None, attention_mask, position_ids, cache, input_ids)


def run_tail(
    arch: Arch,
    indices: range,
    h: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache=None,
) -> torch.Tensor:
    """Blocks ``indices`` (ending at the last) + final norm + LM head + the model's own logit
    scaling or soft-capping: logits ``[B, T, V]``."""
    out = _run(arch, arch.causal_lm, indices, h, attention_mask, position_ids, cache)
    return out.logits


def embed(arch: Arch, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings alone (no scaling, no positions); :func:`run_head` does both."""
    return arch.causal_lm.get_input_embeddings()(input_ids)


def strip_parts(arch: Arch, layout: SplitLayout, keep: str) -> None:
    """Replace the modules the ``keep`` party must not hold by :class:`Absent` and free them."""
    if keep == "silo":
        for i in layout.middle:
            arch.layers[i] = Absent(f"middle block {i}", "silo")
    else:
        for i in (*layout.head, *layout.tail):
            arch.layers[i] = Absent(f"block {i}", "server")
        emb = arch.causal_lm.get_input_embeddings()
        for name in arch.silo_only_modules():
            what = ("the embeddings" if getattr(arch.backbone, name) is emb
                    else f"the backbone's '{name}'")
            setattr(arch.backbone, name, Absent(what, "server"))
        lm = arch.causal_lm
        head_name = next(
            (n for n, m in lm.named_children() if m is lm.get_output_embeddings()), None
        )
        if head_name is not None:
            setattr(lm, head_name, Absent("the LM head", "server"))
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
