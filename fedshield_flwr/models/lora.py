"""LoRA on any supported causal LM: per-architecture targets, adapter state, PEFT export.

The adapter state that crosses the wire is an ordered ``dict[str, np.ndarray]`` of fp32 LoRA
tensors keyed exactly as PEFT saves them (``...q_proj.lora_A.weight``), so an exported directory
is a standard PEFT adapter and ``PeftModel.from_pretrained(base, dir)`` loads it.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedshield_flwr.config import LoraSettings

# Attention projections per model_type; GPT-2 uses fused Conv1D layers (fan_in_fan_out).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn", "c_proj"),
    "gpt_neox": ("query_key_value", "dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
FAN_IN_FAN_OUT = {"gpt2"}


class AdapterMismatchError(ValueError):
    """An adapter state does not fit the local model (names, shapes or dtype)."""


def discover_targets(model) -> tuple[tuple[str, ...], bool]:
    """The attention projections of ``model``'s first decoder block, found from the model.

    Returns the module names (last name component, as PEFT matches them) of every ``nn.Linear``
    or ``Conv1D`` under a submodule whose name contains ``attn`` or ``attention``, and whether
    they are ``Conv1D`` (``fan_in_fan_out``). Raises ``ValueError`` listing the linear modules
    found when none is an attention projection.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    blocks = next(
        (m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n),
        None,
    )
    scope = blocks[0] if blocks is not None and len(blocks) else model
    linear = [
        (name, m) for name, m in scope.named_modules() if isinstance(m, (nn.Linear, Conv1D))
    ]
    attn = [(name, m) for name, m in linear
            if any(w in name.lower() for w in ("attn", "attention"))]
    if not attn:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in linear})
        raise ValueError(
            f"no attention projections found in model_type "
            f"'{getattr(model.config, 'model_type', '?')}' (its linear modules: "
            f"{', '.join(names) or 'none'}); set model.lora.target-modules to some of them"
        )
    targets = tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in attn))
    return targets, any(isinstance(m, Conv1D) for _, m in attn)


def lora_config(model_type: str, settings: LoraSettings, base_path: str = "", model=None):
    """The ``peft.LoraConfig`` for a model type: ``model.lora.target-modules``, else the
    per-architecture default, else the attention projections found in ``model``."""
    from peft import LoraConfig

    targets = settings.target_modules or DEFAULT_TARGETS.get(model_type)
    fan_in_fan_out = model_type in FAN_IN_FAN_OUT
    if not targets and model is not None:
        targets, fan_in_fan_out = discover_targets(model)
    if not targets:
        raise ValueError(
            f"no default LoRA targets for model_type '{model_type}'; set "
            "model.lora.target-modules (comma separated module names)"
        )
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path or None,
    )


def apply_lora(model, settings: LoraSettings, seed: int = 0, base_path: str = ""):
    """Wrap ``model`` with a freshly initialized LoRA adapter; initialization is seeded."""
    import warnings

    from peft import get_peft_model

    cfg = lora_config(model.config.model_type, settings, base_path, model=model)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # GPT-2's Conv1D: peft warns about fan_in_fan_out even when it is set correctly.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        peft_model = get_peft_model(model, cfg)
    init_adapter_fp32(peft_model, seed)
    return peft_model


def init_adapter_fp32(peft_model, seed: int) -> None:
    """Set every ``lora_A`` to the fp32 values PEFT draws for it on an fp32 CPU base.

    PEFT draws ``lora_A`` in fp32 on the CPU (from the global generator that :func:`apply_lora`
    seeds), then casts it to the base layer's dtype and device: over a bf16 base (a CUDA silo,
    ``model.dtype``) the initial adapter would be bf16-rounded and differ from a CPU party's,
    which breaks shield's and split's silos that start from the same seeded adapter. This
    replays PEFT's draws with a generator seeded by ``seed``, in the order PEFT makes them (per
    LoRA layer: ``nn.Linear`` init of A, of B, then ``kaiming_uniform_(A, a=sqrt(5))``, i.e.
    uniform on ``+-1/sqrt(fan_in)``), and copies the A draw in: the same values as PEFT over an
    fp32 base, bit for bit, whatever the device and base dtype (``lora_B`` stays zero).
    """
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)

    def draw(shape: torch.Size) -> torch.Tensor:
        bound = 1.0 / math.sqrt(shape[1])
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)

    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter, lora_a in module.lora_A.items():
                draw(lora_a.weight.shape)  # nn.Linear's own init of A, overwritten by PEFT
                draw(module.lora_B[adapter].weight.shape)  # nn.Linear's init of B (then zeroed)
                value = draw(lora_a.weight.shape)
                lora_a.weight.copy_(value.to(lora_a.weight.device, lora_a.weight.dtype))


def get_adapter_state(peft_model) -> "OrderedDict[str, np.ndarray]":
    """Trainable LoRA tensors as fp32 numpy arrays, in a deterministic order."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model)
    return OrderedDict(
        (k, sd[k].detach().to(torch.float32).cpu().numpy().copy()) for k in sorted(sd)
    )


def check_adapter_state(
    expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], who: str
) -> None:
    """Raise :class:`AdapterMismatchError` naming ``who`` unless names, shapes, dtypes agree."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise AdapterMismatchError(
            f"{who}: adapter tensor names differ (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"{len(missing)}/{len(extra)} in all); check that every party uses the same "
            "model.name and model.lora.* settings"
        )
    for k, ref in expected.items():
        arr = got[k]
        if tuple(arr.shape) != tuple(ref.shape):
            raise AdapterMismatchError(
                f"{who}: tensor '{k}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}; "
                "check model.lora.r and model.name"
            )
        if arr.dtype != ref.dtype:
            raise AdapterMismatchError(f"{who}: tensor '{k}' has dtype {arr.dtype}, expected {ref.dtype}")
        if not np.all(np.isfinite(arr)):
            raise AdapterMismatchError(f"{who}: tensor '{k}' contains NaN or Inf")


def set_adapter_state(peft_model, state: Mapping[str, np.ndarray]) -> None:
    """Load adapter tensors into ``peft_model`` after checking they fit it exactly."""
    from peft import set_peft_model_state_dict

    check_adapter_state(get_adapter_state(peft_model), state, "adapter")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterMismatchError(f"adapter keys not used by the model: {unexpected[:3]}")


def export_adapter(
    out_dir: str | os.PathLike,
    state: Mapping[str, np.ndarray],
    model_type: str,
    settings: LoraSettings,
    base_name: str = "",
    extra_meta: Mapping[str, str] | None = None,
) -> Path:
    """Write a standard PEFT adapter directory without needing the base model in memory.

    ``base_name`` goes into ``adapter_config.json`` as ``base_model_name_or_path``: pass
    :func:`~fedshield_flwr.models.load.public_model_name` of ``model.name`` so that the adapter
    loads on another machine.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not settings.target_modules and model_type not in DEFAULT_TARGETS:
        # targets found in the model (discover_targets): read them back from the tensor names
        from dataclasses import replace

        found = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state if ".lora_" in k})
        settings = replace(settings, target_modules=tuple(found))
    lora_config(model_type, settings, base_name).save_pretrained(str(out))
    meta = {"format": "pt", **(extra_meta or {})}
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
              str(out / "adapter_model.safetensors"), metadata=meta)
    return out


def adapter_num_params(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.size for v in state.values()))


def describe_adapter(state: Mapping[str, np.ndarray]) -> str:
    return json.dumps({"tensors": len(state), "params": adapter_num_params(state)})
