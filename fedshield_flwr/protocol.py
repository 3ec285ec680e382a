"""The wire protocol every mode shares: record names, common keys, reply builders and readers.

Every server message carries a ``ConfigRecord`` named :data:`CONFIG` with the round
(:data:`ROUND`); every reply carries a ``MetricRecord`` named :data:`METRICS` with the same round,
the example/token counts the server weights by, and the silo's timings (:data:`TIMING_KEYS`).
A mode's own records and keys live in its package's ``protocol.py``; what is here, both the
strategies and the ClientApp handlers import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

if TYPE_CHECKING:  # torch: not for the server's import of this module
    from fedshield_flwr.generation import GenerationResult

CONFIG = "config"  # ConfigRecord of every server message
METRICS = "metrics"  # MetricRecord of every reply
ARRAYS = "arrays"  # ArrayRecord of a plaintext adapter (fedavg, split with fedavg)

ROUND = "server-round"  # in CONFIG of every message and in METRICS of every reply
NUM_EXAMPLES = "num-examples"  # FedAvg weight of a train reply
NUM_TOKENS = "num-tokens"  # weight of an evaluate reply's loss
TRAIN_LOSS, EVAL_LOSS, EVAL_PERPLEXITY = "train_loss", "eval_loss", "eval_perplexity"
# eval.generate: greedy answers to held-out prompts, weighted by NUM_GENERATED on the server
EVAL_EXACT_MATCH, EVAL_ROUGE_L = "eval_exact_match", "eval_rouge_l"
NUM_GENERATED = "num-generated"
GENERATION_KEYS = (EVAL_EXACT_MATCH, EVAL_ROUGE_L)
LOAD_S, TRAIN_S, SERIALIZE_S, EVAL_S = ("load-seconds", "train-seconds", "serialize-seconds",
                                        "eval-seconds")
TIMING_KEYS = (LOAD_S, TRAIN_S, SERIALIZE_S, EVAL_S)


class ProtocolError(ValueError):
    """A message lacks a record or key the protocol requires; names who sent it."""


def config_of(msg: Message) -> Mapping[str, Any]:
    """The ``config`` record of a server message (empty if it has none)."""
    return msg.content.config_records.get(CONFIG, {})


def message_round(msg: Message, who: str = "server message") -> int:
    """The round a server message announces (silo side), or a clear error."""
    value = config_of(msg).get(ROUND)
    if value is None:
        raise ProtocolError(f"{who} carries no '{ROUND}'; do server and silo run the same "
                            "app version?")
    return int(value)


def reply_metrics(msg: Message, metrics_key: str = METRICS) -> Mapping[str, Any]:
    """The metrics record of a reply, or a :class:`ProtocolError` naming the silo."""
    if metrics_key not in msg.content.metric_records:
        raise ProtocolError(f"silo node {msg.metadata.src_node_id} sent no '{metrics_key}' "
                            "MetricRecord")
    return msg.content.metric_records[metrics_key]


def check_reply_round(msg: Message, server_round: int, metrics_key: str = METRICS) -> None:
    """Raise ``ValueError`` unless the reply says it belongs to ``server_round``."""
    node = msg.metadata.src_node_id
    if metrics_key not in msg.content.metric_records:
        raise ValueError(f"silo node {node} sent no '{metrics_key}' MetricRecord in round "
                         f"{server_round}")
    got = msg.content.metric_records[metrics_key].get(ROUND)
    if got is None or int(got) != server_round:
        raise ValueError(
            f"silo node {node} replied for round {got} during round {server_round}; "
            "the reply is stale or replayed and was dropped"
        )


def train_metrics(result, server_round: int, **extra: float) -> dict[str, Any]:
    """The metrics every train reply carries (``result`` is a ``train.TrainResult``)."""
    return {TRAIN_LOSS: result.loss, NUM_EXAMPLES: result.num_examples, ROUND: server_round,
            TRAIN_S: result.seconds, **getattr(result, "extra", {}), **extra}


def eval_metrics(result, server_round: int, generated: GenerationResult | None = None,
                 **extra: float) -> dict[str, Any]:
    """The metrics every evaluate reply carries (``result`` is a ``train.EvalResult``).

    ``generated`` (with ``eval.generate``) adds exact match, ROUGE-L and the number of answers.
    """
    gen = {} if generated is None else {
        EVAL_EXACT_MATCH: generated.exact_match, EVAL_ROUGE_L: generated.rouge_l,
        NUM_GENERATED: generated.num_generated}
    return {EVAL_LOSS: result.loss, EVAL_PERPLEXITY: result.perplexity,
            NUM_TOKENS: result.num_tokens, NUM_EXAMPLES: result.num_examples,
            ROUND: server_round, **gen, **extra}


def reply(msg: Message, metrics: Mapping[str, Any], **records: ArrayRecord) -> Message:
    """A reply to ``msg`` with ``metrics`` and the given array records (e.g. ``arrays=...``)."""
    return Message(RecordDict({**records, METRICS: MetricRecord(dict(metrics))}), reply_to=msg)
