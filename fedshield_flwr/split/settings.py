"""The ``split.*`` run config section: where to cut, how the relay runs, its TLS files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fedshield_flwr.config import ConfigError, Section, check

ACTIVATION_DTYPES = ("fp32", "fp16", "int8")
AGGREGATIONS = ("fedavg", "shield")


@dataclass(frozen=True)
class SplitSettings(Section):
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
        to that row's mean ``|h|`` (FedSEA calibration); 0 disables it. No privacy meaning.
    clip_norm : float
        ``split.clip-norm``: L2 bound C on each head-output token row before it is sent; 0 = off.
    noise_multiplier : float
        ``split.noise-multiplier``: Gaussian noise std on each clipped row, in units of C; with
        ``dp_delta`` it gives the per-token epsilon (:meth:`token_epsilon`). Needs clip-norm > 0.
    dp_delta : float
        ``split.dp-delta``: the delta at which the per-token epsilon is stated.
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

    prefix: ClassVar[str] = "split"
    head_layers: int = 1
    tail_layers: int = 1
    activation_dtype: str = "fp32"
    noise_sigma: float = 0.0
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    batch_window_ms: float = 200.0
    step_timeout_s: float = 300.0
    max_frame_mb: float = 64.0
    token_ttl_s: float = 7200.0
    max_sessions: int = 4
    relay_port: int = 0
    relay_bind: str = "127.0.0.1"
    relay_host: str = ""
    relay_ca_cert: str = ""
    relay_server_cert: str = ""
    relay_server_key: str = ""
    aggregation: str = "fedavg"

    def validate(self) -> None:
        s = self
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
            (s.clip_norm >= 0, "clip-norm", s.clip_norm, ">= 0 (0 = no clipping)"),
            (s.noise_multiplier >= 0, "noise-multiplier", s.noise_multiplier, ">= 0"),
            (s.noise_multiplier == 0 or s.clip_norm > 0, "noise-multiplier", s.noise_multiplier,
             "needs split.clip-norm > 0 (the noise is in units of the clipping bound)"),
            (0 < s.dp_delta < 1, "dp-delta", s.dp_delta, "in (0, 1)"),
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
            check(ok, f"split.{key}", value, rule)

    def token_epsilon(self) -> float:
        """Per-token epsilon at ``dp_delta`` of the clipped Gaussian noise (inf when off)."""
        from fedshield_flwr.split.noise import gaussian_epsilon

        return gaussian_epsilon(self.noise_multiplier, self.dp_delta)

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
