"""Per-message ClientApp start-up: the tokenized-data cache and the lean imports.

In deployment every message starts a fresh ``flwr-clientapp`` process; these tests pin down that a
warm process reads its rows from the on-disk cache (no ``datasets`` import, no tokenization), that
a full-precision fedavg, shield or split silo (and the split ServerApp) does not import
bitsandbytes, and that neither shortcut changes what is trained.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from fedshield_flwr.config import DataSettings, NodeSettings, RunConfig
from fedshield_flwr.data.silo_cache import (
    SiloData,
    cached_silo_data,
    silo_data_key,
    tokenizer_fingerprint,
)
from tests.helpers import tiny_run_config

ROOT = Path(__file__).resolve().parents[2]
ROWS = SiloData([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}],
                [{"input_ids": [4, 5], "labels": [-100, 5]}], "test rows")


class _Tok:
    name_or_path = "tok"
    chat_template = None

    def __len__(self) -> int:
        return 512


def _counting_build(counter: list):
    def build() -> SiloData:
        counter.append(1)
        return ROWS
    return build


def test_a_cache_hit_returns_the_rows_without_building_them(tmp_path):
    calls: list = []
    args = (DataSettings(), NodeSettings(0, 3), _Tok(), 42, str(tmp_path / "model"),
            tmp_path / "cache")
    assert cached_silo_data(*args, _counting_build(calls)) == ROWS
    assert cached_silo_data(*args, _counting_build(calls)) == ROWS
    assert len(calls) == 1
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert cached_silo_data(*args[:-1], None, _counting_build(calls)) == ROWS  # cache disabled
    assert len(calls) == 2


def test_the_cache_key_follows_data_file_partition_seed_and_tokenizer(tmp_path):
    data_file = tmp_path / "train.jsonl"
    data_file.write_text('{"instruction": "a", "response": "b"}\n')
    node = NodeSettings(0, 1, data_path=str(data_file))
    base = silo_data_key(DataSettings(), node, 42, "tok")
    assert silo_data_key(DataSettings(), node, 42, "tok") == base
    assert silo_data_key(DataSettings(), node, 43, "tok") != base
    assert silo_data_key(DataSettings(), node, 42, "tok2") != base
    assert silo_data_key(DataSettings(max_length=64), node, 42, "tok") != base
    assert silo_data_key(DataSettings(), NodeSettings(1, 3), 42, "tok") != silo_data_key(
        DataSettings(), NodeSettings(0, 3), 42, "tok")
    data_file.write_text('{"instruction": "a", "response": "changed"}\n')
    os.utime(data_file, ns=(1, 1))
    assert silo_data_key(DataSettings(), node, 42, "tok") != base

    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    fp = tokenizer_fingerprint(_Tok(), str(model))
    (model / "tokenizer.json").write_text('{"changed": 1}')
    assert tokenizer_fingerprint(_Tok(), str(model)) != fp


@pytest.mark.parametrize("content", [
    "not json", json.dumps({"format": 1, "key": "other"}), json.dumps([1, 2]),
    json.dumps({"format": 1, "key": "K", "source": "s", "train": [{"input_ids": ["x"],
                                                                   "labels": [1]}], "eval": []}),
])
def test_corrupt_or_foreign_cache_entries_are_rebuilt_not_trusted(tmp_path, content):
    calls: list = []
    args = (DataSettings(), NodeSettings(0, 3), _Tok(), 42, str(tmp_path), tmp_path / "c")
    cached_silo_data(*args, _counting_build(calls))
    (entry,) = (tmp_path / "c").glob("*.json")
    entry.write_text(content.replace('"K"', json.dumps(entry.stem)))
    assert cached_silo_data(*args, _counting_build(calls)) == ROWS
    assert len(calls) == 2


def test_cached_rows_equal_freshly_tokenized_rows(tmp_path):
    from fedshield_flwr.data import load_silo_data
    from fedshield_flwr.models import load_tokenizer, resolve_model_path

    cfg = RunConfig.from_flat(tiny_run_config())
    node = NodeSettings(1, 3)
    tok = load_tokenizer(cfg.model.name)
    fresh = load_silo_data(cfg.data, node, tok, cfg.train.seed)
    path = resolve_model_path(cfg.model.name)

    def build():
        return load_silo_data(cfg.data, node, tok, cfg.train.seed)

    cached_silo_data(cfg.data, node, tok, cfg.train.seed, path, tmp_path, build)
    hit = cached_silo_data(cfg.data, node, tok, cfg.train.seed, path, tmp_path,
                           lambda: pytest.fail("the second call must be a cache hit"))
    assert hit.train == fresh.train and hit.eval == fresh.eval and hit.source == fresh.source


@pytest.mark.parametrize("mode", ["fedavg", "shield", "split"])
def test_bitsandbytes_is_hidden_only_in_a_one_shot_app_process_at_full_precision(
        monkeypatch, mode):
    from fedshield_flwr.silo import skip_unused_bitsandbytes

    cfg = RunConfig.from_flat(tiny_run_config(**{"strategy.name": mode}))
    assert not skip_unused_bitsandbytes(cfg)  # a pytest process serves many configurations
    saved = {m: sys.modules.pop(m) for m in ("peft", "bitsandbytes") if m in sys.modules}
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-clientapp", "--token", "x"])
    try:
        assert not skip_unused_bitsandbytes(replace(cfg, model=replace(cfg.model,
                                                                       quantization=4)))
        assert not skip_unused_bitsandbytes(replace(cfg, strategy=replace(cfg.strategy,
                                                                          name="lpp")))
        assert "bitsandbytes" not in sys.modules
        assert skip_unused_bitsandbytes(cfg)
        assert sys.modules["bitsandbytes"] is None
    finally:
        sys.modules.pop("bitsandbytes", None)
        sys.modules.update(saved)


def test_a_warm_clientapp_process_skips_datasets_and_bitsandbytes_and_still_trains(tmp_path):
    """A fresh process that looks like `flwr-clientapp`, after a first one warmed the caches."""
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.argv[0] = "/venv/bin/flwr-clientapp"
        sys.path.insert(0, {str(ROOT)!r})
        t0 = time.time()
        import client_app.app  # what flwr-clientapp loads
        from fedshield_flwr.config import NodeSettings, RunConfig
        from fedshield_flwr.silo import get_runtime, train_round
        from tests.helpers import tiny_run_config
        cfg = RunConfig.from_flat(tiny_run_config(**{{"train.max-steps": 1}}))
        node = NodeSettings(0, 3)
        rt = get_runtime(cfg, node)
        rt.silo_data(cfg, node)
        ready = time.time() - t0
        res = train_round(rt, cfg, node, 1, rt.initial)
        print(json.dumps({{"datasets": "datasets" in sys.modules,
                          "bitsandbytes": sys.modules.get("bitsandbytes", 0) is not None,
                          "loss": res.loss, "ready": ready}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                                      capture_output=True, text=True, check=True,
                                      timeout=300).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    cold, warm = runs
    assert not warm["datasets"], "a cache hit must not import `datasets`"
    assert not warm["bitsandbytes"] and not cold["bitsandbytes"]
    assert warm["loss"] == cold["loss"]  # the cached rows train exactly like fresh ones


def test_split_silo_and_server_runtimes_hide_bitsandbytes_before_building_the_model(
        monkeypatch):
    """split builds its own runtimes (head + tail on the silo, the middle on the server)."""
    import fedshield_flwr.split.silo as silo_split
    import server_app.split as server_split
    from fedshield_flwr.silo import clear_runtimes
    from fedshield_flwr.split.settings import SplitSettings

    calls: list[str] = []

    def spy(cfg: RunConfig) -> bool:
        calls.append(cfg.strategy.name)
        return False

    monkeypatch.setattr(silo_split, "skip_unused_bitsandbytes", spy)
    monkeypatch.setattr(server_split, "skip_unused_bitsandbytes", spy)
    clear_runtimes()
    from fedshield_flwr.packages.format import package_to_arrays

    cfg = RunConfig.from_flat(tiny_run_config(**{"strategy.name": "split"}))
    settings = SplitSettings.from_config(cfg)
    _, _, parts = server_split.load_middle(cfg, settings)
    assert calls == ["split"]
    silo_split.split_runtime(cfg, NodeSettings(0, 3), settings, parts.content_hash,
                                 package_to_arrays(parts), "test")
    assert calls == ["split", "split"]
