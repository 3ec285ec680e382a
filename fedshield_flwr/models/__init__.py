"""Models: loading (HF id or directory, the embedded GGUF default, tiny test models) and LoRA."""

from fedshield_flwr.models.device import DeviceError, compute_dtype, default_device
from fedshield_flwr.models.load import (
    ModelLoadError,
    cache_root,
    load_base_model,
    load_tokenizer,
    public_model_name,
    resolve_model_path,
)
from fedshield_flwr.models.lora import (
    AdapterMismatchError,
    apply_lora,
    check_adapter_state,
    export_adapter,
    get_adapter_state,
    set_adapter_state,
)

__all__ = [
    "AdapterMismatchError",
    "DeviceError",
    "ModelLoadError",
    "apply_lora",
    "cache_root",
    "check_adapter_state",
    "compute_dtype",
    "default_device",
    "export_adapter",
    "get_adapter_state",
    "load_base_model",
    "load_tokenizer",
    "public_model_name",
    "resolve_model_path",
    "set_adapter_state",
]
