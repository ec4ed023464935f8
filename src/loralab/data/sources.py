"""Where a task's rows come from: the hub (via `datasets`), local files in the hub's schema, or the generator."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loralab.config.schema import TaskConfig
from loralab.data.synthetic import generate
from loralab.data.tasks import Example, Row, TaskData, TaskSpec, get_task, holdout_size
from loralab.errors import DataError, first_line

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
Rows = Sequence[Row]  # a list of dicts or a `datasets.Dataset` (iterating either yields rows as dicts)


def load_task(cfg: TaskConfig) -> TaskData:
    """The task's train and eval examples: the first `train_samples` / `eval_samples` of each split, in order."""
    spec = get_task(cfg.name)
    if cfg.path is not None:
        train, evaluation = local_splits(spec, Path(cfg.path).expanduser())
    elif spec.hub is None:
        train, evaluation = synthetic_splits(spec, cfg)
    else:
        train, evaluation = hub_splits(spec)
    return TaskData(spec, to_examples(spec, train, cfg.train_samples), to_examples(spec, evaluation, cfg.eval_samples))


def to_examples(spec: TaskSpec, rows: Rows, limit: int | None) -> list[Example]:
    """The first `limit` rows (all when None) as Examples."""
    return [spec.convert(row, index, spec) for index, row in enumerate(itertools.islice(rows, limit))]


def synthetic_splits(spec: TaskSpec, cfg: TaskConfig) -> tuple[Rows, Rows]:
    """Generated rows: as many as the config asks for, else the task's default sizes."""
    default_train, default_eval = spec.default_sizes
    return (
        generate(spec.name, "train", cfg.train_samples or default_train),
        generate(spec.name, "eval", cfg.eval_samples or default_eval),
    )


def hold_out(table: Any) -> tuple[Any, Any]:
    """Split a train-only `datasets.Dataset`: its last `holdout_size` rows become the eval split."""
    cut = len(table) - holdout_size(len(table))
    return table.select(range(cut)), table.select(range(cut, len(table)))


def hub_splits(spec: TaskSpec) -> tuple[Rows, Rows]:
    """Both splits from the hub (or the local `datasets` cache)."""
    import datasets

    try:
        train = datasets.load_dataset(spec.hub, spec.subset, split=spec.train_split)
        evaluation = datasets.load_dataset(spec.hub, spec.subset, split=spec.eval_split) if spec.eval_split else None
    except Exception as exc:  # offline, missing or renamed datasets all land here, with many exception types
        raise DataError(
            f"cannot load {spec.name} from the hub ({first_line(exc)}); "
            "pass task.path=<directory or file with the data in the hub's schema>"
        ) from None
    for table in (train, evaluation):
        if table is not None:
            require_columns(spec, table.column_names, f"hub dataset {spec.hub}")
    return hold_out(train) if evaluation is None else (train, evaluation)


def local_splits(spec: TaskSpec, path: Path) -> tuple[Rows, Rows]:
    """A directory of `<split>.<ext>` files, or one file used as the train split (its end held out for eval)."""
    if path.is_file():
        return hold_out(read_file(spec, path))
    if not path.is_dir():
        raise DataError(f"task.path not found: {path}")
    train = read_file(spec, split_file(path, spec.train_split))
    if spec.eval_split is None:
        return hold_out(train)
    return train, read_file(spec, split_file(path, spec.eval_split))


def split_file(directory: Path, split: str) -> Path:
    """The one `<split>.<ext>` file of a split in a data directory."""
    found = [directory / f"{split}{suffix}" for suffix in FORMATS if (directory / f"{split}{suffix}").is_file()]
    if not found:
        raise DataError(f"no {split}.{{json,jsonl,csv,parquet}} file for the {split} split in {directory}")
    if len(found) > 1:
        raise DataError(f"several files for the {split} split in {directory}: {', '.join(f.name for f in found)}")
    return found[0]


def read_file(spec: TaskSpec, file: Path) -> Any:
    """One local json/jsonl/csv/parquet file as a `datasets.Dataset`, checked for the task's columns."""
    import datasets

    if file.suffix not in FORMATS:
        raise DataError(f"{file}: unsupported file type '{file.suffix}'; use one of {', '.join(FORMATS)}")
    try:
        table = datasets.load_dataset(FORMATS[file.suffix], data_files=str(file), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"cannot read {file}: {first_line(exc)}") from None
    require_columns(spec, table.column_names, str(file))
    return table


def require_columns(spec: TaskSpec, columns: Sequence[str], origin: str) -> None:
    missing = [c for c in spec.columns if c not in columns]
    if missing:
        raise DataError(f"{origin}: missing column '{missing[0]}' required by {spec.name} (has: {', '.join(columns)})")
