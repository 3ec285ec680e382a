"""ServerApp: read the config, build the mode, run the rounds, write and track the results."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedshield_flwr.config import RunConfig
from fedshield_flwr.logs import configure_logging, quiet_third_party
from fedshield_flwr.modes import get_mode
from fedshield_flwr.results import RunResults, record_outcome
from fedshield_flwr.tracking import open_tracker

quiet_third_party()  # before the server modes import peft, bitsandbytes and transformers
app = ServerApp()
log = logging.getLogger("fedshield.server")


def build_mode(cfg: RunConfig, run_dir):
    """The server mode of ``strategy.name`` (from the one registry, :mod:`fedshield_flwr.modes`)."""
    return get_mode(cfg.strategy.name).server_mode()(cfg, run_dir)


@app.main()
@record_outcome  # metrics.json ends "completed", or "failed" with the error
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = RunConfig.from_flat(context.run_config)
    if cfg.resume:
        results = RunResults.resume(cfg.results_dir, cfg.resume_from)
        mode = build_mode(cfg, results.dir)
        done_round, state, _meta = results.load_checkpoint()
        arrays = mode.restore(state)
        start_round = done_round + 1
        log.info("resuming run %s after round %d", results.dir.name, done_round)
    else:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{context.run_id}"
        results = RunResults.create(cfg.results_dir, run_id, dict(context.run_config))
        mode = build_mode(cfg, results.dir)
        arrays = mode.initial_arrays()
        start_round = 1
        log.info("run %s: %s, %d rounds, model %s -> %s", run_id, cfg.strategy.name,
                 cfg.num_server_rounds, cfg.model.name, results.dir)
    if cfg.dp.stop_at_budget:
        mode.strategy.dp_budget = cfg.dp.epsilon
    tracker = open_tracker(cfg.tracking, results.dir, results.dir.name,
                           resume_round=start_round - 1 if cfg.resume else None)

    def on_round_end(rec, current: ArrayRecord) -> None:
        row = rec.as_row()
        results.add_round(row)
        tracker.log_round(rec.round, row)
        if rec.round > 0 and (rec.round % cfg.checkpoint_every == 0
                              or rec.round == cfg.num_server_rounds):
            results.save_checkpoint(rec.round, mode.checkpoint(current),
                                    {"strategy": cfg.strategy.name})

    status = "FAILED"
    try:
        if not cfg.resume:  # a resumed run keeps the parameters it was started with
            tracker.log_params(results.config)
        final = mode.strategy.run(
            grid,
            arrays,
            num_rounds=cfg.num_server_rounds,
            start_round=start_round,
            timeout=cfg.strategy.round_timeout,
            train_config=mode.train_config(),
            evaluate_config=mode.evaluate_config(),
            on_round_end=on_round_end,
            server_evaluate=mode.server_evaluate,
        )
        out = mode.export(final, results.dir)
        # loss.png is redrawn after every round; the adapter is the server's export or, in
        # shield simulation, the one the exporting silo wrote into this run's results.
        for artifact in (results.dir / "loss.png", out or results.dir / "adapter"):
            if artifact.exists():
                tracker.log_artifact(artifact)
        status = "FINISHED"
    finally:
        tracker.close(status)
    log.info("done: results in %s%s", results.dir, f", adapter in {out}" if out else "")
