"""U-shaped split learning of a decoder LM: silo head + tail, server middle (FL-GLM, FedSEA-LLaMA).

A decoder with ``L`` blocks is cut at ``split.head-layers`` (k) and ``split.tail-layers`` (m):

* the **silo** keeps the embeddings (and GPT-2's learned positions) + blocks ``[0, k)`` (head) and
  blocks ``[L-m, L)`` + the final norm + the LM head (tail);
* the **server** keeps blocks ``[k, L-m)`` (middle) and never the embeddings nor the LM head.

LoRA sits on all three parts (the per-architecture targets of :mod:`.lora`): the silo trains its
head/tail adapter (aggregated across silos by the strategy), the server trains the middle adapter
shared by all silos. Every part runs the model's own blocks with the model's own rotary embedding
and causal-mask builders, so a split forward is the unsplit forward, cut in three.

What crosses between parties is *packed*: the real tokens of every sequence back to back plus the
sequence lengths, never padding. Each party re-pads internally (right padding for training, left
padding for generation) and derives positions and masks from the lengths.

One training step of a silo (:meth:`SiloTrainer.train_step`)::

    head forward (silo) -> middle forward (server) -> tail forward + loss + backward (silo)
        -> middle backward + optimizer step (server) -> head backward + optimizer step (silo)

The middle is reached through a :class:`MiddleLink`: :class:`fedshield_flwr.relay.RelayClient`
over gRPC, or :class:`LocalLink` in process (tests, debugging).

Exactness: with noise off, fp32 transfer, no dropout and no gradient clipping, split training
gives the per-step losses of unsplit LoRA training of the same model on the same data and seed.
Gradient clipping is per party (silo: head + tail adapter, server: middle adapter), so it equals the
unsplit global-norm clipping only while clipping is inactive.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, LoraSettings, RunConfig
from .lora import AdapterMismatchError, apply_lora, get_adapter_state, set_adapter_state

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
ACTIVATION_DTYPES = ("fp32", "fp16", "int8")
AGGREGATIONS = ("fedavg", "shield")


class SplitError(RuntimeError):
    """The model cannot be split as configured, or a split step failed; says what to change."""


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class SplitSettings:
    """The ``split.*`` section of the run config.

    Parameters
    ----------
    head_layers : int
        ``split.head-layers``: decoder blocks kept by the silo after the embeddings (>= 1).
    tail_layers : int
        ``split.tail-layers``: decoder blocks kept by the silo before the final norm (>= 1).
    activation_dtype : {"fp32", "fp16", "int8"}
        ``split.activation-dtype``: wire dtype of activations and gradients.
    noise_sigma : float
        ``split.noise-sigma``: std of Gaussian noise added to each head-output token row, relative
        to that row's mean ``|h|`` (FedSEA calibration); 0 disables it.
    batch_window_ms : float
        ``split.batch-window-ms``: how long the server waits after the first silo's forward for
        others to join the batched middle step (ends early once every connected silo has).
    step_timeout_s : float
        ``split.step-timeout-s``: how long the server waits for a silo's gradient (or its
        request) before dropping it from the step.
    max_frame_mb : float
        ``split.max-frame-mb``: largest accepted tensor payload per frame, MiB.
    token_ttl_s : float
        ``split.token-ttl-s``: lifetime of a per-round relay token.
    max_sessions : int
        ``split.max-sessions``: generation sessions (KV caches) a silo may hold on the server.
    relay_port : int
        ``split.relay-port``: port the ServerApp's relay binds (0: any free port).
    relay_bind : str
        ``split.relay-bind``: interface the relay binds.
    relay_host : str
        ``split.relay-host``: host name silos dial (empty: the glue picks, e.g. the SuperLink
        host); sent to silos with the port and their token.
    relay_ca_cert, relay_server_cert, relay_server_key : str
        ``split.relay-*``: PEM paths on the server; all set = TLS (see
        :meth:`server_certificates`). Silos verify with the CA certificate (public; the glue may
        send it in the train message).
    aggregation : {"fedavg", "shield"}
        ``split.aggregation``: how the Flower strategy aggregates the silo-side (head + tail)
        adapters every round.
    """

    head_layers: int = 1
    tail_layers: int = 1
    activation_dtype: str = "fp32"
    noise_sigma: float = 0.0
    batch_window_ms: float = 200.0
    step_timeout_s: float = 300.0
    max_frame_mb: float = 64.0
    token_ttl_s: float = 7200.0
    max_sessions: int = 4
    relay_port: int = 0
    relay_bind: str = "0.0.0.0"
    relay_host: str = ""
    relay_ca_cert: str = ""
    relay_server_cert: str = ""
    relay_server_key: str = ""
    aggregation: str = "fedavg"

    _KEYS = {
        "head-layers": ("head_layers", int),
        "tail-layers": ("tail_layers", int),
        "activation-dtype": ("activation_dtype", str),
        "noise-sigma": ("noise_sigma", float),
        "batch-window-ms": ("batch_window_ms", float),
        "step-timeout-s": ("step_timeout_s", float),
        "max-frame-mb": ("max_frame_mb", float),
        "token-ttl-s": ("token_ttl_s", float),
        "max-sessions": ("max_sessions", int),
        "relay-port": ("relay_port", int),
        "relay-bind": ("relay_bind", str),
        "relay-host": ("relay_host", str),
        "relay-ca-cert": ("relay_ca_cert", str),
        "relay-server-cert": ("relay_server_cert", str),
        "relay-server-key": ("relay_server_key", str),
        "aggregation": ("aggregation", str),
    }

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> SplitSettings:
        """Build from ``cfg.section("split")`` (keys without the ``split.`` prefix)."""
        kwargs: dict[str, Any] = {}
        for key, value in section.items():
            if key not in cls._KEYS:
                raise ConfigError(
                    f"unknown run config key 'split.{key}'; known: "
                    + ", ".join(f"split.{k}" for k in cls._KEYS)
                )
            name, kind = cls._KEYS[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(
                    f"run config key 'split.{key}' must be {kind.__name__}, got {value!r}"
                )
            kwargs[name] = value
        s = cls(**kwargs)
        checks = [
            (s.head_layers >= 1, "head-layers", s.head_layers, ">= 1 (the silo keeps a block)"),
            (s.tail_layers >= 1, "tail-layers", s.tail_layers, ">= 1 (the silo keeps a block)"),
            (
                s.activation_dtype in ACTIVATION_DTYPES,
                "activation-dtype",
                s.activation_dtype,
                f"use one of {', '.join(ACTIVATION_DTYPES)}",
            ),
            (s.noise_sigma >= 0, "noise-sigma", s.noise_sigma, ">= 0"),
            (s.batch_window_ms >= 0, "batch-window-ms", s.batch_window_ms, ">= 0"),
            (s.step_timeout_s > 0, "step-timeout-s", s.step_timeout_s, "> 0"),
            (s.max_frame_mb > 0, "max-frame-mb", s.max_frame_mb, "> 0"),
            (s.token_ttl_s > 0, "token-ttl-s", s.token_ttl_s, "> 0"),
            (s.max_sessions >= 1, "max-sessions", s.max_sessions, ">= 1"),
            (0 <= s.relay_port < 65536, "relay-port", s.relay_port, "0 (any free port) to 65535"),
            (
                s.aggregation in AGGREGATIONS,
                "aggregation",
                s.aggregation,
                f"use one of {', '.join(AGGREGATIONS)}",
            ),
        ]
        for ok, key, value, rule in checks:
            if not ok:
                raise ConfigError(f"run config key 'split.{key}' = {value!r} is invalid: {rule}")
        return s

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> SplitSettings:
        """Build from the ``split.*`` keys of a :class:`RunConfig`."""
        return cls.from_section(cfg.section("split"))

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * 2**20)

    def server_certificates(self) -> tuple[bytes, bytes, bytes] | None:
        """``(ca, cert, key)`` PEM bytes for :meth:`RelayServer.start`, or None (plaintext).

        Read from ``split.relay-ca-cert``, ``split.relay-server-cert``, ``split.relay-server-key``
        (paths on the server); all three or none.
        """
        paths = (self.relay_ca_cert, self.relay_server_cert, self.relay_server_key)
        if not any(paths):
            return None
        if not all(paths):
            raise ConfigError(
                "split.relay-ca-cert, split.relay-server-cert and split.relay-server-key must be "
                "set together (TLS for the relay) or all left empty (plaintext)"
            )
        out = []
        for key, path in zip(("relay-ca-cert", "relay-server-cert", "relay-server-key"), paths):
            try:
                out.append(Path(path).read_bytes())
            except OSError as exc:
                raise ConfigError(f"split.{key} = {path!r} cannot be read: {exc}") from exc
        return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------------
# architecture access


@dataclass
class _Arch:
    """Where the pieces of a supported causal LM live (attributes of the HF model)."""

    config: Any
    model_type: str
    backbone: nn.Module  # model.model or model.transformer
    layers: nn.ModuleList
    causal_lm: nn.Module
    layer_types: list[str]

    @classmethod
    def of(cls, model: nn.Module) -> _Arch:
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


class _Absent(nn.Module):
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
        arch = _Arch.of(model)
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


# --------------------------------------------------------------------------------------------
# packing


def pack(
    x: torch.Tensor, lengths: Sequence[int] | torch.Tensor, left: bool = False
) -> torch.Tensor:
    """Real-token rows of a padded ``[B, T, H]`` tensor, back to back: ``[sum(lengths), H]``."""
    mask = padding_mask(lengths, x.shape[1], left=left, device=x.device).bool()
    return x[mask]


def unpack(
    packed: torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    width: int | None = None,
    left: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[B, width, H]`` with zeros at padding (differentiable)."""
    lens = torch.as_tensor(lengths, dtype=torch.long)
    width = int(lens.max()) if width is None else width
    mask = padding_mask(lens, width, left=left, device=packed.device).bool()
    out = packed.new_zeros(len(lens), width, packed.shape[-1])
    return out.masked_scatter(mask[..., None], packed)


def padding_mask(
    lengths: Sequence[int] | torch.Tensor,
    width: int,
    left: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[B, width]`` long mask with ``lengths[b]`` ones, right- or left-aligned."""
    lens = torch.as_tensor(lengths, dtype=torch.long, device=device)
    ar = torch.arange(width, device=device)[None, :]
    m = ar >= (width - lens[:, None]) if left else ar < lens[:, None]
    return m.long()


def add_relative_noise(
    h: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """FedSEA-style noise: ``h + N(0, (sigma * mean|h_row|)^2)`` per token row of packed ``h``."""
    if sigma <= 0:
        return h
    scale = h.abs().mean(dim=-1, keepdim=True) * sigma
    noise = torch.randn(h.shape, generator=generator, dtype=h.dtype, device=h.device)
    return h + noise * scale


# --------------------------------------------------------------------------------------------
# running blocks


def _run_blocks(
    arch: _Arch,
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


def _embed(arch: _Arch, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    if arch.is_gpt2:
        b = arch.backbone
        return b.drop(b.wte(input_ids) + b.wpe(position_ids))
    return arch.backbone.embed_tokens(input_ids)


def _new_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def _strip(arch: _Arch, layout: SplitLayout, keep: str) -> None:
    """Replace the modules the ``keep`` party must not hold by :class:`_Absent` and free them."""
    if keep == "silo":
        for i in layout.middle:
            arch.layers[i] = _Absent(f"middle block {i}", "silo")
    else:
        for i in (*layout.head, *layout.tail):
            arch.layers[i] = _Absent(f"block {i}", "server")
        b = arch.backbone
        if arch.is_gpt2:
            b.wte, b.wpe, b.ln_f = (
                _Absent(w, "server")
                for w in ("the embeddings", "the position embeddings", "the final norm")
            )
        else:
            b.embed_tokens = _Absent("the embeddings", "server")
            b.norm = _Absent("the final norm", "server")
        arch.causal_lm.lm_head = _Absent("the LM head", "server")
    gc.collect()


def _build_peft(
    model_name: str, lora: LoraSettings, seed: int, quantization: int, cache_dir: str | None
):
    from .load import load_base_model

    base = load_base_model(model_name, quantization=quantization, cache_dir=cache_dir)
    return apply_lora(base, lora, seed=seed)


# --------------------------------------------------------------------------------------------
# the silo side


class SplitSilo:
    """A silo's part of the model: embeddings + head blocks, tail blocks + norm + LM head.

    Parameters
    ----------
    peft_model : peft.PeftModel
        The full LoRA-wrapped model (``apply_lora``); its middle blocks are dropped in place
        unless ``strip=False`` (then they stay, unused: tests compare against them).
    layout : SplitLayout
    strip : bool
        Drop the middle blocks (default; a silo must not hold them).
    """

    def __init__(self, peft_model, layout: SplitLayout, strip: bool = True):
        self.peft_model = peft_model
        self.layout = layout
        self._arch = _Arch.of(peft_model)
        if strip:
            _strip(self._arch, layout, "silo")

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: SplitSettings,
        lora: LoraSettings,
        seed: int = 0,
        quantization: int = 0,
        cache_dir: str | None = None,
    ) -> SplitSilo:
        """Load ``model_name``, add LoRA (seeded) and keep only the silo's parts."""
        peft_model = _build_peft(model_name, lora, seed, quantization, cache_dir)
        layout = SplitLayout.for_model(peft_model, settings.head_layers, settings.tail_layers)
        return cls(peft_model, layout)

    # -- adapters ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def adapter_state(self):
        """Head + tail LoRA tensors (PEFT names, fp32 numpy): what the strategy aggregates."""
        return get_adapter_state(self.peft_model)

    def load_adapter_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load an aggregated head + tail adapter (checked name by name)."""
        set_adapter_state(self.peft_model, state)

    # -- compute ----------------------------------------------------------------------------
    def head_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Embeddings + head blocks on a padded batch: ``[B, T, H]``."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        h = _embed(self._arch, input_ids, position_ids)
        return _run_blocks(self._arch, self.layout.head, h, attention_mask, position_ids, cache)

    def tail_forward(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Tail blocks + final norm + LM head on a padded batch: logits ``[B, T, V]``."""
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device)[None]
        h = _run_blocks(self._arch, self.layout.tail, h, attention_mask, position_ids, cache)
        b = self._arch.backbone
        h = b.ln_f(h) if self._arch.is_gpt2 else b.norm(h)
        return self._arch.causal_lm.lm_head(h)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's own causal-LM loss (shifted, ignore_index -100, mean over tokens)."""
        lm = self._arch.causal_lm
        return lm.loss_function(logits=logits, labels=labels, vocab_size=lm.config.vocab_size)

    def new_cache(self):
        """A KV cache for this silo's blocks (one object; blocks write at their own index)."""
        return _new_cache(self._arch.config)


# --------------------------------------------------------------------------------------------
# the server side


@dataclass
class PendingStep:
    """A batched middle forward whose backward is outstanding (graph held by the server)."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    lengths: list[list[int]]
    step: int


@dataclass
class _Session:
    cache: Any
    mask: torch.Tensor  # [B, seen] long, left-aligned
    seen: torch.Tensor  # [B] tokens so far
    owner: str


class MiddleServer:
    """The server's middle blocks, their LoRA adapter and optimizer; batched compute for silos.

    Thread safety: every method takes ``self.lock``; the relay calls compute from one thread.

    Parameters
    ----------
    peft_model : peft.PeftModel
        The full LoRA-wrapped model; head/tail blocks, embeddings, norm and LM head are dropped.
    layout : SplitLayout
    learning_rate : float
        AdamW learning rate of the middle adapter (change with :meth:`set_learning_rate`).
    weight_decay : float
    max_grad_norm : float
        Clip the middle adapter's gradient norm per step; 0 disables clipping.
    max_sessions : int
        Generation sessions (KV caches) one owner may hold.
    strip : bool
        Drop the silo-side modules (default).
    """

    def __init__(
        self,
        peft_model,
        layout: SplitLayout,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_sessions: int = 4,
        strip: bool = True,
    ):
        self.peft_model = peft_model
        self.layout = layout
        self._arch = _Arch.of(peft_model)
        if strip:
            _strip(self._arch, layout, "server")
        self.max_grad_norm = max_grad_norm
        self.max_sessions = max_sessions
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay)
        self.lock = threading.RLock()
        self.steps = 0
        self._sessions: dict[tuple[str, str], _Session] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: SplitSettings,
        lora: LoraSettings,
        seed: int = 0,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        quantization: int = 0,
        cache_dir: str | None = None,
    ) -> MiddleServer:
        """Load ``model_name``, add LoRA (seeded) and keep only the middle blocks."""
        peft_model = _build_peft(model_name, lora, seed, quantization, cache_dir)
        layout = SplitLayout.for_model(peft_model, settings.head_layers, settings.tail_layers)
        return cls(
            peft_model, layout, learning_rate, weight_decay, max_grad_norm, settings.max_sessions
        )

    # -- adapter / optimizer state ----------------------------------------------------------
    def adapter_state(self):
        """Middle LoRA tensors (PEFT names, fp32 numpy): checkpoint or export them."""
        with self.lock:
            return get_adapter_state(self.peft_model)

    def load_adapter_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the middle adapter (e.g. from a checkpoint); resets the optimizer moments."""
        with self.lock:
            set_adapter_state(self.peft_model, state)
            self.optimizer.state.clear()

    def set_learning_rate(self, lr: float) -> None:
        with self.lock:
            for g in self.optimizer.param_groups:
                g["lr"] = lr

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments (a fresh optimizer per round, like the silos')."""
        with self.lock:
            self.optimizer.state.clear()

    # -- training ---------------------------------------------------------------------------
    def _middle(self, h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache=None):
        return _run_blocks(self._arch, self.layout.middle, h, mask, pos, cache)

    def forward(
        self, items: Sequence[tuple[torch.Tensor, Sequence[int]]], train: bool, step: int = 0
    ) -> tuple[list[torch.Tensor], PendingStep | None]:
        """Batched middle forward of packed inputs from one or more silos.

        Parameters
        ----------
        items : sequence of (tensor, lengths)
            Packed ``[N_i, H]`` rows and their sequence lengths, one item per silo.
        train : bool
            Keep the graph for :meth:`backward` (else run without gradients).

        Returns
        -------
        (list of torch.Tensor, PendingStep or None)
            Packed outputs (detached) per item, and the pending step when ``train``.
        """
        with self.lock:
            all_lengths = [int(n) for _, lens in items for n in lens]
            inputs = [x.detach().requires_grad_(train) for x, _ in items]
            self.peft_model.train(train)
            with torch.set_grad_enabled(train):
                seqs = torch.cat(inputs).split(all_lengths)
                outs: list[torch.Tensor | None] = [None] * len(seqs)
                for bucket in length_buckets(all_lengths):
                    lens = [all_lengths[i] for i in bucket]
                    width = max(lens)
                    h = unpack(torch.cat([seqs[i] for i in bucket]), lens, width)
                    y = pack(
                        self._middle(h, padding_mask(lens, width), torch.arange(width)[None]), lens
                    )
                    for i, part in zip(bucket, y.split(lens)):
                        outs[i] = part
                out = torch.cat(outs)
                outputs = list(out.split([x.shape[0] for x in inputs]))
            detached = [o.detach() for o in outputs]
            if not train:
                return detached, None
            return detached, PendingStep(inputs, outputs, [list(lens) for _, lens in items], step)

    def backward(
        self, pending: PendingStep, grads: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        """Backward of a pending step and one optimizer step of the middle adapter.

        Parameters
        ----------
        pending : PendingStep
        grads : sequence of tensor or None
            Gradient w.r.t. each item's output; ``None`` for a silo dropped from the step (its
            rows then contribute nothing).

        Returns
        -------
        list of tensor or None
            Gradient w.r.t. each item's input (``None`` where dropped). The middle gradient is
            the mean over contributing silos (each silo's loss is a mean over its tokens).
        """
        with self.lock:
            live = [i for i, g in enumerate(grads) if g is not None]
            if not live:
                return [None] * len(grads)
            try:
                torch.autograd.backward(
                    [pending.outputs[i] for i in live], [grads[i] for i in live]
                )
                if len(live) > 1:
                    for p in self.params:
                        if p.grad is not None:
                            p.grad.div_(len(live))
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                self.optimizer.step()
                self.steps += 1
            finally:
                self.optimizer.zero_grad(set_to_none=True)
            out = [pending.inputs[i].grad if i in live else None for i in range(len(grads))]
            return [
                g if g is not None else torch.zeros_like(pending.inputs[i]) if i in live else None
                for i, g in enumerate(out)
            ]

    # -- generation -------------------------------------------------------------------------
    def generate(
        self, owner: str, session: str, x: torch.Tensor, lengths: Sequence[int], start: bool
    ) -> torch.Tensor:
        """Middle forward of new tokens of a generation session with a server-side KV cache.

        ``start`` opens the session with left-padded prompts of any ``lengths``; later calls add
        the same number of tokens to every sequence.
        """
        with self.lock:
            key = (owner, session)
            lens = torch.as_tensor([int(n) for n in lengths])
            if start:
                if (
                    key not in self._sessions
                    and sum(1 for o, _ in self._sessions if o == owner) >= self.max_sessions
                ):
                    raise SplitError(
                        f"{owner} holds {self.max_sessions} generation sessions already; end one "
                        "(EndSession) or raise split.max-sessions"
                    )
                sess = _Session(
                    _new_cache(self._arch.config),
                    torch.zeros(len(lens), 0, dtype=torch.long),
                    torch.zeros(len(lens), dtype=torch.long),
                    owner,
                )
                self._sessions[key] = sess
            else:
                sess = self._sessions.get(key)
                if sess is None:
                    raise SplitError(
                        f"{owner} has no generation session '{session[:40]}'; "
                        "start it first (start=true)"
                    )
                if len(lens) != len(sess.seen) or len(set(lens.tolist())) != 1:
                    raise SplitError(
                        f"{owner} continued session '{session[:40]}' with lengths "
                        f"{lens.tolist()[:8]}; send the same number of new tokens for each of "
                        f"its {len(sess.seen)} sequences"
                    )
            if int((sess.seen + lens).max()) > self.layout.max_positions:
                raise SplitError(
                    f"{owner} session '{session[:40]}' would exceed the model "
                    f"context of {self.layout.max_positions} tokens"
                )
            new_mask, pos, width = generation_positions(sess.seen, lens, start)
            self.peft_model.eval()
            with torch.no_grad():
                h = unpack(x, lens, width, left=True)
                sess.mask = torch.cat([sess.mask, new_mask], dim=1)
                out = self._middle(h, sess.mask, pos, sess.cache)
            sess.seen = sess.seen + lens
            return pack(out, lens, left=True)

    def end_session(self, owner: str, session: str) -> None:
        with self.lock:
            self._sessions.pop((owner, session), None)

    def end_sessions(self, owner: str) -> int:
        """Free every session of ``owner`` (a disconnected silo); returns how many."""
        with self.lock:
            keys = [k for k in self._sessions if k[0] == owner]
            for k in keys:
                del self._sessions[k]
            return len(keys)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)


def length_buckets(
    lengths: Sequence[int], max_ratio: float = 1.25, max_buckets: int = 8
) -> list[list[int]]:
    """Group sequence indices by similar length so the server pads little (rows independent).

    Sequences are sorted longest first; a bucket closes when the next one is shorter than
    ``bucket max / max_ratio``. At most ``max_buckets`` buckets (the last takes the rest).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if (
            buckets
            and len(buckets) < max_buckets
            and lengths[i] * max_ratio < lengths[buckets[-1][0]]
        ) or not buckets:
            buckets.append([i])
        else:
            buckets[-1].append(i)
    return buckets


def generation_positions(
    seen: torch.Tensor, lengths: torch.Tensor, start: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mask columns, position ids and width for new tokens of a left-padded generation batch."""
    width = int(lengths.max())
    new_mask = padding_mask(lengths, width, left=True)
    if start:
        pos = (new_mask.cumsum(-1) - 1).clamp(min=0)
    else:
        pos = seen[:, None] + torch.arange(width)[None]
    return new_mask, pos, width


# --------------------------------------------------------------------------------------------
# links to the middle and the silo training loop


class MiddleLink(Protocol):
    """How a silo reaches the middle blocks (``RelayClient`` over gRPC, ``LocalLink`` in process).

    All tensors are packed ``[tokens, hidden]`` float32 rows.
    """

    def forward(
        self, step: int, x: torch.Tensor, lengths: Sequence[int], train: bool
    ) -> torch.Tensor: ...

    def backward(self, step: int, grad: torch.Tensor) -> torch.Tensor: ...

    def generate(
        self, session: str, x: torch.Tensor, lengths: Sequence[int], start: bool
    ) -> torch.Tensor: ...

    def end_session(self, session: str) -> None: ...


class LocalLink:
    """A :class:`MiddleLink` calling a :class:`MiddleServer` in process (one silo, no batching)."""

    def __init__(self, server: MiddleServer, owner: str = "local"):
        self.server, self.owner = server, owner
        self._pending: PendingStep | None = None

    def forward(self, step, x, lengths, train):
        outs, self._pending = self.server.forward([(x, lengths)], train, step)
        return outs[0]

    def backward(self, step, grad):
        if self._pending is None:
            raise SplitError(f"{self.owner}: backward of step {step} without a training forward")
        pending, self._pending = self._pending, None
        return self.server.backward(pending, [grad])[0]

    def generate(self, session, x, lengths, start):
        return self.server.generate(self.owner, session, x, lengths, start)

    def end_session(self, session):
        self.server.end_session(self.owner, session)


@dataclass
class StepResult:
    """One silo training step: loss and the real tokens it covered."""

    step: int
    loss: float
    tokens: int


def batch_lengths(attention_mask: torch.Tensor, who: str = "silo") -> torch.Tensor:
    """Sequence lengths of a right-padded batch; refuses left padding or holes in the mask."""
    lens = attention_mask.long().sum(1)
    if not torch.equal(attention_mask.long(), padding_mask(lens, attention_mask.shape[1])):
        raise SplitError(
            f"{who}: split training needs right-padded batches (attention_mask a prefix of ones "
            "per row); set tokenizer.padding_side='right'"
        )
    if int(lens.min()) < 1:
        raise SplitError(f"{who}: the batch contains an empty sequence; drop it")
    return lens


@dataclass
class SiloTrainer:
    """A silo's side of split training, evaluation and generation through a :class:`MiddleLink`.

    Parameters
    ----------
    silo : SplitSilo
    link : MiddleLink
    learning_rate : float
        AdamW learning rate of the head + tail adapter.
    weight_decay : float
    max_grad_norm : float
        Clip the head + tail adapter's gradient norm; 0 disables it.
    noise_sigma : float
        Relative Gaussian noise on the head output (see :func:`add_relative_noise`).
    seed : int
        Seeds the noise generator.
    name : str
        The silo's name in error messages.
    """

    silo: SplitSilo
    link: MiddleLink
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    noise_sigma: float = 0.0
    seed: int = 0
    name: str = "silo"
    step: int = 0
    optimizer: torch.optim.Optimizer = field(init=False)
    _gen: torch.Generator = field(init=False)

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(
            self.silo.trainable_parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        self._gen = torch.Generator().manual_seed(self.seed)

    def set_learning_rate(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train_step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> StepResult:
        """One split training step on a right-padded batch; returns the loss.

        Parameters
        ----------
        input_ids, attention_mask : torch.Tensor
            ``[B, T]``, right padded.
        labels : torch.Tensor, optional
            ``[B, T]``; defaults to ``input_ids``; ignored (-100) wherever the mask is 0.
        """
        silo, step = self.silo, self.step
        lengths = batch_lengths(attention_mask, f"{self.name} step {step}")
        labels = (input_ids if labels is None else labels).masked_fill(attention_mask == 0, -100)
        silo.peft_model.train()
        h = pack(silo.head_forward(input_ids, attention_mask), lengths)
        sent = add_relative_noise(h.detach(), self.noise_sigma, self._gen)
        mid = self.link.forward(step, sent, lengths.tolist(), True).requires_grad_(True)
        logits = silo.tail_forward(unpack(mid, lengths, input_ids.shape[1]), attention_mask)
        loss = silo.loss(logits, labels)
        loss.backward()
        grad_h = self.link.backward(step, mid.grad)
        h.backward(grad_h)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(silo.trainable_parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(step, float(loss.detach()), int(lengths.sum()))

    @torch.no_grad()
    def evaluate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> float:
        """Loss of a right-padded batch through the split model, no training."""
        silo = self.silo
        lengths = batch_lengths(attention_mask, f"{self.name} eval")
        labels = (input_ids if labels is None else labels).masked_fill(attention_mask == 0, -100)
        silo.peft_model.eval()
        h = pack(silo.head_forward(input_ids, attention_mask), lengths)
        h = add_relative_noise(h, self.noise_sigma, self._gen)
        mid = self.link.forward(self.step, h, lengths.tolist(), False)
        logits = silo.tail_forward(unpack(mid, lengths, input_ids.shape[1]), attention_mask)
        return float(silo.loss(logits, labels))

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int | None = None
    ) -> list[list[int]]:
        """Greedy split generation with a KV cache on each party; returns the new tokens.

        Each sequence stops after ``eos_token_id`` (included) or ``max_new_tokens``.
        """
        silo = self.silo
        silo.peft_model.eval()
        session = uuid.uuid4().hex
        cache = silo.new_cache()
        lens = torch.as_tensor([len(p) for p in prompts])
        width = int(lens.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        ids[padding_mask(lens, width, left=True).bool()] = torch.as_tensor(
            [t for p in prompts for t in p], dtype=torch.long
        )
        seen = torch.zeros(len(prompts), dtype=torch.long)
        mask = torch.zeros(len(prompts), 0, dtype=torch.long)
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        try:
            for t in range(max_new_tokens):
                start = t == 0
                new_mask, pos, w = generation_positions(seen, lens, start)
                mask = torch.cat([mask, new_mask], dim=1)
                h = pack(silo.head_forward(ids, mask, pos, cache), lens, left=True)
                h = add_relative_noise(h, self.noise_sigma, self._gen)
                mid = self.link.generate(session, h, lens.tolist(), start)
                logits = silo.tail_forward(unpack(mid, lens, w, left=True), mask, pos, cache)
                nxt = logits[:, -1].argmax(-1)
                seen = seen + lens
                for b in range(len(prompts)):
                    if not done[b]:
                        out[b].append(int(nxt[b]))
                        done[b] = eos_token_id is not None and int(nxt[b]) == eos_token_id
                if bool(done.all()):
                    break
                ids, lens = nxt[:, None], torch.ones(len(prompts), dtype=torch.long)
        finally:
            self.link.end_session(session)
        return out


def run_silo_round(trainer: SiloTrainer, batches, max_steps: int | None = None) -> dict[str, float]:
    """Train over ``batches`` (dicts with ``input_ids``, ``attention_mask``, optional ``labels``).

    Returns
    -------
    dict
        ``train_loss`` (mean over steps), ``steps``, ``tokens``: the metrics a reply carries.
    """
    losses: list[float] = []
    tokens = 0
    for i, batch in enumerate(batches):
        if max_steps is not None and i >= max_steps:
            break
        r = trainer.train_step(batch["input_ids"], batch["attention_mask"], batch.get("labels"))
        losses.append(r.loss)
        tokens += r.tokens
    return {
        "train_loss": float(np.mean(losses)) if losses else math.nan,
        "steps": float(len(losses)),
        "tokens": float(tokens),
    }


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
