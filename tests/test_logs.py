"""A quiet terminal: the known-harmless third-party messages are gone, every other one stays."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HARMLESS = (
    "Failed to load CPU gemm_4bit_forward from kernels-community",  # bitsandbytes, at import
    "`torch.jit.script_method` is deprecated",  # torch, when bitsandbytes compiles at import
    "`is_gradient_checkpointing` is deprecated",  # transformers, read by peft
)
KEPT = (
    "fedshield: our own deprecation",
    "fedshield: our own log warning",
    "another bitsandbytes message",
    "another transformers FutureWarning",
)


def test_a_clientapp_training_prints_none_of_the_harmless_messages_and_keeps_the_others():
    """A fresh process as Flower's simulation runs it: DeprecationWarnings on for everyone."""
    script = textwrap.dedent(f"""
        import logging, sys, warnings
        warnings.filterwarnings("once", category=DeprecationWarning)  # as flwr's simulation does
        sys.path.insert(0, {str(ROOT)!r})
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        from flwr.app import ConfigRecord, RecordDict
        from client_app.app import train  # the ClientApp, as flwr loads it
        from fedshield_flwr.config import RunConfig
        from fedshield_flwr.logs import configure_logging
        from fedshield_flwr.silo import initial_adapter
        from fedshield_flwr.wire import encode_arrays
        from tests.helpers import context, server_message, tiny_run_config
        configure_logging()
        rc = tiny_run_config(**{{"train.max-steps": 1}})
        content = RecordDict({{"arrays": encode_arrays(initial_adapter(RunConfig.from_flat(rc))),
                               "config": ConfigRecord({{"server-round": 1}})}})
        out = train(server_message(content, node_id=5),
                    context(rc, {{"partition-id": 0, "num-partitions": 2}}))
        assert not out.has_error()
        warnings.warn_explicit("fedshield: our own deprecation", DeprecationWarning, "silo.py", 1,
                               module="fedshield_flwr.silo")
        logging.getLogger("fedshield_flwr.silo").warning("fedshield: our own log warning")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes message")
        warnings.warn_explicit("another transformers FutureWarning", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        print("trained:", "bitsandbytes" in sys.modules)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed[-3000:]
    assert "trained: True" in printed  # bitsandbytes was imported: its messages had their chance
    for message in HARMLESS:
        assert message not in printed, printed[-3000:]
    for message in KEPT:
        assert message in printed, printed[-3000:]
