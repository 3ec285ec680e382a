"""Where a silo's model runs and in which dtype it computes: one rule, used by every loader.

``model.dtype`` (``auto`` | ``fp32`` | ``bf16``) chooses the compute dtype of the base model:

``auto`` (default)
    bf16 on a CUDA device that computes bf16 natively (compute capability 8.0 and up), fp32
    everywhere else: on the CPU, and on older GPUs, whose bf16 is emulated and slow.
``fp32``
    fp32 on any device: bit-for-bit the CPU numbers, e.g. to compare a GPU run with a CPU one.
``bf16``
    bf16 on CUDA; refused on the CPU, where a bf16 matmul is ~250x slower than fp32 (measured on
    the 2-core CI machine) and a run would look hung, for no gain at the model sizes a CPU trains.

The LoRA adapter itself always stays fp32 (PEFT keeps adapter weights fp32 over a bf16 base, and
:func:`fedshield_flwr.models.lora.apply_lora` initializes it in fp32 on the CPU), so every party
starts from, sends and aggregates the same fp32 adapter whatever its device.
"""

from __future__ import annotations

import torch

DTYPES = ("auto", "fp32", "bf16")


class DeviceError(ValueError):
    """A ``model.dtype`` that this device cannot (or should not) compute in."""


def default_device() -> torch.device:
    """The first CUDA device when one is visible (``CUDA_VISIBLE_DEVICES``), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively. Asked of the driver only when CUDA is present;
    a machine without CUDA answers True so that the rule for a CUDA device can be checked there."""
    if not torch.cuda.is_available():
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def compute_dtype(device: torch.device | str, requested: str = "auto") -> torch.dtype:
    """The compute dtype of the base model on ``device`` for ``model.dtype=requested``.

    Raises
    ------
    DeviceError
        ``requested`` is not one of :data:`DTYPES`, or it is ``bf16`` on a non-CUDA device.
    """
    device = torch.device(device)
    if requested not in DTYPES:
        raise DeviceError(f"model.dtype='{requested}': use one of {', '.join(DTYPES)}")
    if requested == "fp32":
        return torch.float32
    if device.type != "cuda":
        if requested == "bf16":
            raise DeviceError(
                f"model.dtype='bf16' on {device.type}: bf16 matmul on the CPU is ~250x slower "
                "than fp32; use model.dtype='auto' (fp32 here, bf16 on a CUDA GPU) or 'fp32'")
        return torch.float32
    if requested == "bf16" or _native_bf16(device):
        return torch.bfloat16
    return torch.float32
