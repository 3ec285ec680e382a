"""ClientApp: the silo side of every mode. Handlers read the message, call the library, reply.

The mode comes from the run config (``strategy.name``) and its handlers from the one registry
(:data:`fedshield_flwr.modes.MODES`): a module of this package with ``train``, ``evaluate`` and,
for modes that deliver a package, ``query``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedshield_flwr.logs import quiet_third_party
from fedshield_flwr.modes import get_mode

quiet_third_party()  # before the handlers import peft, bitsandbytes and transformers
app = ClientApp()


def _handlers(context: Context):
    return get_mode(str(context.run_config.get("strategy.name", "fedavg"))).handlers()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handlers(context).train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handlers(context).evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    handlers = _handlers(context)
    if not hasattr(handlers, "query"):
        raise ValueError(f"strategy.name='{context.run_config.get('strategy.name')}' sends no "
                         "query messages; this one is unexpected")
    return handlers.query(msg, context)
