"""Record-level epsilon in `fedshield summary` and loss.png."""

from fedshield_flwr.cli import main
from fedshield_flwr.results import RunResults


def test_summary_and_plot_show_the_spent_epsilon(tmp_path, capsys):
    res = RunResults.create(tmp_path, "run-dp", {"strategy.name": "fedavg", "model.name": "m"})
    res.add_round({"round": 0, "eval_loss": 2.0, "eval_perplexity": 7.4})
    assert main(["summary", str(tmp_path / "latest")]) == 0
    assert "eps" not in capsys.readouterr().out.split("status")[0].split()
    plain_png = (res.dir / "loss.png").stat().st_size
    res.add_round({"round": 1, "train_loss": 2.1, "eval_loss": 1.5, "eval_perplexity": 4.5,
                   "dp_epsilon": 2.345, "dp_epsilon_next": 3.1})
    res.add_round({"round": 2, "train_loss": 2.0, "eval_loss": 1.4, "eval_perplexity": 4.1,
                   "dp_epsilon": 3.1, "dp_epsilon_next": 3.7})
    assert main(["summary", str(tmp_path / "latest")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("round"))
    col = header.split().index("eps")
    assert next(li for li in lines if li.split()[:1] == ["1"]).split()[col] == "2.345"
    assert next(li for li in lines if li.split()[:1] == ["2"]).split()[col] == "3.100"
    assert (res.dir / "loss.png").stat().st_size > plain_png  # the epsilon axis is drawn
