"""Run config: the pyproject defaults parse, bad values fail with the key named."""

import pytest

from fedshield_flwr.config import ConfigError, NodeSettings, RunConfig, default_flat_config


def test_pyproject_defaults_parse_into_typed_config():
    cfg = RunConfig.from_flat(default_flat_config())
    assert cfg.strategy.name == "fedavg"
    assert cfg.model.name == "embedded:smollm2-135m-instruct"
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ()
    assert cfg.num_server_rounds >= 3
    assert cfg.train.learning_rate_max >= cfg.train.learning_rate_min


def test_dotted_keys_override_and_lists_split():
    flat = default_flat_config() | {"model.lora.target-modules": "q_proj, v_proj",
                                    "train.max-steps": 7, "train.learning-rate-max": 1}
    cfg = RunConfig.from_flat(flat)
    assert cfg.model.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.train.max_steps == 7 and cfg.train.learning_rate_max == 1.0


@pytest.mark.parametrize("key,value,fragment", [
    ("strategy.name", "secagg", "strategy.name"),
    ("model.lora.r", 0, "model.lora.r"),
    ("model.quantization", 3, "model.quantization"),
    ("train.max-steps", "ten", "train.max-steps"),
    ("data.partitioner", "zipf", "data.partitioner"),
    ("train.learning-rate-min", 1.0, "learning-rate-min"),
])
def test_invalid_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flat(default_flat_config() | {key: value})


@pytest.mark.parametrize("key,nearest", [
    ("shield.prune-ration", "shield.prune-ratio"),
    ("lpp.quant-typ", "lpp.quant-type"),
    ("split.head", "split.head-layers"),
    ("train.max-step", "train.max-steps"),
    ("model.lora.rank", "model.lora.r"),
    ("newmode.knob", None),
])
def test_every_section_refuses_an_unknown_key_naming_the_nearest(key, nearest):
    with pytest.raises(ConfigError, match=f"unknown run config key '{key}'") as info:
        RunConfig.from_flat(default_flat_config() | {key: 1})
    if nearest:
        assert f"did you mean '{nearest}'" in str(info.value)


def test_mode_sections_are_validated_whichever_mode_runs():
    with pytest.raises(ConfigError, match="shield.prune-ratio"):
        RunConfig.from_flat(default_flat_config() | {"shield.prune-ratio": 1.5})
    cfg = RunConfig.from_flat(default_flat_config())
    assert cfg.section("shield")["prune-ratio"] == 0.0


def test_pyproject_states_exactly_the_code_defaults():
    """Defaults live in the settings dataclasses; pyproject.toml repeats them for Flower."""
    assert default_flat_config() == RunConfig.defaults()


def test_every_mode_of_the_registry_resolves_its_parts():
    from fedshield_flwr.modes import MODES

    assert list(MODES) == ["fedavg", "shield", "lpp", "split"]
    for mode in MODES.values():
        assert mode.server_mode().__name__.endswith("Mode")
        assert hasattr(mode.strategy_class(), "aggregate_train")
        handlers = mode.handlers()
        assert callable(handlers.train) and callable(handlers.evaluate)


def test_node_config_partition_must_be_in_range():
    assert NodeSettings.from_flat({"partition-id": 2, "num-partitions": 3}).partition_id == 2
    with pytest.raises(ConfigError, match="partition-id"):
        NodeSettings.from_flat({"partition-id": 3, "num-partitions": 3})
