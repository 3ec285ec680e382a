"""The owner's IP-margin threshold: ``lpp.min-ip-margin`` and the warning it raises."""

from __future__ import annotations

import pytest

from fedshield_flwr.config import ConfigError
from fedshield_flwr.lpp.margin import margin_warning
from fedshield_flwr.lpp.settings import LppSettings


def test_warning_only_below_the_threshold_and_names_round_value_and_remedy():
    assert margin_warning(3, 0.12, 0.1) is None
    assert margin_warning(3, 0.01, 0.0) is None  # 0 = never warn
    text = margin_warning(3, 0.026, 0.1)
    assert text is not None
    assert "[round 3]" in text and "+0.0260 nats" in text and "lpp.min-ip-margin=0.1" in text
    assert "lpp.clip-search=false" in text and "lpp.adapter-bits" in text
    assert margin_warning(2, -0.01, 0.05) is not None  # a proxy better than the owner's model


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_a_bad_threshold_is_refused_with_its_key(value):
    with pytest.raises(ConfigError, match=r"lpp\.min-ip-margin"):
        LppSettings.from_section({"min-ip-margin": value})
