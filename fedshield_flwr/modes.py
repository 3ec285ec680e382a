"""The one registry of modes: a mode name maps to its settings, server mode, strategy, handlers.

``strategy.name`` selects a :class:`Mode`. Its ``settings`` (a :class:`~fedshield_flwr.config.
Section`, or None) is imported here; the ServerApp side (``server``: a server mode class of
``server_app``, whose ``strategy`` is the class in ``strategies``) and the ClientApp side
(``client``: a module of ``client_app`` with ``train``/``evaluate``/``query`` handlers) are named
by import path and imported only by the process that needs them, so a silo never imports the
server's code and the library imports neither.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fedshield_flwr.config import Section
from fedshield_flwr.lpp.settings import LppSettings
from fedshield_flwr.shield.settings import ShieldSettings
from fedshield_flwr.split.settings import SplitSettings


@dataclass(frozen=True)
class Mode:
    """One privacy mode.

    Parameters
    ----------
    name : str
        ``strategy.name``.
    settings : type of Section or None
        Its run config section (``shield.*``), None if it has none.
    server : str
        ``module:Class`` of its server mode (initial state, strategy, checkpoint, export).
    strategy : str
        ``module:Class`` of its Flower strategy (built by the server mode).
    client : str
        Module of its ClientApp handlers (``train``, ``evaluate``, optionally ``query``).
    needs_bitsandbytes : bool
        Whether its processes use bitsandbytes even at ``model.quantization=0``.
    """

    name: str
    settings: type[Section] | None
    server: str
    strategy: str
    client: str
    needs_bitsandbytes: bool = False

    def server_mode(self) -> type:
        return _resolve(self.server)

    def strategy_class(self) -> type:
        return _resolve(self.strategy)

    def handlers(self) -> Any:
        return importlib.import_module(self.client)


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fedavg", None, "server_app.fedavg:FedAvgMode", "strategies.fedavg:LoraFedAvg",
         "client_app.fedavg"),
    Mode("shield", ShieldSettings, "server_app.shield:ShieldMode",
         "strategies.shield:ShieldStrategy", "client_app.shield"),
    Mode("lpp", LppSettings, "server_app.lpp:LppMode", "strategies.lpp:LppStrategy",
         "client_app.lpp", needs_bitsandbytes=True),
    Mode("split", SplitSettings, "server_app.split:SplitMode", "strategies.split:SplitFedAvg",
         "client_app.split"),
)}


def get_mode(name: str) -> Mode:
    """The mode called ``name``, or a clear error listing the known ones."""
    if name not in MODES:
        raise ValueError(f"strategy.name='{name}' is not a mode of this build (no server mode, "
                         f"no handler); known: {', '.join(MODES)}")
    return MODES[name]


def mode_sections() -> list[type[Section]]:
    """The run config sections the modes add (``shield.*``, ``lpp.*``, ``split.*``)."""
    return [m.settings for m in MODES.values() if m.settings is not None]


def _resolve(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
