"""ServerApp: read the config, build the mode's strategy, run the rounds, write results."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedshield_flwr.config import RunConfig
from fedshield_flwr.logs import configure_logging
from fedshield_flwr.modes import get_mode
from fedshield_flwr.results import RunResults

app = ServerApp()
log = logging.getLogger("fedshield.server")


def build_mode(cfg: RunConfig, run_dir):
    """The server mode of ``strategy.name`` (from the one registry, :mod:`fedshield_flwr.modes`)."""
    return get_mode(cfg.strategy.name).server_mode()(cfg, run_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = RunConfig.from_flat(context.run_config)
    if cfg.resume:
        results = RunResults.resume(cfg.results_dir, str(cfg.extra.get("resume.run", "latest")))
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

    def on_round_end(rec, current: ArrayRecord) -> None:
        results.add_round(rec.as_row())
        if rec.round > 0 and (rec.round % cfg.checkpoint_every == 0
                              or rec.round == cfg.num_server_rounds):
            results.save_checkpoint(rec.round, mode.checkpoint(current),
                                    {"strategy": cfg.strategy.name})

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
    log.info("done: results in %s%s", results.dir, f", adapter in {out}" if out else "")
