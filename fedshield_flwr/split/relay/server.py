"""The relay the ServerApp hosts: a gRPC service that runs the middle blocks for the silos.

:class:`RelayServer` wraps a :class:`~fedshield_flwr.split.middle.MiddleServer`. One bidirectional
stream per silo and round (``relay.proto``). Per-round bearer tokens, issued by the ServerApp with
:meth:`RelayServer.issue_token` and sent to each silo in its Flower train message, authenticate
the stream; unknown, revoked or expired tokens are refused (also in the middle of a stream).

Client batching is :mod:`.scheduler`'s.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from fedshield_flwr.split.arch import SplitError
from fedshield_flwr.split.middle import MiddleServer
from fedshield_flwr.split.relay import relay_pb2 as pb
from fedshield_flwr.split.relay import relay_pb2_grpc as pb_grpc
from fedshield_flwr.split.relay.frames import (
    FrameError,
    FrameLimits,
    decode_activation,
    encode_activation,
)
from fedshield_flwr.split.relay.scheduler import Conn, Dropped, RelayStats, Request, Scheduler
from fedshield_flwr.split.settings import SplitSettings

log = logging.getLogger(__name__)


PROTOCOL_VERSION = 1


_WIRE_TO_CONFIG = {"float32": "fp32", "float16": "fp16", "int8": "int8"}


class RelayError(RuntimeError):
    """A relay call failed; carries the gRPC status code when the server refused it."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class _Token:
    silo: str
    round: int
    expires: float


class _Servicer(pb_grpc.SplitRelayServicer):
    def __init__(self, relay: RelayServer):
        self.relay = relay
        self.ids = itertools.count(1)

    def _abort(self, context, conn: Conn | None, code: grpc.StatusCode, message: str):
        if conn is not None:
            self.relay._scheduler.drop(conn, message)
        log.warning("relay: refused: %s", message)
        context.abort(code, message)

    def Stream(self, request_iterator, context) -> Iterator[pb.ServerMessage]:  # noqa: N802
        relay = self.relay
        meta = dict(context.invocation_metadata())
        claimed = str(meta.get("x-fedshield-silo", "?"))[:64]
        auth = str(meta.get("authorization", ""))
        token = auth[7:] if auth.startswith("Bearer ") else ""
        ok, why, tok = relay._check_token(token, claimed)
        if not ok:
            relay._stats.rejected_auth += 1
            self._abort(context, None, grpc.StatusCode.UNAUTHENTICATED, f"silo '{claimed}': {why}")
        conn = Conn(next(self.ids), tok.silo, _hash(token), tok.round)
        context.add_callback(lambda: relay._scheduler.drop(conn, "the silo disconnected"))
        relay._scheduler.register(conn)
        limits = relay._limits
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("body") != "hello":
                self._abort(
                    context,
                    conn,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{conn.owner}: the first message of a relay stream must be Hello",
                )
            hello = first.hello
            if hello.protocol != PROTOCOL_VERSION or hello.layout != relay.layout:
                self._abort(
                    context,
                    conn,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{conn.owner}: protocol {hello.protocol} / model layout "
                    f"'{hello.layout[:120]}' does not match the server's protocol "
                    f"{PROTOCOL_VERSION} / '{relay.layout}'; run the same model.name, "
                    "split.head-layers and split.tail-layers and library version on every party",
                )
            yield pb.ServerMessage(
                welcome=pb.Welcome(
                    protocol=PROTOCOL_VERSION,
                    layout=relay.layout,
                    max_frame_bytes=limits.max_frame_bytes,
                    hidden_size=limits.hidden_size,
                )
            )
            for msg in request_iterator:
                ok, why, _ = relay._check_token(token, conn.silo)
                if not ok:
                    relay._stats.rejected_auth += 1
                    self._abort(
                        context, conn, grpc.StatusCode.UNAUTHENTICATED, f"{conn.owner}: {why}"
                    )
                try:
                    req, dtype = self._request(conn, msg)
                except FrameError as exc:
                    relay._stats.rejected_frames += 1
                    self._abort(context, conn, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                try:
                    result = relay._scheduler.submit(req).result()
                except Dropped as exc:
                    self._abort(
                        context,
                        conn,
                        grpc.StatusCode.ABORTED,
                        f"{conn.owner} step {req.step}: dropped by the relay: {exc}",
                    )
                except SplitError as exc:
                    self._abort(context, conn, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
                except Exception as exc:  # noqa: BLE001
                    self._abort(
                        context,
                        conn,
                        grpc.StatusCode.INTERNAL,
                        f"{conn.owner} step {req.step}: the server failed to compute "
                        f"the {req.kind} pass ({type(exc).__name__}: {exc})",
                    )
                if req.kind == "end":
                    yield pb.ServerMessage(step=req.step, ack=pb.Ack())
                    continue
                frame = encode_activation(result, req.lengths, dtype)
                if req.kind == "backward":
                    yield pb.ServerMessage(step=req.step, grad=frame)
                else:
                    yield pb.ServerMessage(step=req.step, hidden=frame)
        finally:
            relay._scheduler.drop(conn, conn.reason or "the stream ended")

    def _request(self, conn: Conn, msg: pb.SiloMessage) -> tuple[Request, str]:
        """Decode and validate one silo message into a scheduler request."""
        kind = msg.WhichOneof("body")
        limits = self.relay._limits
        if kind == "forward":
            f = msg.forward
            if f.train and conn.expect is not None:
                raise FrameError(
                    f"{conn.owner} step {f.step}: new training forward while the "
                    f"gradient of step {conn.expect[0]} is outstanding"
                )
            x, lens = decode_activation(f.hidden, limits, f"{conn.owner} step {f.step} forward")
            return (
                Request("train" if f.train else "eval", conn, f.step, x, lens),
                _WIRE_TO_CONFIG[f.hidden.values.dtype],
            )
        if kind == "backward":
            b = msg.backward
            if conn.expect is None or conn.expect[0] != b.step:
                raise FrameError(
                    f"{conn.owner} step {b.step}: gradient without a pending training forward "
                    f"(pending: {conn.expect[0] if conn.expect else 'none'})"
                )
            g, lens = decode_activation(
                b.grad,
                limits,
                f"{conn.owner} step {b.step} backward",
                expect_lengths=conn.expect[1],
            )
            conn.expect = None
            return Request("backward", conn, b.step, g, lens), _WIRE_TO_CONFIG[b.grad.values.dtype]
        if kind == "generate":
            gm = msg.generate
            if not gm.session or len(gm.session) > 128:
                raise FrameError(f"{conn.owner}: generation session ids must be 1-128 chars")
            x, lens = decode_activation(
                gm.hidden, limits, f"{conn.owner} session {gm.session[:40]} generate"
            )
            return (
                Request("generate", conn, 0, x, lens, gm.session, gm.start),
                _WIRE_TO_CONFIG[gm.hidden.values.dtype],
            )
        if kind == "end":
            return Request("end", conn, 0, session=msg.end.session), "fp32"
        raise FrameError(f"{conn.owner}: unexpected message '{kind}' on an open relay stream")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RelayServer:
    """Hosts the middle blocks behind the gRPC relay (one per ServerApp run).

    Parameters
    ----------
    middle : MiddleServer
        The server's part of the model (its adapter is trained by the relay).
    settings : SplitSettings
        ``split.*`` settings: batching window, step timeout, frame limit, token lifetime.
    max_workers : int
        gRPC worker threads; each connected silo holds one for its stream.

    Examples
    --------
    >>> relay = RelayServer(middle, settings)
    >>> port = relay.start(port=0)                      # doctest: +SKIP
    >>> token = relay.issue_token("node-17", round=3)   # doctest: +SKIP
    >>> relay.revoke_round(3); relay.stop()             # doctest: +SKIP
    """

    def __init__(self, middle: MiddleServer, settings: SplitSettings, max_workers: int = 64):
        self.middle = middle
        self.settings = settings
        self.layout = middle.layout.fingerprint()
        self.max_workers = max_workers
        self._limits = FrameLimits(
            middle.layout.hidden_size, settings.max_frame_bytes, middle.layout.max_positions
        )
        self._tokens: dict[str, _Token] = {}
        self._tokens_lock = threading.Lock()
        self._stats = RelayStats()
        self._scheduler: Scheduler | None = None
        self._server: grpc.Server | None = None
        self.port: int | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(
        self,
        port: int = 0,
        host: str = "0.0.0.0",
        certificates: tuple[bytes, bytes, bytes] | None = None,
    ) -> int:
        """Start serving; returns the bound port (``port=0``: chosen by the OS).

        Parameters
        ----------
        port : int
        host : str
            Interface to bind ("0.0.0.0" all, "127.0.0.1" loopback only).
        certificates : (ca_cert, server_cert, server_key) as PEM bytes, optional
            Serve TLS (Flower's convention). Without it the relay is plaintext: use only on
            loopback or inside a trusted network.
        """
        if self._server is not None:
            raise RelayError("the relay is already started; stop() it first")
        self._scheduler = Scheduler(self.middle, self.settings, self._stats)
        limit = 2 * self.settings.max_frame_bytes + 2**20  # hard gRPC ceiling, above our check
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self.max_workers, thread_name_prefix="relay-rpc"
            ),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
            maximum_concurrent_rpcs=self.max_workers - 1,
        )
        pb_grpc.add_SplitRelayServicer_to_server(_Servicer(self), server)
        address = f"{host}:{port}"
        if certificates is not None:
            ca, cert, key = certificates
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=False
            )
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
        if not bound:
            raise RelayError(f"the relay could not bind {address}; choose another port")
        server.start()
        self._server, self.port = server, bound
        log.info(
            "relay serving the middle blocks (%s) on %s:%d%s",
            self.layout,
            host,
            bound,
            " with TLS" if certificates else "",
        )
        return bound

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving and release the scheduler thread (idempotent)."""
        if self._scheduler is not None:
            self._scheduler.stop()
        if self._server is not None:
            self._server.stop(grace).wait(grace + 5)
        self._server, self._scheduler = None, None

    def __enter__(self) -> RelayServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- tokens -----------------------------------------------------------------------------
    def issue_token(self, silo: str, round: int, ttl_s: float | None = None) -> str:
        """A fresh bearer token that lets ``silo`` use the relay in ``round``.

        The ServerApp sends it (with the relay address) in the silo's train message. The relay
        stores only its SHA-256; the token is bound to the silo name it was issued to.
        """
        token = secrets.token_urlsafe(32)
        ttl = self.settings.token_ttl_s if ttl_s is None else ttl_s
        with self._tokens_lock:
            now = time.time()
            self._tokens = {h: t for h, t in self._tokens.items() if t.expires > now}
            self._tokens[_hash(token)] = _Token(str(silo), int(round), now + ttl)
        return token

    def revoke_round(self, round: int) -> int:
        """Invalidate every token of ``round`` (open streams fail on their next message)."""
        with self._tokens_lock:
            old = [h for h, t in self._tokens.items() if t.round == round]
            for h in old:
                del self._tokens[h]
        return len(old)

    def _check_token(self, token: str, silo: str) -> tuple[bool, str, _Token | None]:
        with self._tokens_lock:
            tok = self._tokens.get(_hash(token)) if token else None
        if tok is None:
            return (
                False,
                (
                    "relay token missing, unknown or revoked; use the token of the "
                    "current round from the server's train message"
                ),
                None,
            )
        if tok.silo != silo:
            return (
                False,
                (
                    f"relay token was issued to silo '{tok.silo}', not to this silo; "
                    "each silo must use its own token"
                ),
                None,
            )
        if time.time() > tok.expires:
            return (
                False,
                (
                    f"relay token of round {tok.round} expired; the round took longer "
                    "than split.token-ttl-s or the silo reused an old token"
                ),
                None,
            )
        return True, "", tok

    # -- state ------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """Loopback ``127.0.0.1:port`` (tests, same host); silos elsewhere dial
        ``split.relay-host`` with :attr:`port`."""
        if self.port is None:
            raise RelayError("the relay is not started")
        return f"127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        """Counters: groups, silo steps, max group size, tokens, drops, connected, sessions."""
        s = self._stats.as_dict()
        s["sessions"] = self.middle.num_sessions
        return s
