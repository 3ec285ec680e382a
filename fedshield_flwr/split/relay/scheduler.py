"""Client batching in the relay: one scheduler thread owns the middle model.

A training forward from any silo opens a batching window of ``split.batch-window-ms``; every
silo's forward that arrives in it (the window closes at once when every connected silo has sent
one) joins a single padded middle forward. The scheduler then waits for each member's gradient,
up to ``split.step-timeout-s``; a member that disconnects or times out is dropped from the step
(its rows get no gradient, its state is freed) and the others go on. One batched backward
follows, then one optimizer step of the middle adapter with the gradient averaged over
contributing silos. Forwards arriving meanwhile wait for the next group; eval and generation
requests are served between groups.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import torch

from fedshield_flwr.split.arch import SplitError
from fedshield_flwr.split.middle import MiddleServer, PendingStep
from fedshield_flwr.split.settings import SplitSettings

log = logging.getLogger("fedshield_flwr.split.relay.server")


class Dropped(Exception):
    """A silo was dropped from its step (disconnect, timeout, error); the text says why."""


@dataclass
class Conn:
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
class Request:
    kind: str  # train | eval | backward | generate | end
    conn: Conn
    step: int = 0
    x: torch.Tensor | None = None
    lengths: list[int] = field(default_factory=list)
    session: str = ""
    start: bool = False
    arrived: float = field(default_factory=time.monotonic)
    future: futures.Future = field(default_factory=futures.Future)


@dataclass
class Group:
    members: list[Request]
    pending: PendingStep
    deadline: float
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # conn id -> grad
    backward_reqs: dict[int, Request] = field(default_factory=dict)
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


class Scheduler:
    """Owns the middle model: groups training forwards, runs compute on one thread."""

    def __init__(self, middle: MiddleServer, settings: SplitSettings, stats: RelayStats):
        self.middle, self.settings, self.stats = middle, settings, stats
        self.cond = threading.Condition()
        self.conns: dict[int, Conn] = {}
        self.train_q: list[Request] = []
        self.other_q: deque[Request] = deque()
        self.group: Group | None = None
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="relay-scheduler", daemon=True)
        self.thread.start()

    # -- called from servicer threads -------------------------------------------------------
    def register(self, conn: Conn) -> None:
        """Admit a new stream; an older stream of the same silo (a restart) is dropped."""
        with self.cond:
            for old in [c for c in self.conns.values() if c.silo == conn.silo]:
                self._drop_locked(old, "replaced by a newer stream of the same silo")
            self.conns[conn.id] = conn
            self.stats.connected = len(self.conns)
            self.cond.notify_all()

    def submit(self, req: Request) -> futures.Future:
        with self.cond:
            if not req.conn.alive:
                req.future.set_exception(Dropped(req.conn.reason))
            elif req.kind == "train":
                self.train_q.append(req)
            elif req.kind == "backward":
                g = self.group
                if g is None or req.conn.id not in {m.conn.id for m in g.members}:
                    req.future.set_exception(
                        Dropped(
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

    def drop(self, conn: Conn, reason: str) -> None:
        """Remove ``conn`` from pending work and free its state (idempotent)."""
        with self.cond:
            self._drop_locked(conn, reason)

    def _drop_locked(self, conn: Conn, reason: str) -> None:
        if conn.alive:
            conn.alive, conn.reason = False, reason
            self.conns.pop(conn.id, None)
            for q in (self.train_q, self.other_q):
                for r in [r for r in q if r.conn is conn]:
                    q.remove(r)
                    r.future.set_exception(Dropped(reason))
            g = self.group
            member = g is not None and any(m.conn is conn for m in g.members)
            if member and conn.id not in g.grads and conn.id not in g.dropped:
                g.dropped.add(conn.id)
                step = conn.expect[0] if conn.expect else "?"
                self.stats.drops = [*self.stats.drops[-99:], f"{conn.owner} step {step}: {reason}"]
                log.warning("relay: %s dropped from step %s: %s", conn.owner, step, reason)
            self.stats.connected = len(self.conns)
        if conn.sessions and not any(r.kind == "free" and r.conn is conn for r in self.other_q):
            self.other_q.append(Request("free", conn))
        self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            for c in list(self.conns.values()):
                c.alive, c.reason = False, "the relay is shutting down"
            for q in (self.train_q, self.other_q):
                for r in q:
                    r.future.set_exception(Dropped("the relay is shutting down"))
                q.clear()
            if self.group is not None:
                for r in self.group.backward_reqs.values():
                    if not r.future.done():
                        r.future.set_exception(Dropped("the relay is shutting down"))
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

    def _run_forward(self, members: list[Request]) -> None:
        outs, pending = self.middle.forward(
            [(r.x, r.lengths) for r in members], True, self.stats.groups
        )
        with self.cond:
            self.group = Group(members, pending, time.monotonic() + self.settings.step_timeout_s)
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
                    m.future.set_exception(Dropped(m.conn.reason))
            self.cond.notify_all()

    def _run_backward(self, g: Group) -> None:
        grads = [g.grads.get(m.conn.id) if m.conn.id not in g.dropped else None for m in g.members]
        outs = self.middle.backward(g.pending, grads)
        for m, out in zip(g.members, outs):
            req = g.backward_reqs.get(m.conn.id)
            if req is not None and out is not None and not req.future.done():
                req.future.set_result(out)

    def _run_other(self, r: Request) -> None:
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
