"""The round loop every FedShield strategy shares, and reply validation helpers.

Flower's ``Strategy.start`` runs rounds 1..N with no hook between rounds. Federated fine-tuning
needs more: evaluation of the initial adapter on the silos (round 0), resuming at round k from a
checkpoint, counting payload bytes up/down, timing each round, and a callback after every round
(the ServerApp writes metrics and checkpoints there). :class:`RoundLoop` provides that and calls
the strategy's usual hooks (``configure_train``/``aggregate_train``/``configure_evaluate``/
``aggregate_evaluate``), so a strategy overrides only what differs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedshield_flwr.dp.report import DP_EPSILON, DP_EPSILON_NEXT, budget_exceeded
from fedshield_flwr.protocol import (
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    GENERATION_KEYS,
    METRICS,
    NUM_EXAMPLES,
    NUM_GENERATED,
    NUM_TOKENS,
    ROUND,
    TIMING_KEYS,
    TRAIN_LOSS,
    check_reply_round,
)
from fedshield_flwr.wire import record_bytes

# record level DP: what a silo reports -> the round metric (the max over silos is reported)
RECORD_DP_KEYS = ((DP_EPSILON, "dp_epsilon"), (DP_EPSILON_NEXT, "dp_epsilon_next"),
                  ("dp-noise-multiplier", "dp_noise_multiplier"))

log = logging.getLogger("fedshield.server")


@dataclass
class RoundRecord:
    """What one round did; becomes a row of ``metrics.json``."""

    round: int
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    replies: int = 0
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        row = {k: v for k, v in self.__dict__.items() if k != "extra"}
        row.update(self.extra)
        return row


def split_replies(
    replies: Iterable[Message], server_round: int, phase: str,
    destinations: Mapping[str, int] | None = None,
) -> tuple[list[Message], list[str]]:
    """Drop error replies and duplicates (same node twice); return (kept, problems).

    ``destinations`` maps the ids of the messages sent to the silos they went to: an error reply
    that the SuperLink writes for an unreachable silo has the SuperLink as its source, and the
    problem must name the silo.
    """
    problems: list[str] = []
    kept = list(accepted(replies, server_round, phase, lambda: destinations, problems))
    return kept, problems


def accepted(replies: Iterable[Message], server_round: int, phase: str,
             destinations: Callable[[], Mapping[str, int] | None],
             problems: list[str]) -> Iterator[Message]:
    """Yield each reply that is not an error or a duplicate (:func:`split_replies` as a stream).

    ``destinations`` is called for each error reply: a :class:`ReplyStream` sets the message
    ids of the round only once it has pushed them, after this generator was created.
    Problems are appended to ``problems`` as they are met; only the ids of the senders seen so
    far are kept, never the replies.
    """
    seen: set[int] = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            node = (destinations() or {}).get(msg.metadata.reply_to_message_id, node)
            problems.append(f"silo node {node} failed {phase} in round {server_round}: "
                            f"{msg.error.reason}")
            continue
        if node in seen:
            problems.append(f"silo node {node} sent a duplicated {phase} reply in round "
                            f"{server_round}; the first one is kept")
            continue
        seen.add(node)
        yield msg


class MetricsFold:
    """Weighted train loss, total examples and mean timings, folded one reply at a time.

    The weighted train loss, examples, timings and record-level epsilon (the max over silos:
    each silo protects its own rows, so the federation's guarantee is the weakest) of the
    accepted replies, without keeping the replies.
    """

    def __init__(self) -> None:
        self.count = 0
        self.examples = 0.0
        self._loss = [0.0, 0.0]  # weighted sum, weight
        self._timings: dict[str, list[float]] = {}
        self._dp: dict[str, float] = {}  # record-level DP: the max over silos (weakest guarantee)

    def add(self, msg: Message, metrics_key: str = METRICS) -> None:
        rec = msg.content.metric_records.get(metrics_key) or {}
        self.count += 1
        for key, name in RECORD_DP_KEYS:
            if key in rec:
                self._dp[name] = max(self._dp.get(name, float("-inf")), float(rec[key]))
        w = float(rec.get(NUM_EXAMPLES, 1.0))
        self.examples += float(rec.get(NUM_EXAMPLES, 0.0))
        if TRAIN_LOSS in rec:
            self._loss[0] += float(rec[TRAIN_LOSS]) * w
            self._loss[1] += w
        for key in TIMING_KEYS:
            if key in rec:
                acc = self._timings.setdefault("silo_" + key.replace("-", "_"), [0.0, 0.0])
                acc[0] += float(rec[key])
                acc[1] += 1

    def record(self, num_examples: float | None = None, **extra: float) -> MetricRecord:
        loss = self._loss[0] / self._loss[1] if self._loss[1] > 0 else 0.0
        timings = {k: v[0] / v[1] for k, v in self._timings.items()}
        n = self.examples if num_examples is None else num_examples
        return MetricRecord({TRAIN_LOSS: float(loss), NUM_EXAMPLES: int(n), **extra, **timings,
                             **self._dp})


class WeightedSum:
    """The running FedAvg of adapter states: two float64 arrays per tensor, whatever the silos.

    :meth:`add` folds ``weight * state`` into compensated float64 sums (Neumaier: a sum and the
    exact rounding errors it dropped) and keeps no state; :meth:`mean` is
    ``sum_i w_i x_i / sum_i w_i`` rounded to float32. With integer weights (num-examples) each
    product of a float32 value is exact in float64 and the compensated sum is the exact sum
    rounded once, so the result does not depend on the order in which replies arrive (reruns
    and resumed runs are bit-identical), except for sums beyond ~100 bits of dynamic range.
    Memory: two float64 copies of the adapter, independent of the number of silos.
    """

    def __init__(self) -> None:
        self.sums: OrderedDict[str, np.ndarray] | None = None
        self.errors: OrderedDict[str, np.ndarray] | None = None
        self.total = 0.0
        self.count = 0

    def add(self, state: Mapping[str, np.ndarray], weight: float) -> None:
        w = float(weight)
        if self.sums is None:
            self.sums = OrderedDict((k, np.asarray(v, np.float64) * w) for k, v in state.items())
            self.errors = OrderedDict((k, np.zeros_like(v)) for k, v in self.sums.items())
        else:
            assert self.errors is not None
            for k, acc in self.sums.items():
                x = np.asarray(state[k], np.float64) * w
                t = acc + x
                # Neumaier: the part of (acc + x) that the float64 sum t rounded away, exactly
                self.errors[k] += np.where(np.abs(acc) >= np.abs(x), (acc - t) + x, (x - t) + acc)
                acc[...] = t
        self.total += w
        self.count += 1

    def sum(self) -> OrderedDict[str, np.ndarray]:
        """The compensated float64 sums ``sum_i w_i x_i``."""
        if self.sums is None or self.errors is None:
            raise ValueError("weighted sum: nothing was added")
        return OrderedDict((k, v + self.errors[k]) for k, v in self.sums.items())

    def mean(self) -> OrderedDict[str, np.ndarray]:
        if self.sums is None or self.errors is None or not self.total > 0:
            raise ValueError("weighted mean: no weight was added (the weights sum to zero)")
        return OrderedDict((k, ((v + self.errors[k]) / self.total).astype(np.float32))
                           for k, v in self.sums.items())


class ReplyStream:
    """The replies to ``messages``, yielded one at a time as the SuperLink receives them.

    ``grid.send_and_receive`` returns only when every reply is in (or the timeout passed) and
    holds them all; this pushes the messages, then polls (one ``pull_messages`` per
    ``pull_interval``, at most 0.5 s) and yields each reply as soon as it is pulled, so only the
    replies that arrived since the previous poll are held before the consumer folds them. Bytes
    up and down are counted on the way; silos that did not answer in time are logged when the
    stream ends.
    """

    def __init__(self, loop: RoundLoop, grid: Grid, messages: Iterable[Message],
                 timeout: float) -> None:
        self.loop, self.grid, self.timeout = loop, grid, timeout
        self.messages = list(messages)
        self.down = sum(record_bytes(m.content) for m in self.messages)
        self.up = 0
        self.received = 0
        self._gen: Iterator[Message] | None = None

    def __iter__(self) -> Iterator[Message]:
        if self._gen is not None:
            raise RuntimeError("a ReplyStream can be consumed once")
        self._gen = self._replies()
        return self._gen

    def _replies(self) -> Iterator[Message]:
        if not self.messages:
            return
        kind = self.messages[0].metadata.message_type
        pending = list(self.grid.push_messages(self.messages))
        # The grid has set each message's id: remember which silo it went to (see accepted()).
        self.loop.destinations = {m.metadata.message_id: m.metadata.dst_node_id
                                  for m in self.messages}
        self.messages = []  # the payloads sent are not needed any more
        waiting = set(pending)
        interval = min(float(getattr(self.grid, "pull_interval", 0.5)), 0.5)
        end = time.time() + self.timeout
        while waiting and time.time() < end:
            # one pull per poll whatever the number of silos (a pull per chunk of ids made the
            # server's polling cost grow with silos x round time); the batch holds only what
            # arrived since the previous poll, and each reply is dropped once folded
            cpu = time.thread_time()
            batch = list(self.grid.pull_messages(sorted(waiting)))
            if not batch:
                # a poll that found nothing: waiting for silos, a cost per second of round
                self.loop.idle_poll_cpu += time.thread_time() - cpu
                time.sleep(interval)
                continue
            batch.reverse()
            while batch:
                msg = batch.pop()
                waiting.discard(msg.metadata.reply_to_message_id)
                self.received += 1
                if not msg.has_error():
                    self.up += record_bytes(msg.content)
                yield msg
                del msg
        for mid in sorted(waiting):
            log.warning("silo node %d sent no %s reply within strategy.round-timeout=%.0f s; "
                        "the round goes on without it", self.loop.destinations.get(mid, -1),
                        kind, self.timeout)

    def drain(self) -> None:
        """Consume what the aggregation did not (so bytes and missing silos are complete)."""
        for _ in self._gen if self._gen is not None else self:
            pass


def tap(replies: Iterable[Message], *observers: Callable[[Message], None]) -> Iterator[Message]:
    """Yield ``replies`` unchanged after showing each to every observer (no list is kept)."""
    for msg in replies:
        for observe in observers:
            observe(msg)
        yield msg


def weighted_metric(replies: list[Message], key: str, weight_key: str = NUM_EXAMPLES,
                    metrics_key: str = METRICS) -> float | None:
    num, den = 0.0, 0.0
    for msg in replies:
        rec = msg.content.metric_records.get(metrics_key)
        if rec is None or key not in rec:
            continue
        w = float(rec.get(weight_key, 1.0))
        num += float(rec[key]) * w
        den += w
    return num / den if den > 0 else None


def silo_timings(replies: list[Message], metrics_key: str = METRICS) -> dict[str, float]:
    """Mean per-silo seconds (model load, training, (de)serialization) reported in replies."""
    out: dict[str, float] = {}
    for key in TIMING_KEYS:
        vals = [float(m.content.metric_records[metrics_key][key]) for m in replies
                if key in m.content.metric_records.get(metrics_key, {})]
        if vals:
            out["silo_" + key.replace("-", "_")] = sum(vals) / len(vals)
    return out


def evaluate_metrics(good: list[Message]) -> MetricRecord | None:
    """Token-weighted eval loss, perplexity and mean timings of accepted evaluate replies.

    With ``eval.generate`` also exact match and ROUGE-L, weighted by the answers each silo
    generated.
    """
    loss = weighted_metric(good, EVAL_LOSS, weight_key=NUM_TOKENS)
    if loss is None:
        return None
    timings = {k.replace("silo_load", "silo_eval_load"): v for k, v in silo_timings(good).items()}
    generation = {k: weighted_metric(good, k, weight_key=NUM_GENERATED) for k in GENERATION_KEYS}
    return MetricRecord({EVAL_LOSS: loss, EVAL_PERPLEXITY: float(np.exp(min(loss, 50.0))),
                         **{k: v for k, v in generation.items() if v is not None}, **timings})


class RoundLoop:
    """Mixin with :meth:`run`: the loop with resume, round 0, bytes and a per-round callback.

    It also keeps each round's reply bookkeeping (:meth:`settle_train`) and reads evaluate
    replies (:meth:`accepted_evaluate_replies`), which every strategy does the same way.
    """

    last_train_replies: int = 0  # replies received in the last training round (not kept)
    last_evaluate_replies: list[Message]
    destinations: dict[str, int] = {}  # message id -> silo node id of the last send
    idle_poll_cpu: float = 0.0  # this round's CPU seconds in polls that found no reply
    accepted_replies: int = 0
    dp_budget: float | None = None  # dp.stop-at-budget: the dp.epsilon not to pass
    rejected_replies: int = 0
    problems: list[str] = []

    def settle_train(self, good: int | list[Message], problems: list[str]) -> None:
        """Log the round's rejected train replies and count accepted (``good``) and rejected."""
        for p in problems:
            log.warning("%s", p)
        self.problems = problems
        count = good if isinstance(good, int) else len(good)
        self.accepted_replies, self.rejected_replies = count, len(problems)

    def accepted_evaluate_replies(self, server_round: int, replies: Iterable[Message]
                                  ) -> list[Message]:
        """Evaluate replies without errors, duplicates or a wrong round (the others logged)."""
        kept, problems = split_replies(replies, server_round, "evaluate", self.destinations)
        for p in problems:
            log.warning("%s", p)
        good = []
        for msg in kept:
            try:
                check_reply_round(msg, server_round)
            except ValueError as exc:
                log.warning("%s", exc)
                continue
            good.append(msg)
        return good

    def _send(self, grid: Grid, messages: Iterable[Message], timeout: float) -> tuple[list, int, int]:
        messages = list(messages)
        down = sum(record_bytes(m.content) for m in messages)
        if not messages:
            return [], down, 0
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        # The grid has set each message's id: remember which silo it went to (see split_replies).
        self.destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = {r.metadata.reply_to_message_id for r in replies}
        for mid, node in self.destinations.items():
            if mid not in answered:
                log.warning("silo node %d sent no %s reply within strategy.round-timeout=%.0f s; "
                            "the round goes on without it", node, messages[0].metadata.message_type,
                            timeout)
        up = sum(record_bytes(r.content) for r in replies if not r.has_error())
        return replies, down, up

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                       config: ConfigRecord, timeout: float, rec: RoundRecord) -> None:
        replies, down, up = self._send(
            grid, self.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid),
            timeout)
        rec.bytes_down += down
        rec.bytes_up += up
        self.last_evaluate_replies = replies
        metrics = self.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            rec.eval_loss = metrics.get(EVAL_LOSS)
            rec.eval_perplexity = metrics.get(EVAL_PERPLEXITY)
            rec.extra.update({k: v for k, v in metrics.items()
                              if k not in (EVAL_LOSS, EVAL_PERPLEXITY)})

    def run(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        start_round: int = 1,
        timeout: float = 3600.0,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        on_round_end: Callable[[RoundRecord, ArrayRecord], None] | None = None,
        server_evaluate: Callable[[int, ArrayRecord], dict[str, Any]] | None = None,
    ) -> ArrayRecord:
        """Run rounds ``start_round..num_rounds``; round 0 (evaluation only) when starting fresh."""
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        arrays = initial_arrays
        if start_round == 1:
            t0 = time.time()
            rec = RoundRecord(round=0)
            self.evaluate_round(grid, 0, arrays, evaluate_config, timeout, rec)
            if server_evaluate:
                rec.extra.update(server_evaluate(0, arrays))
            rec.seconds = time.time() - t0
            log.info("[round 0/%d] eval_loss=%s ppl=%s (%.1f s)", num_rounds,
                     _fmt(rec.eval_loss), _fmt(rec.eval_perplexity), rec.seconds)
            if on_round_end:
                on_round_end(rec, arrays)
        next_epsilon: float | None = None  # what the silos say one more round would spend
        for server_round in range(start_round, num_rounds + 1):
            if budget_exceeded(self.dp_budget, next_epsilon):
                log.info("dp.stop-at-budget: stopping before round %d of %d: it would spend "
                         "epsilon %.3f > dp.epsilon=%g; the run ends after round %d",
                         server_round, num_rounds, next_epsilon, self.dp_budget,
                         server_round - 1)
                break
            t0, cpu0, clock = time.time(), time.process_time(), ServerCpuClock()
            self.idle_poll_cpu = 0.0
            rec = RoundRecord(round=server_round)
            stream = ReplyStream(
                self, grid,
                self.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid),
                timeout,
            )
            # aggregate_train folds each reply as it arrives; no list of replies is kept
            new_arrays, metrics = self.aggregate_train(server_round, stream)
            stream.drain()
            rec.bytes_down += stream.down
            rec.bytes_up += stream.up
            self.last_train_replies = stream.received
            if new_arrays is not None:
                arrays = new_arrays
            else:
                log.warning("round %d: no usable training reply; the global adapter is unchanged",
                            server_round)
            if metrics is not None:
                rec.train_loss = metrics.get(TRAIN_LOSS)
                rec.extra.update({k: v for k, v in metrics.items()
                                  if k not in (TRAIN_LOSS, NUM_EXAMPLES, ROUND)})
            rec.replies = getattr(self, "accepted_replies", stream.received)
            if rec.replies:
                rec.extra["bytes_up_per_silo"] = rec.bytes_up // max(stream.received, 1)
            rec.failures = getattr(self, "rejected_replies", 0)
            self.evaluate_round(grid, server_round, arrays, evaluate_config, timeout, rec)
            if server_evaluate:
                t_eval = clock.elapsed()
                rec.extra.update(server_evaluate(server_round, arrays))
                # a fixed cost per round (lpp's IP margin), whatever the number of silos
                rec.extra["server_evaluate_cpu_seconds"] = clock.elapsed() - t_eval
            rec.seconds = time.time() - t0
            next_epsilon = rec.extra.get("dp_epsilon_next", next_epsilon)
            eps = rec.extra.get("dp_epsilon")
            # the server's own cost (waiting for silos excluded): CPU seconds and peak memory
            rec.extra["server_cpu_seconds"] = clock.elapsed()
            # of which polls that found no reply: the server waiting, per second of round and
            # not per silo (in a 2-core simulation the round, and so this, grows with silos)
            rec.extra["server_idle_poll_cpu_seconds"] = self.idle_poll_cpu
            # the whole process: in a simulation it includes Flower's engine polling every node
            rec.extra["server_process_cpu_seconds"] = time.process_time() - cpu0
            rec.extra["server_peak_rss_mb"] = peak_rss_mb()
            log.info(
                "[round %d/%d] train_loss=%s eval_loss=%s ppl=%s%s up=%s down=%s silos=%d "
                "dropped=%d (%.1f s)", server_round, num_rounds, _fmt(rec.train_loss),
                _fmt(rec.eval_loss), _fmt(rec.eval_perplexity),
                "" if eps is None else f" eps={eps:.3f}", _mb(rec.bytes_up),
                _mb(rec.bytes_down), rec.replies, rec.failures, rec.seconds,
            )
            if on_round_end:
                on_round_end(rec, arrays)
        return arrays


SERVER_THREAD_PREFIXES = ("relay-",)  # the split relay's scheduler and RPC threads


def _thread_cpu_seconds(native_id: int) -> float:
    """user + system CPU seconds of one thread of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpuClock:
    """CPU seconds spent by the server's own threads since the clock was made.

    The calling thread (the ServerApp's: configure, reply pulling, validation, aggregation) and
    the split relay's threads (names in :data:`SERVER_THREAD_PREFIXES`, where split's middle
    runs). Not ``time.process_time()``: in a ``flwr run`` simulation the ServerApp is a thread of
    the process that also runs Flower's simulation engine, whose loop asks the link state for
    every virtual node's messages ten times a second, so the process's CPU grows with virtual
    silos x round time and says nothing about what the server itself costs.
    """

    def __init__(self) -> None:
        self._own = time.thread_time()
        self._others = self._threads()

    @staticmethod
    def _threads() -> dict[int, float]:
        return {t.native_id: _thread_cpu_seconds(t.native_id) for t in threading.enumerate()
                if t.name.startswith(SERVER_THREAD_PREFIXES) and t.native_id is not None}

    def elapsed(self) -> float:
        others = sum(cpu - self._others.get(tid, 0.0) for tid, cpu in self._threads().items())
        return time.thread_time() - self._own + max(others, 0.0)


def peak_rss_mb() -> float:
    """Peak resident memory of this (the server's) process so far, MiB (Linux ``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}MB"


def metric_record(values: dict[str, Any]) -> MetricRecord:
    return MetricRecord({k: v for k, v in values.items() if v is not None})
