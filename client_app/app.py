"""ClientApp: the silo side of every mode. Handlers read the message, call the library, reply.

The mode comes from the run config (``strategy.name``); each mode's handlers live in their own
module of this package and share the same message shapes where they can.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import fedavg, lpp, shield, split

app = ClientApp()

TRAIN = {"fedavg": fedavg.train, "shield": shield.train, "split": split.train, "lpp": lpp.train}
EVALUATE = {"fedavg": fedavg.evaluate, "shield": shield.evaluate, "split": split.evaluate,
            "lpp": lpp.evaluate}
QUERY = {"lpp": lpp.query, "split": split.query}


def _mode(context: Context) -> str:
    name = str(context.run_config.get("strategy.name", "fedavg"))
    if name not in TRAIN:
        raise ValueError(f"this ClientApp has no handler for strategy.name='{name}'; "
                         f"known: {', '.join(sorted(TRAIN))}")
    return name


@app.train()
def train(msg: Message, context: Context) -> Message:
    return TRAIN[_mode(context)](msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return EVALUATE[_mode(context)](msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    mode = _mode(context)
    if mode not in QUERY:
        raise ValueError(f"strategy.name='{mode}' sends no query messages; this one is unexpected")
    return QUERY[mode](msg, context)
