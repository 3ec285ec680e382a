"""`fedshield audit` end to end on tiny:llama: artifacts, attacks, table, JSON and plot."""

import json

import pytest

from fedshield_flwr.cli import main

TINY = "model.name='tiny:llama' data.max-length=64 train.max-steps=2 train.batch-size=4"


@pytest.mark.slow
def test_audit_runs_every_mode_end_to_end_and_writes_json_and_plot(tmp_path, capsys):
    rc = main(["audit", "--run-config", TINY, "--sigmas", "0,1", "--head-layers", "1",
               "--dp-multipliers", "2", "--public-rows", "40", "--eval-rows", "8",
               "--split-steps", "2", "--shield-views", "3", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    res = json.loads((tmp_path / "audit.json").read_text())
    assert (tmp_path / "audit.png").stat().st_size > 0
    assert {g["sigma"] for g in res["split_grid"]} == {0.0, 1.0}
    assert {"fedavg_server_auc", "lpp_server_auc", "shield_server_auc",
            "shield_colluding_silo_auc"} <= set(res["mia"])
    assert set(res["mia"]["final_model_auc"]) == {"fedavg", "lpp", "shield", "split"}
    views = res["mia"]["shield_server_auc_views"]  # three uploads, fresh randomness each
    assert len(views) == 3 and len(set(views)) > 1
    assert abs(res["mia"]["shield_server_auc"] - sum(views) / 3) < 1e-12
    assert 0 < res["mia"]["chance_band_95"] < 0.5
    assert res["sanity"]["split_inversion_sigma0"]["strong_enough"]
    assert "membership inference AUC" in capsys.readouterr().out


def test_audit_refuses_what_it_cannot_attack_with_the_reason(tmp_path, capsys):
    assert main(["audit", "--run-config", TINY, "--modes", "fedavg,secure-agg",
                 "--out", str(tmp_path)]) == 2
    assert "cannot attack mode(s) ['secure-agg']" in capsys.readouterr().err
    assert main(["audit", "--run-config", TINY, "--modes", "split", "--head-layers", "4",
                 "--out", str(tmp_path)]) == 2
    assert "leaves no middle" in capsys.readouterr().err
