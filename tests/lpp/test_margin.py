"""The owner's IP-margin threshold: ``lpp.min-ip-margin`` and the warning it raises."""

from __future__ import annotations

import pytest

from fedshield_flwr.config import ConfigError
from fedshield_flwr.lpp.margin import margin_warning, next_adapter_bits
from fedshield_flwr.lpp.settings import LppSettings
from fedshield_flwr.models import get_adapter_state
from fedshield_flwr.wire import encode_arrays


def test_warning_only_below_the_threshold_and_names_round_value_and_remedy():
    assert margin_warning(3, 0.12, 0.1) is None
    assert margin_warning(3, 0.01, 0.0) is None  # 0 = never warn
    text = margin_warning(3, 0.026, 0.1)
    assert text is not None
    assert "[round 3]" in text and "+0.0260 nats" in text and "lpp.min-ip-margin=0.1" in text
    assert "lpp.clip-search=false" in text and "lpp.adapter-bits" in text
    assert "lpp.margin-action='lower-adapter-bits'" in text
    assert margin_warning(2, -0.01, 0.05) is not None  # a proxy better than the owner's model


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_a_bad_threshold_is_refused_with_its_key(value):
    with pytest.raises(ConfigError, match=r"lpp\.min-ip-margin"):
        LppSettings.from_section({"min-ip-margin": value})


def test_lower_adapter_bits_steps_down_one_width_only_while_the_margin_is_short():
    assert next_adapter_bits(4, 0.02, 0.1) == 3
    assert next_adapter_bits(8, 0.02, 0.1) == 4
    assert next_adapter_bits(3, -0.5, 0.1) == 2
    assert next_adapter_bits(2, 0.02, 0.1) == 2  # the fewest: nothing left to lower
    assert next_adapter_bits(4, 0.2, 0.1) == 4  # the margin holds
    assert next_adapter_bits(4, 0.02, 0.0) == 4  # 0 = never act


def test_margin_action_is_refused_unless_known_and_measured():
    with pytest.raises(ConfigError, match=r"lpp\.margin-action"):
        LppSettings.from_section({"margin-action": "lower"})
    with pytest.raises(ConfigError, match=r"lpp\.margin-action.*lpp\.server-eval=true"):
        LppSettings.from_section({"margin-action": "lower-adapter-bits", "server-eval": False})
    with pytest.raises(ConfigError, match=r"lpp\.margin-action"):
        LppSettings.from_section({"margin-action": "lower-adapter-bits", "min-ip-margin": 0})


def test_a_short_margin_sends_the_next_rounds_adapter_with_fewer_bits(tmp_path, caplog):
    """The server measures the margin of round 1 below the threshold, warns, and quantizes the
    adapter of round 2 with 3 bits instead of 4; the last round changes nothing."""
    from fedshield_flwr.config import RunConfig
    from fedshield_flwr.lpp.adapter import adapter_from_arrays
    from fedshield_flwr.wire import decode_arrays
    from server_app.lpp import LppMode
    from tests.helpers import tiny_run_config

    cfg = RunConfig.from_flat(tiny_run_config(**{
        "strategy.name": "lpp", "num-server-rounds": 2, "lpp.eval-partitions": 1,
        "lpp.min-ip-margin": 50.0, "lpp.margin-action": "lower-adapter-bits"}))
    mode = LppMode(cfg, tmp_path / "run")
    arrays = encode_arrays(get_adapter_state(mode.full))
    with caplog.at_level("WARNING", logger="fedshield.server"):
        first = mode.ip_margin(1, arrays)
    assert first["adapter_bits"] == 4 and mode.strategy.spec.bits == 3
    assert "lpp.min-ip-margin=50" in caplog.text and "3 bits instead of 4 from round 2" in caplog.text
    sent = adapter_from_arrays(decode_arrays(mode.strategy.quantized(arrays, False), "test"))
    assert sent.spec.bits == 3
    last = mode.ip_margin(2, arrays)
    assert last["adapter_bits"] == 3 and mode.strategy.spec.bits == 3  # no round after the last
