"""The silo's end of the relay: a synchronous :class:`~fedshield_flwr.split.silo_model.MiddleLink`.

:class:`RelayClient` opens one bidirectional stream (``relay.proto``) authenticated with the
per-round token, checks that the server cuts the same model (``Hello``/``Welcome``), then turns
each call into one request and waits for its reply. It encodes packed activations in the
configured wire dtype, validates every reply like the server validates requests, and counts the
bytes it sends and receives per kind.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Sequence

import grpc
import torch

from fedshield_flwr.split.relay import relay_pb2 as pb
from fedshield_flwr.split.relay import relay_pb2_grpc as pb_grpc
from fedshield_flwr.split.relay.frames import (
    FrameError,
    FrameLimits,
    decode_activation,
    encode_activation,
    frame_nbytes,
)
from fedshield_flwr.split.relay.server import PROTOCOL_VERSION, RelayError

_EOF = object()


class RelayClient:
    """A silo's connection to the relay for one round.

    Parameters
    ----------
    address : str
        ``host:port`` of the relay (sent by the ServerApp with the token).
    token : str
        This silo's per-round relay token.
    silo : str
        The silo name the token was issued to (the ServerApp's name for this node).
    layout : str
        ``SplitSilo.layout.fingerprint()``: the server refuses a different model or cut.
    activation_dtype : {"fp32", "fp16", "int8"}
        Wire dtype of the activations and gradients this silo sends (the server answers alike).
    root_certificates : bytes, optional
        PEM CA certificate(s): connect with TLS. Without it the channel is plaintext.
    timeout_s : float
        Longest wait for one reply (the server may wait for other silos of the batch).
    server_name : str, optional
        TLS host name to verify when it differs from the address
        (``grpc.ssl_target_name_override``).

    Examples
    --------
    >>> layout = silo.layout.fingerprint()
    >>> with RelayClient(addr, token, "node-17", layout) as link:  # doctest: +SKIP
    ...     SiloTrainer(silo, link).train_step(input_ids, attention_mask)
    """

    def __init__(
        self,
        address: str,
        token: str,
        silo: str,
        layout: str,
        activation_dtype: str = "fp32",
        root_certificates: bytes | None = None,
        timeout_s: float = 600.0,
        server_name: str | None = None,
        max_frame_bytes: int = 256 * 2**20,
    ):
        self.address, self.silo, self.layout = address, str(silo), layout
        self.activation_dtype = activation_dtype
        self.timeout_s = timeout_s
        self._token = token
        self._tls = root_certificates is not None
        options = [
            ("grpc.max_receive_message_length", max_frame_bytes + 2**20),
            ("grpc.max_send_message_length", max_frame_bytes + 2**20),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._call = None
        self._reader: threading.Thread | None = None
        self._limits: FrameLimits | None = None
        self._pending: tuple[int, list[int]] | None = None
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.bytes_received: dict[str, int] = defaultdict(int)
        self.closed = False

    # -- lifecycle --------------------------------------------------------------------------
    def connect(self) -> RelayClient:
        """Open the stream, send Hello, wait for the server's Welcome."""
        stub = pb_grpc.SplitRelayStub(self._channel)
        metadata = (("authorization", f"Bearer {self._token}"), ("x-fedshield-silo", self.silo))
        self._call = stub.Stream(self._request_iter(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name=f"relay-{self.silo}", daemon=True)
        self._reader.start()
        hello = pb.SiloMessage(hello=pb.Hello(protocol=PROTOCOL_VERSION, layout=self.layout))
        try:
            reply = self._exchange(hello, "welcome", "hello", "connect")
        except BaseException:
            self.close()
            raise
        w = reply.welcome
        self._limits = FrameLimits(
            hidden_size=w.hidden_size, max_frame_bytes=w.max_frame_bytes or 2**40
        )
        return self

    def close(self) -> None:
        """End the stream (the server frees this silo's state) and the channel."""
        if self.closed:
            return
        self.closed = True
        self._requests.put(_EOF)
        if self._call is not None:
            self._call.cancel()
        self._channel.close()

    def __enter__(self) -> RelayClient:
        return self.connect() if self._call is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request_iter(self):
        while True:
            item = self._requests.get()
            if item is _EOF:
                return
            yield item

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._responses.put(resp)
        except grpc.RpcError as exc:
            self._responses.put(exc)
        finally:
            self._responses.put(_EOF)

    def _exchange(self, msg: pb.SiloMessage, want: str, kind: str, where: str):
        if self.closed:
            raise RelayError(f"silo '{self.silo}': the relay connection is closed ({where})")
        self.bytes_sent[kind] += msg.ByteSize()
        self._requests.put(msg)
        try:
            resp = self._responses.get(timeout=self.timeout_s)
        except queue.Empty:
            raise RelayError(
                f"silo '{self.silo}' {where}: no reply from the relay at {self.address} within "
                f"{self.timeout_s:g} s; check the server and split.step-timeout-s"
            ) from None
        if isinstance(resp, grpc.RpcError):
            self._responses.put(resp)  # later calls fail the same way
            code = resp.code() if hasattr(resp, "code") else None
            details = resp.details() if hasattr(resp, "details") else str(resp)
            raise RelayError(
                f"relay at {self.address} ended the stream of silo '{self.silo}' "
                f"at {where}: {code.name if code else ''} {details}",
                code,
            )
        if resp is _EOF:
            self._responses.put(_EOF)
            raise RelayError(
                f"relay at {self.address} closed the stream of silo '{self.silo}' at {where}"
            )
        self.bytes_received[kind] += resp.ByteSize()
        if resp.WhichOneof("body") != want:
            raise RelayError(
                f"silo '{self.silo}' {where}: the relay answered "
                f"'{resp.WhichOneof('body')}', expected '{want}'"
            )
        return resp

    def _encode(self, x: torch.Tensor, lengths: Sequence[int], where: str) -> pb.Activation:
        if self._limits is None:
            raise RelayError(f"silo '{self.silo}': call connect() before {where}")
        frame = encode_activation(x, lengths, self.activation_dtype)
        size = frame_nbytes(frame)
        if size > self._limits.max_frame_bytes:
            raise FrameError(
                f"silo '{self.silo}' {where}: frame of {size} bytes exceeds the relay limit of "
                f"{self._limits.max_frame_bytes} bytes; use smaller batches or data.max-length, "
                "a smaller split.activation-dtype, or raise split.max-frame-mb on the server"
            )
        return frame

    def _decode(self, msg: pb.Activation, lengths: Sequence[int], where: str) -> torch.Tensor:
        x, _ = decode_activation(
            msg, self._limits, f"relay reply to silo '{self.silo}' {where}", expect_lengths=lengths
        )
        return x

    # -- MiddleLink -------------------------------------------------------------------------
    def forward(
        self, step: int, x: torch.Tensor, lengths: Sequence[int], train: bool
    ) -> torch.Tensor:
        """Middle forward of packed head outputs; ``train`` keeps the step open for backward."""
        where = f"step {step} forward"
        lengths = [int(n) for n in lengths]
        msg = pb.SiloMessage(
            forward=pb.Forward(step=step, train=train, hidden=self._encode(x, lengths, where))
        )
        resp = self._exchange(msg, "hidden", "forward" if train else "eval", where)
        if train:
            self._pending = (step, lengths)
        return self._decode(resp.hidden, lengths, where)

    def backward(self, step: int, grad: torch.Tensor) -> torch.Tensor:
        """Send d loss / d middle output; returns d loss / d head output."""
        where = f"step {step} backward"
        if self._pending is None or self._pending[0] != step:
            raise RelayError(f"silo '{self.silo}' {where}: no training forward of that step")
        lengths = self._pending[1]
        self._pending = None
        msg = pb.SiloMessage(
            backward=pb.Backward(step=step, grad=self._encode(grad, lengths, where))
        )
        resp = self._exchange(msg, "grad", "backward", where)
        return self._decode(resp.grad, lengths, where)

    def generate(
        self, session: str, x: torch.Tensor, lengths: Sequence[int], start: bool
    ) -> torch.Tensor:
        """Middle forward of new tokens of generation ``session`` (server-side KV cache)."""
        where = f"session {session[:12]} generate"
        lengths = [int(n) for n in lengths]
        msg = pb.SiloMessage(
            generate=pb.Generate(
                session=session, start=start, hidden=self._encode(x, lengths, where)
            )
        )
        resp = self._exchange(msg, "hidden", "generate", where)
        return self._decode(resp.hidden, lengths, where)

    def end_session(self, session: str) -> None:
        """Free the server's KV cache of ``session``."""
        if self.closed:
            return
        self._exchange(
            pb.SiloMessage(end=pb.EndSession(session=session)),
            "ack",
            "end",
            f"session {session[:12]} end",
        )

    # -- accounting -------------------------------------------------------------------------
    def traffic(self) -> dict[str, int]:
        """Bytes on the wire (serialized messages) per direction and kind."""
        out = {f"sent_{k}": v for k, v in self.bytes_sent.items()}
        out.update({f"received_{k}": v for k, v in self.bytes_received.items()})
        out["total"] = sum(self.bytes_sent.values()) + sum(self.bytes_received.values())
        return out
