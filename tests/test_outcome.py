"""`fedshield run`: the exit status and last lines follow the run's status on the SuperLink."""

from __future__ import annotations

import io
import json
import stat

import pytest

from fedshield_flwr.outcome import run_and_check, superlink_of

SERVER_ERROR = ("ERROR   : server: run 20260101-000000-7 failed after round 1: ValueError: silo 2 "
                "sent 37 ciphertexts for a 36-block mask in round 2; check the keysets")


def _fake_flwr(tmp_path, status: str, details: str = "", log: str = "", run_rc: int = 0):
    """A `flwr` that starts run 7, prints ``log`` and answers `flwr ls` with ``status``."""
    ls = json.dumps({"success": True, "runs": [{"run-id": "7", "status": status,
                                                 "status-details": details}]})
    (tmp_path / "log").write_text(log + "\n")
    script = tmp_path / "flwr"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
if [ "$1" = run ]; then
  echo "Successfully started run 7"
  cat {tmp_path}/log
  exit {run_rc}
fi
echo 'Using SuperLink: local'
echo '{ls}'
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _run(tmp_path, flwr, args=(".", "fedshield", "--run-config", "num-server-rounds=2")):
    out, err = io.StringIO(), io.StringIO()
    code = run_and_check(list(args), out=out, err=err, flwr=flwr)
    return code, out.getvalue(), err.getvalue().strip().splitlines()


def test_a_completed_run_exits_0_and_streams_its_output(tmp_path):
    code, out, err = _run(tmp_path, _fake_flwr(tmp_path, "finished:completed", log="round 2"))
    assert code == 0 and err == [] and "round 2" in out
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].endswith("--stream")  # added: the status is read once the stream ends
    assert calls[1] == "ls fedshield --run-id 7 --format json"  # the same SuperLink


def test_a_failed_run_exits_1_with_the_serverapps_error_last(tmp_path):
    flwr = _fake_flwr(tmp_path, "finished:failed", "ServerApp failed with exception: silo 2 ...",
                      log=SERVER_ERROR + "\nTraceback (most recent call last): ...")
    code, _, err = _run(tmp_path, flwr)
    assert code == 1
    assert err == ["fedshield run: run 7 is finished:failed, not finished:completed", SERVER_ERROR]


def test_without_the_serverapps_line_the_superlinks_details_come_last(tmp_path):
    flwr = _fake_flwr(tmp_path, "finished:stopped", "Task stopped by user.")
    code, _, err = _run(tmp_path, flwr)
    assert code == 1 and err[-1] == "Task stopped by user."


def test_a_flwr_run_that_fails_to_start_keeps_its_exit_status(tmp_path):
    code, _, err = _run(tmp_path, _fake_flwr(tmp_path, "finished:completed", run_rc=2))
    assert code == 2 and "exited with status 2" in err[-1]
    assert len((tmp_path / "calls").read_text().splitlines()) == 1  # no `flwr ls`


@pytest.mark.parametrize("args,superlink", [
    ([".", "local", "--stream"], "local"),
    (["."], None),
    ([".", "--run-config", "a=1 b='x'", "fedshield"], "fedshield"),
    (["--federation-config", "num-supernodes=3", ".", "local"], "local"),
    ([".", "-c", "x=1", "--format=json"], None),
])
def test_the_superlink_is_the_second_positional_argument(args, superlink):
    assert superlink_of(args) == superlink
