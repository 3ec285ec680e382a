"""gRPC split-learning relay: the server hosts the middle blocks, silos stream activations to it.

* ``relay.proto``: the service (one bidirectional stream per silo and round) and tensor frames.
  ``relay_pb2.py`` / ``relay_pb2_grpc.py`` are generated from it and committed; regenerate with
  ``.venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=.
  fedshield_flwr/split/relay/relay.proto`` from the repository root.
* :mod:`.frames`: raw-bytes tensor encoding (fp32 / fp16 / int8 per-row absmax) and validation.
* :mod:`.server`: :class:`RelayServer`, hosted by the ServerApp (streams, tokens, TLS);
  :mod:`.scheduler`: client batching (one middle step for concurrent silos);
  :mod:`.control`: the run's relay as the strategy drives it (lifecycle, per-round tickets).
* :mod:`.client`: :class:`RelayClient`, a silo's :class:`~fedshield_flwr.split.silo_model.MiddleLink`.
"""

from fedshield_flwr.split.relay.client import RelayClient
from fedshield_flwr.split.relay.frames import (
    FrameError,
    FrameLimits,
    decode_activation,
    encode_activation,
)
from fedshield_flwr.split.relay.server import PROTOCOL_VERSION, RelayError, RelayServer

__all__ = [
    "PROTOCOL_VERSION",
    "FrameError",
    "FrameLimits",
    "RelayClient",
    "RelayError",
    "RelayServer",
    "decode_activation",
    "encode_activation",
]
