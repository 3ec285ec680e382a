"""``lpp``: silos train LoRA against a quantized base; the server keeps everything in full precision.

Round ``r`` (FedLPP, arXiv 2406.10976)::

    sent      = k-bit quantization of the server's fp32 global adapter     -> every sampled silo
    replies   = the silos' adapters after local training on the quantized base
    fp       += lpp.server-lr * (weighted mean(replies) - dequantized(sent))

With ``strategy.optimizer`` other than ``fedavg`` the FedLPP result is the "average" that
Flower's server optimizer steps from, against the fp32 global adapter (``fp`` before the
update), so the pseudo-gradient is ``lpp.server-lr * (mean - sent)``
(:mod:`fedshield_flwr.optimizers`).

The message keys are :mod:`fedshield_flwr.lpp.protocol`'s. The quantized base travels once per
silo (:class:`~fedshield_flwr.packages.delivery.PackageDelivery`): before the first message of a
run the server asks each silo (a Flower ``query`` carrying the content hash) whether the package
is in its disk cache, and attaches the package (``"base"`` ArrayRecord) only for silos that lack
it. A silo whose reply fails is asked again next time, so a silo that lost its cache gets a
fresh copy. Replies are validated like ``fedavg``'s (round, names, shapes, dtype, finite values,
duplicates); a bad one is logged with the silo and the round and left out.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedshield_flwr.lpp.adapter import AdapterQuantSpec, lpp_server_update, prepare_global_adapter
from fedshield_flwr.lpp.protocol import (
    BASE_RECORD,
    HASH_KEY,
    adapter_record,
    server_message,
)
from fedshield_flwr.packages.delivery import PackageDelivery
from fedshield_flwr.wire import decode_arrays, encode_arrays
from strategies.base import tap
from strategies.fedavg import LoraFedAvg

log = logging.getLogger("fedshield.server")


class LppStrategy(LoraFedAvg):
    """FedAvg message flow with FedLPP's k-bit downlink and server update.

    Parameters
    ----------
    template : Mapping[str, np.ndarray]
        The adapter silos send back (names, shapes, dtypes are checked against it).
    base_arrays : callable returning dict of str to np.ndarray
        The quantized base package as arrays (``package_to_arrays``); called once, on the first
        silo that needs it.
    content_hash : str
        The package's hash; every message carries it.
    spec : AdapterQuantSpec
        How the global adapter is quantized for silos.
    server_lr : float
        FedLPP's server step size.
    correct : callable (round, fp adapter) -> fp adapter, optional
        The owner's correction step (:mod:`fedshield_flwr.lpp.correct`), applied to the global
        adapter after every round's update (and server optimizer step).
    **kwargs
        :class:`~strategies.fedavg.LoraFedAvg` arguments (``optimizer``) and
        ``flwr.serverapp.strategy.FedAvg`` arguments.
    """

    def __init__(self, template: Mapping[str, np.ndarray],
                 base_arrays: Callable[[], Mapping[str, np.ndarray]], content_hash: str,
                 spec: AdapterQuantSpec, server_lr: float = 1.0,
                 correct: Callable[[int, OrderedDict[str, np.ndarray]],
                                   OrderedDict[str, np.ndarray]] | None = None,
                 **kwargs) -> None:
        super().__init__(template, **kwargs)
        self.delivery = PackageDelivery(base_arrays, content_hash, BASE_RECORD, HASH_KEY, "base")
        self.content_hash = content_hash
        self.spec = spec
        self.server_lr = server_lr
        self.correct = correct
        self._fp: OrderedDict[str, np.ndarray] | None = None
        self._sent: OrderedDict[str, np.ndarray] | None = None  # de-quantized k-bit adapter

    @property
    def has_base(self) -> set[int]:
        """Silos known to hold the package on disk."""
        return self.delivery.holders

    @property
    def base_sent_to(self) -> list[int]:
        """Silos the package was attached for (all rounds)."""
        return self.delivery.sent_to

    # ---- downlink -----------------------------------------------------------------------

    def quantized(self, arrays: ArrayRecord, remember: bool) -> ArrayRecord:
        """The k-bit copy of ``arrays`` (the fp global adapter).

        With ``remember`` (training) the fp adapter and the de-quantized copy are kept for
        :meth:`aggregate_train`'s update.
        """
        fp = decode_arrays(arrays, "server global adapter")
        sent_q, sent = prepare_global_adapter(fp, self.spec)
        if remember:
            self._fp, self._sent = fp, sent
        return adapter_record(sent_q)

    def _messages(self, template_msgs: Iterable[Message], grid: Grid, server_round: int,
                  adapter: ArrayRecord, config: ConfigRecord) -> list[Message]:
        msgs = [server_message(m, adapter, config, server_round) for m in template_msgs]
        return self.delivery.attach(msgs, grid, server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        msgs = super().configure_train(server_round, ArrayRecord(), config, grid)
        return self._messages(msgs, grid, server_round, self.quantized(arrays, True), config)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        msgs = super().configure_evaluate(server_round, ArrayRecord(), config, grid)
        if not msgs:
            return []
        return self._messages(msgs, grid, server_round, self.quantized(arrays, False), config)

    def dp_reference(self) -> Mapping[str, np.ndarray]:
        """The de-quantized k-bit adapter the silos started from: client-level DP clips
        ``reply - sent``, the update FedLPP's rule applies (not ``reply - fp``, which would
        count the quantization error against the clipping norm)."""
        assert self._sent is not None, "configure_train did not run"
        return self._sent

    def _track(self, replies: list[Message]) -> None:
        self.delivery.track(replies, self.destinations)

    # ---- uplink -------------------------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # fold each reply as it arrives (delivery bookkeeping sees it first); none is kept
        merged, metrics = self.average_train(
            server_round, tap(replies, lambda msg: self._track([msg])))
        if merged is None:
            return None, None
        assert self._fp is not None and self._sent is not None, "configure_train did not run"
        # LoraFedAvg has validated every reply and computed the weighted mean: apply FedLPP's rule
        mean = decode_arrays(merged, "aggregate")
        fp = encode_arrays(lpp_server_update(self._fp, self._sent, [mean], [1.0], self.server_lr))
        # the server optimizer (if any) steps the fp32 global adapter towards FedLPP's result
        stepped = self.optimizer.step(server_round, self._fp, fp)
        if self.correct is not None:  # the owner refits it to the full base on its own rows
            stepped = encode_arrays(self.correct(server_round, decode_arrays(stepped, "update")))
        return stepped, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        self._track(replies)
        return super().aggregate_evaluate(server_round, replies)
