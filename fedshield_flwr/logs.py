"""Console logging for the ``fedshield`` loggers, in Flower's style, set up once per process.

:func:`quiet_third_party` silences the few known-harmless messages that libraries we import
print in every ClientApp and ServerApp process, each by its exact text; every other warning,
ours included, still shows.
"""

from __future__ import annotations

import logging
import sys
import warnings


def configure_logging(level: int = logging.INFO) -> None:
    logger = logging.getLogger("fedshield")
    if any(getattr(h, "_fedshield", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)-8s: %(message)s"))
    handler._fedshield = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    for name in ("fedshield_flwr",):
        lib = logging.getLogger(name)
        lib.addHandler(handler)
        lib.setLevel(level)
        lib.propagate = False


class _DropMessage(logging.Filter):
    """Drop the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# (warning category, module that warns, message regex): why each does not concern a run.
# - torch.jit.script_method: bitsandbytes calls torch.compile at import (peft imports
#   bitsandbytes whenever it is installed), which imports torch.utils.mkldnn, whose classes use
#   script_method; nothing of ours scripts anything. Shown where DeprecationWarnings are on
#   (Flower's simulation turns them on for the whole process, pytest too).
# - is_gradient_checkpointing: peft's PeftModel reads the deprecated property of the
#   transformers model it wraps; our training loop uses the current API.
_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (DeprecationWarning, r"torch\.jit\._script", r"`torch\.jit\.script_method` is deprecated"),
    (FutureWarning, r"transformers\.modeling_utils",
     r"`is_gradient_checkpointing` is deprecated"),
)
# (logger, message prefix): bitsandbytes looks for the optional `kernels` package for a faster
# 4-bit matmul on AVX512-BF16 CPUs at import and falls back to its own kernel without it.
_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops",
     "Failed to load CPU gemm_4bit_forward from kernels-community"),
)
_FILTERS = {name: _DropMessage(prefix) for name, prefix in _LOG_RECORDS}


def quiet_third_party() -> None:
    """Silence the known-harmless third-party messages above, each by its exact text.

    Call early, before the libraries are imported (the apps call it at import); calling it again
    changes nothing. A warnings filter added later (``-W``, pytest) takes precedence.
    """
    for category, module, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, drop in _FILTERS.items():
        logging.getLogger(name).addFilter(drop)
