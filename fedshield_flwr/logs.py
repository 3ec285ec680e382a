"""Console logging for the ``fedshield`` loggers, in Flower's style, set up once per process."""

from __future__ import annotations

import logging
import sys


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
