"""The relay the ServerApp hosts: a gRPC service that runs the middle blocks for the silos.

:class:`RelayServer` wraps a :class:`~fedshield_flwr.models.split.MiddleServer`. One bidirectional
stream per silo and round (``relay.proto``). Per-round bearer tokens, issued by the ServerApp with
:meth:`RelayServer.issue_token` and sent to each silo in its Flower train message, authenticate
the stream; unknown, revoked or expired tokens are refused (also in the middle of a stream).

Client batching: one scheduler thread owns the model. A training forward from any silo opens a
batching window of ``split.batch-window-ms``; every silo's forward that arrives in it (the window
closes at once when every connected silo has sent one) joins a single padded middle forward. The
server then waits for each member's gradient, up to ``split.step-timeout-s``; a member that
disconnects or times out is dropped from the step (its rows get no gradient, its state is freed)
and the others go on. One batched backward follows, then one optimizer step of the middle adapter
with the gradient averaged over contributing silos. Forwards arriving meanwhile wait for the next
group; eval and generation requests are served between groups.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from ..models.split import MiddleServer, PendingStep, SplitError, SplitSettings
from . import relay_pb2 as pb
from . import relay_pb2_grpc as pb_grpc
from .frames import FrameError, FrameLimits, decode_activation, encode_activation

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
_WIRE_TO_CONFIG = {"float32": "fp32", "float16": "fp16", "int8": "int8"}


class RelayError(RuntimeError):
    """A relay call failed; carries the gRPC status code when the server refused it."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class _Dropped(Exception):
    """A silo was dropped from its step (disconnect, timeout, error); the text says why."""


@dataclass
class _Token:
    silo: str
    round: int
    expires: float


@dataclass
class _Conn:
    """Server-side state of one silo stream."""

    id: int
    silo: str
    token_hash: str
    round: int
    alive: bool = True
    reason: str = ""
    expect: tuple[int, list[int]] | None = None  # (step, lengths) awaiting its gradient
    sessions: set[str] = field(default_factory=set)

    @property
    def owner(self) -> str:
        return f"silo '{self.silo}'"


@dataclass
class _Request:
    kind: str  # train | eval | backward | generate | end
    conn: _Conn
    step: int = 0
    x: torch.Tensor | None = None
    lengths: list[int] = field(default_factory=list)
    session: str = ""
    start: bool = False
    arrived: float = field(default_factory=time.monotonic)
    future: futures.Future = field(default_factory=futures.Future)


@dataclass
class _Group:
    members: list[_Request]
    pending: PendingStep
    deadline: float
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # conn id -> grad
    backward_reqs: dict[int, _Request] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)

    def settled(self) -> bool:
        return all(m.conn.id in self.grads or m.conn.id in self.dropped for m in self.members)


@dataclass
class RelayStats:
    """Counters of a relay server (read with :meth:`RelayServer.stats`)."""

    groups: int = 0  # batched middle training steps
    silo_steps: int = 0  # silo forwards that joined a group
    max_group_size: int = 0
    tokens: int = 0  # real tokens through the middle in training
    eval_forwards: int = 0
    generate_steps: int = 0
    rejected_auth: int = 0
    rejected_frames: int = 0
    drops: list[str] = field(default_factory=list)  # last 100 "silo 'x' step 3: reason"
    connected: int = 0
    sessions: int = 0
    compute_seconds: float = 0.0  # time the scheduler spent running the middle blocks

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, drops=list(self.drops))


class _Scheduler:
    """Owns the middle model: groups training forwards, runs compute on one thread."""

    def __init__(self, middle: MiddleServer, settings: SplitSettings, stats: RelayStats):
        self.middle, self.settings, self.stats = middle, settings, stats
        self.cond = threading.Condition()
        self.conns: dict[int, _Conn] = {}
        self.train_q: list[_Request] = []
        self.other_q: deque[_Request] = deque()
        self.group: _Group | None = None
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="relay-scheduler", daemon=True)
        self.thread.start()

    # -- called from servicer threads -------------------------------------------------------
    def register(self, conn: _Conn) -> None:
        """Admit a new stream; an older stream of the same silo (a restart) is dropped."""
        with self.cond:
            for old in [c for c in self.conns.values() if c.silo == conn.silo]:
                self._drop_locked(old, "replaced by a newer stream of the same silo")
            self.conns[conn.id] = conn
            self.stats.connected = len(self.conns)
            self.cond.notify_all()

    def submit(self, req: _Request) -> futures.Future:
        with self.cond:
            if not req.conn.alive:
                req.future.set_exception(_Dropped(req.conn.reason))
            elif req.kind == "train":
                self.train_q.append(req)
            elif req.kind == "backward":
                g = self.group
                if g is None or req.conn.id not in {m.conn.id for m in g.members}:
                    req.future.set_exception(
                        _Dropped(
                            f"{req.conn.owner} sent the gradient of step {req.step} but that step "
                            "is no longer pending on the server"
                        )
                    )
                else:
                    g.grads[req.conn.id] = req.x
                    g.backward_reqs[req.conn.id] = req
            else:
                self.other_q.append(req)
            self.cond.notify_all()
        return req.future

    def drop(self, conn: _Conn, reason: str) -> None:
        """Remove ``conn`` from pending work and free its state (idempotent)."""
        with self.cond:
            self._drop_locked(conn, reason)

    def _drop_locked(self, conn: _Conn, reason: str) -> None:
        if conn.alive:
            conn.alive, conn.reason = False, reason
            self.conns.pop(conn.id, None)
            for q in (self.train_q, self.other_q):
                for r in [r for r in q if r.conn is conn]:
                    q.remove(r)
                    r.future.set_exception(_Dropped(reason))
            g = self.group
            member = g is not None and any(m.conn is conn for m in g.members)
            if member and conn.id not in g.grads and conn.id not in g.dropped:
                g.dropped.add(conn.id)
                step = conn.expect[0] if conn.expect else "?"
                self.stats.drops = [*self.stats.drops[-99:], f"{conn.owner} step {step}: {reason}"]
                log.warning("relay: %s dropped from step %s: %s", conn.owner, step, reason)
            self.stats.connected = len(self.conns)
        if conn.sessions and not any(r.kind == "free" and r.conn is conn for r in self.other_q):
            self.other_q.append(_Request("free", conn))
        self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            for c in list(self.conns.values()):
                c.alive, c.reason = False, "the relay is shutting down"
            for q in (self.train_q, self.other_q):
                for r in q:
                    r.future.set_exception(_Dropped("the relay is shutting down"))
                q.clear()
            if self.group is not None:
                for r in self.group.backward_reqs.values():
                    if not r.future.done():
                        r.future.set_exception(_Dropped("the relay is shutting down"))
                self.group = None
            self.cond.notify_all()
        self.thread.join(timeout=10)

    # -- the scheduler thread ---------------------------------------------------------------
    def _next_job(self):
        """Under the lock: decide what to run next, or how long to wait."""
        now = time.monotonic()
        if self.other_q:
            return ("other", self.other_q.popleft()), None
        g = self.group
        if g is not None:
            if g.settled():
                self.group = None
                return ("backward", g), None
            if now >= g.deadline:
                for m in g.members:
                    if m.conn.id not in g.grads:
                        self._drop_locked(
                            m.conn,
                            (
                                f"no gradient for step {m.step} within "
                                f"split.step-timeout-s={self.settings.step_timeout_s:g} s"
                            ),
                        )
                        g.dropped.add(m.conn.id)
                return None, 0.0
            return None, g.deadline - now
        if self.train_q:
            window_end = self.train_q[0].arrived + self.settings.batch_window_ms / 1000.0
            waiting = {r.conn.id for r in self.train_q}
            everyone = all(cid in waiting for cid in self.conns)
            if everyone or now >= window_end:
                members, seen = [], set()
                for r in list(self.train_q):
                    if r.conn.id not in seen:  # one forward per silo per group
                        seen.add(r.conn.id)
                        members.append(r)
                        self.train_q.remove(r)
                return ("forward", members), None
            return None, window_end - now
        return None, None

    def _loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    if not self.running:
                        return
                    job, wait = self._next_job()
                    if job is not None:
                        break
                    if wait is None or wait > 0:
                        self.cond.wait(timeout=wait)
            kind, item = job
            t0 = time.perf_counter()
            try:
                if kind == "forward":
                    self._run_forward(item)
                elif kind == "backward":
                    self._run_backward(item)
                else:
                    self._run_other(item)
            except Exception as exc:  # noqa: BLE001 - reported to the waiting silos
                log.exception("relay: %s job failed", kind)
                reqs = (
                    item
                    if kind == "forward"
                    else list(item.backward_reqs.values())
                    if kind == "backward"
                    else [item]
                )
                for r in reqs:
                    if not r.future.done():
                        r.future.set_exception(exc)
            finally:
                self.stats.compute_seconds += time.perf_counter() - t0

    def _run_forward(self, members: list[_Request]) -> None:
        outs, pending = self.middle.forward(
            [(r.x, r.lengths) for r in members], True, self.stats.groups
        )
        with self.cond:
            self.group = _Group(members, pending, time.monotonic() + self.settings.step_timeout_s)
            self.stats.groups += 1
            self.stats.silo_steps += len(members)
            self.stats.max_group_size = max(self.stats.max_group_size, len(members))
            self.stats.tokens += sum(sum(m.lengths) for m in members)
            for m, out in zip(members, outs):
                if m.conn.alive:
                    m.conn.expect = (m.step, m.lengths)
                    m.future.set_result(out)
                else:  # dropped while the forward ran
                    self.group.dropped.add(m.conn.id)
                    m.future.set_exception(_Dropped(m.conn.reason))
            self.cond.notify_all()

    def _run_backward(self, g: _Group) -> None:
        grads = [g.grads.get(m.conn.id) if m.conn.id not in g.dropped else None for m in g.members]
        outs = self.middle.backward(g.pending, grads)
        for m, out in zip(g.members, outs):
            req = g.backward_reqs.get(m.conn.id)
            if req is not None and out is not None and not req.future.done():
                req.future.set_result(out)

    def _run_other(self, r: _Request) -> None:
        owner = r.conn.owner
        if r.kind == "eval":
            outs, _ = self.middle.forward([(r.x, r.lengths)], False)
            self.stats.eval_forwards += 1
            r.future.set_result(outs[0])
        elif r.kind == "generate":
            try:
                out = self.middle.generate(owner, r.session, r.x, r.lengths, r.start)
            except SplitError as exc:
                r.future.set_exception(exc)
                return
            with self.cond:
                if r.conn.alive:
                    r.conn.sessions.add(r.session)
                else:  # the silo left while this step ran: free at once
                    self.middle.end_session(owner, r.session)
            self.stats.generate_steps += 1
            self.stats.sessions = self.middle.num_sessions
            r.future.set_result(out)
        elif r.kind == "end":
            self.middle.end_session(owner, r.session)
            r.conn.sessions.discard(r.session)
            self.stats.sessions = self.middle.num_sessions
            r.future.set_result(None)
        elif r.kind == "free":
            self.middle.end_sessions(owner)
            r.conn.sessions.clear()
            self.stats.sessions = self.middle.num_sessions


class _Servicer(pb_grpc.SplitRelayServicer):
    def __init__(self, relay: RelayServer):
        self.relay = relay
        self.ids = itertools.count(1)

    def _abort(self, context, conn: _Conn | None, code: grpc.StatusCode, message: str):
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
        conn = _Conn(next(self.ids), tok.silo, _hash(token), tok.round)
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
                except _Dropped as exc:
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

    def _request(self, conn: _Conn, msg: pb.SiloMessage) -> tuple[_Request, str]:
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
                _Request("train" if f.train else "eval", conn, f.step, x, lens),
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
            return _Request("backward", conn, b.step, g, lens), _WIRE_TO_CONFIG[b.grad.values.dtype]
        if kind == "generate":
            gm = msg.generate
            if not gm.session or len(gm.session) > 128:
                raise FrameError(f"{conn.owner}: generation session ids must be 1-128 chars")
            x, lens = decode_activation(
                gm.hidden, limits, f"{conn.owner} session {gm.session[:40]} generate"
            )
            return (
                _Request("generate", conn, 0, x, lens, gm.session, gm.start),
                _WIRE_TO_CONFIG[gm.hidden.values.dtype],
            )
        if kind == "end":
            return _Request("end", conn, 0, session=msg.end.session), "fp32"
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
        self._scheduler: _Scheduler | None = None
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
        self._scheduler = _Scheduler(self.middle, self.settings, self._stats)
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
