"""The fedshield command line: keys init writes both files once and never overwrites silently."""

import stat

from fedshield_flwr.cli import main
from fedshield_flwr.shield import ServerKeyset, SiloKeyset


def test_keys_init_writes_a_silo_and_a_public_server_keyset(tmp_path, capsys):
    assert main(["keys", "init", "--out", str(tmp_path)]) == 0
    silo = SiloKeyset.load(tmp_path / "shield-silo.key")
    server = ServerKeyset.load(tmp_path / "shield-server.key")
    assert silo.key_id == server.key_id and server.key_id in capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "shield-silo.key").stat().st_mode) == 0o600


def test_keys_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert main(["keys", "init", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "shield-silo.key").read_bytes()
    assert main(["keys", "init", "--out", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "shield-silo.key").read_bytes() == before
    assert main(["keys", "init", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "shield-silo.key").read_bytes() != before


def test_summary_prints_the_round_table(tmp_path, capsys):
    from fedshield_flwr.results import RunResults

    res = RunResults.create(tmp_path, "run-1", {"strategy.name": "fedavg", "model.name": "m"})
    res.add_round({"round": 0, "eval_loss": 2.0, "eval_perplexity": 7.4, "bytes_up": 0,
                   "bytes_down": 10, "seconds": 1.0})
    res.add_round({"round": 1, "train_loss": 2.1, "eval_loss": 1.5, "eval_perplexity": 4.5,
                   "bytes_up": 10, "bytes_down": 10, "seconds": 2.0})
    assert main(["summary", str(tmp_path / "latest")]) == 0
    out = capsys.readouterr().out
    assert "2.0000 -> 1.5000" in out and "-25.0%" in out


def test_summary_shows_exact_match_and_rouge_l_columns_only_when_generated(tmp_path, capsys):
    from fedshield_flwr.results import RunResults

    res = RunResults.create(tmp_path, "run-g", {"strategy.name": "fedavg", "model.name": "m"})
    res.add_round({"round": 0, "eval_loss": 2.0, "eval_perplexity": 7.4})
    assert main(["summary", str(tmp_path / "latest")]) == 0
    assert "rougeL" not in capsys.readouterr().out
    plain_png = (res.dir / "loss.png").stat().st_size
    res.add_round({"round": 1, "train_loss": 2.1, "eval_loss": 1.5, "eval_perplexity": 4.5,
                   "eval_exact_match": 0.25, "eval_rouge_l": 0.4321})
    assert main(["summary", str(tmp_path / "latest")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("round"))
    assert header.split()[4:6] == ["exact", "rougeL"]
    row = next(line for line in lines if line.split()[:1] == ["1"])
    assert row.split()[4:6] == ["0.250", "0.432"]
    assert (res.dir / "loss.png").stat().st_size > plain_png  # the ROUGE-L panel is drawn


def test_summary_of_a_failed_run_prints_the_status_and_the_error_last(tmp_path, capsys):
    from fedshield_flwr.results import RunResults

    res = RunResults.create(tmp_path, "run-2", {"strategy.name": "split", "model.name": "m"})
    res.fail(ValueError("split.head-layers=99 do not fit; lower them"))
    assert main(["summary", str(tmp_path / "latest")]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "status: failed"
    assert lines[-1] == ("error: server: run run-2 failed before completing any round: "
                         "ValueError: split.head-layers=99 do not fit; lower them")
