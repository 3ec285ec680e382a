"""Models: loading (HF, embedded GGUF, tiny tests), LoRA, quantization, split partitioning."""

from fedshield_flwr.models.load import (
    ModelLoadError,
    cache_root,
    load_base_model,
    load_tokenizer,
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
    "ModelLoadError",
    "apply_lora",
    "cache_root",
    "check_adapter_state",
    "export_adapter",
    "get_adapter_state",
    "load_base_model",
    "load_tokenizer",
    "resolve_model_path",
    "set_adapter_state",
]
