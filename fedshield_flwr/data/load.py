"""Load an instruction data set from a hub name, a local file or a ``save_to_disk`` directory.

Every source ends as a ``datasets.Dataset`` with the canonical columns ``instruction``, ``input``
and ``response`` (renamed from the user's columns through :class:`ColumnMap`), plus whatever other
columns it had (e.g. a ``category`` label for Dirichlet partitioning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

# Per-row progress bars of map/filter only clutter the federated logs.
datasets.disable_progress_bars()

FILE_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class DataLoadError(RuntimeError):
    """The data set could not be found, read or mapped; the message says how to fix it."""


@dataclass(frozen=True)
class ColumnMap:
    """Which source columns hold the instruction, the optional input and the response."""

    instruction: str = "instruction"
    input: str = "input"
    response: str = "response"


def _from_source(name: str) -> datasets.Dataset:
    if name.startswith("embedded:"):
        key = name.split(":", 1)[1]
        if key != "chatterbot-english":
            raise DataLoadError(f"unknown embedded data set '{key}'; known: chatterbot-english")
        from fedshield_flwr.data.embedded import chatterbot_pairs

        return datasets.Dataset.from_list(chatterbot_pairs())
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
        else:
            raise DataLoadError(
                f"{path} is a directory but not a datasets.save_to_disk() output "
                "(no dataset_info.json / state.json); point data.name at a file or such a directory"
            )
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded))
            loaded = loaded[split]
        return loaded
    if path.suffix.lower() in FILE_FORMATS:
        if not path.exists():
            raise DataLoadError(f"data file {path} does not exist")
        fmt = FILE_FORMATS[path.suffix.lower()]
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for bad files
            raise DataLoadError(f"cannot read {path} as {fmt}: {exc}") from exc
    try:
        loaded = datasets.load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001
        raise DataLoadError(
            f"cannot load data set '{name}' from the hub ({type(exc).__name__}: {exc}); "
            "use a local .json/.jsonl/.csv/.parquet file, a save_to_disk directory, or "
            "embedded:chatterbot-english"
        ) from exc
    return loaded


def load_instruction_dataset(name: str, columns: ColumnMap = ColumnMap()) -> datasets.Dataset:
    """Load ``name`` and rename its columns to ``instruction``/``input``/``response``.

    ``input`` is optional in the source (filled with empty strings); the other two are required.
    """
    ds = _from_source(name)
    cols = set(ds.column_names)
    for role, col in (("instruction", columns.instruction), ("response", columns.response)):
        if col not in cols:
            raise DataLoadError(
                f"data set '{name}' has no column '{col}' for the {role}; its columns are "
                f"{sorted(cols)}; set data.{role}-column"
            )
    renames = {}
    for canonical, col in (
        ("instruction", columns.instruction),
        ("input", columns.input),
        ("response", columns.response),
    ):
        if col in cols and col != canonical:
            if canonical in cols:
                ds = ds.remove_columns(canonical)
            renames[col] = canonical
    if renames:
        ds = ds.rename_columns(renames)
    if "input" not in ds.column_names:
        ds = ds.add_column("input", [""] * len(ds))

    def _as_text(row):
        return {k: "" if row[k] is None else str(row[k]) for k in ("instruction", "input", "response")}

    ds = ds.map(_as_text)
    ds = ds.filter(lambda r: bool(r["instruction"].strip()) and bool(r["response"].strip()))
    if len(ds) == 0:
        raise DataLoadError(f"data set '{name}' has no rows with both an instruction and a response")
    return ds
