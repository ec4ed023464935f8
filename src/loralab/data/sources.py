"""Where a task's rows come from: local files (a file, a glob or a directory), the hub (via `datasets`), or the
generator of a synthetic task; then rows → Examples, with label names inferred from the train split if unset."""

from __future__ import annotations

import csv
import glob
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loralab.config.schema import TaskConfig
from loralab.config.tasks import DEFAULT_COLUMNS, REQUIRED_ROLES
from loralab.data.synthetic import DEFAULT_SIZES, GENERATORS, generate
from loralab.data.tasks import Example, Row, TaskData, TaskSpec, holdout_size, number, task_spec
from loralab.errors import DataError, did_you_mean, first_line

READERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
Rows = Sequence[Row]  # a list of dicts or a `datasets.Dataset` (iterating either yields rows as dicts)


def load_task(cfg: TaskConfig) -> TaskData:
    """The task's train and eval examples: the first `train_samples` / `eval_samples` of each split, in order."""
    (train, train_origin), (evaluation, eval_origin) = task_splits(cfg)
    spec = task_spec(cfg, inferred_labels(cfg, train, train_origin))
    return TaskData(
        spec,
        to_examples(spec, train, cfg.train_samples, train_origin),
        to_examples(spec, evaluation, cfg.eval_samples, eval_origin),
    )


def resolved_spec(cfg: TaskConfig) -> TaskSpec:
    """The task's spec with its label names, reading the train split only where they must be inferred."""
    if cfg.format != "classification" or cfg.label_names is not None:
        return task_spec(cfg)
    (train, origin), _ = task_splits(cfg)
    return task_spec(cfg, inferred_labels(cfg, train, origin))


def task_splits(cfg: TaskConfig) -> tuple[tuple[Rows, str], tuple[Rows, str]]:
    """(rows, where they come from) of the train and eval splits, from the task's one source."""
    if cfg.path is not None:
        splits = local_splits(cfg, cfg.path)
    elif cfg.hub is not None:
        splits = hub_splits(cfg)
    elif cfg.name in GENERATORS:
        splits = synthetic_splits(cfg)
    else:
        raise DataError(f"task '{cfg.name}' has no source: set task.path or task.hub")
    for rows, origin in splits:
        if len(rows) == 0:
            raise DataError(f"{origin} holds no rows")
    return splits


def inferred_labels(cfg: TaskConfig, train: Rows, origin: str) -> tuple[str, ...] | None:
    """A classification task's label names where the config gives none: the distinct train labels, sorted."""
    if cfg.format != "classification" or cfg.label_names is not None:
        return None
    column = {**(cfg.columns or {})}.get("label", "label")
    values = {row.get(column) for row in itertools.islice(train, cfg.train_samples)} - {None}
    if not values:
        raise DataError(f"{origin}: no labels in column '{column}' to infer task.label_names from")
    if len(values) == 1:
        raise DataError(f"{origin}: every label in column '{column}' is {next(iter(values))!r}; a classifier needs two")
    numbers = [number(v) for v in values]
    if all(n is not None for n in numbers):  # 2 before 10, also where a CSV gives them as text
        return tuple(str(v) for _, v in sorted(zip(numbers, values, strict=True)))
    return tuple(sorted(str(v) for v in values))


def to_examples(spec: TaskSpec, rows: Rows, limit: int | None, origin: str) -> list[Example]:
    """The first `limit` rows (all when None) as Examples; a bad row is a DataError naming its file and number."""
    examples = []
    for index, row in enumerate(itertools.islice(rows, limit)):
        try:
            examples.append(spec.convert(row, index))
        except DataError as exc:
            raise DataError(f"{origin}, row {index + 1}: {exc}") from None
    return examples


def synthetic_splits(cfg: TaskConfig) -> tuple[tuple[Rows, str], tuple[Rows, str]]:
    """Generated rows: as many as the config asks for, else the task's default sizes."""
    sizes = DEFAULT_SIZES[cfg.name]
    return tuple(  # type: ignore[return-value]
        (generate(cfg.name, split, wanted or default), f"the {cfg.name} generator's {split} split")
        for split, wanted, default in (("train", cfg.train_samples, sizes[0]), ("eval", cfg.eval_samples, sizes[1]))
    )


def hold_out(table: Any, origin: str) -> tuple[tuple[Any, str], tuple[Any, str]]:
    """Split a train-only `datasets.Dataset`: its last `holdout_size` rows become the eval split."""
    if len(table) < 2:
        raise DataError(f"{origin} holds {len(table)} row(s): too few to hold out an eval split from")
    cut = len(table) - holdout_size(len(table))
    return (table.select(range(cut)), origin), (table.select(range(cut, len(table))), f"{origin} (held-out end)")


def hub_splits(cfg: TaskConfig) -> tuple[tuple[Rows, str], tuple[Rows, str]]:
    """Both splits from the hub (or the local `datasets` cache)."""
    import datasets

    origin = f"hub dataset {cfg.hub}" + (f" ({cfg.subset})" if cfg.subset else "")
    try:
        train = datasets.load_dataset(cfg.hub, cfg.subset, split=cfg.splits.train)
        evaluation = datasets.load_dataset(cfg.hub, cfg.subset, split=cfg.splits.eval) if cfg.splits.eval else None
    except Exception as exc:  # offline, missing or renamed datasets all land here, with many exception types
        raise DataError(
            f"cannot load {cfg.name} from the hub ({first_line(exc)}); "
            "pass task.path=<directory or file with the data in the hub's schema>"
        ) from None
    for table in (train, evaluation):
        if table is not None:
            require_columns(cfg, table.column_names, origin)
    if evaluation is None:
        return hold_out(train, origin)
    return (train, f"{origin} {cfg.splits.train} split"), (evaluation, f"{origin} {cfg.splits.eval} split")


def local_splits(cfg: TaskConfig, location: str) -> tuple[tuple[Rows, str], tuple[Rows, str]]:
    """A directory of `<split>.<ext>` files; or one file or a glob of files as the train split (its end held out)."""
    path = Path(location).expanduser()
    if any(char in location for char in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"task.path: the glob {location} matches no file")
        return hold_out(read_files(cfg, files), location)
    if path.is_file():
        return hold_out(read_files(cfg, [path]), str(path))
    if not path.is_dir():
        raise DataError(f"task.path not found: {path}")
    train_file = split_file(path, cfg.splits.train, "train")
    train = read_files(cfg, [train_file])
    if cfg.splits.eval is None:
        return hold_out(train, str(train_file))
    eval_file = split_file(path, cfg.splits.eval, "eval")
    return (train, str(train_file)), (read_files(cfg, [eval_file]), str(eval_file))


def split_file(directory: Path, split: str, role: str) -> Path:
    """The file of a split in a data directory: `split` itself when it names a file there, else `<split>.<ext>`."""
    if (directory / split).is_file():
        return directory / split
    found = [directory / f"{split}{suffix}" for suffix in READERS if (directory / f"{split}{suffix}").is_file()]
    if not found:
        hint = "; set task.splits.eval=null to hold out the end of train" if role == "eval" else ""
        if Path(split).suffix:
            raise DataError(f"{directory / split} not found (task.splits.{role}){hint}")
        raise DataError(f"no {split}.{{json,jsonl,csv,tsv,parquet}} file for the {split} split in {directory}{hint}")
    if len(found) > 1:
        raise DataError(f"several files for the {split} split in {directory}: {', '.join(f.name for f in found)}")
    return found[0]


def read_files(cfg: TaskConfig, files: list[Path]) -> Any:
    """Local json/jsonl/csv/tsv/parquet files (one type) as one `datasets.Dataset`, checked for the task's columns."""
    import datasets

    suffixes = {file.suffix for file in files}
    for suffix in suffixes:
        if suffix not in READERS:
            raise DataError(f"{files[0]}: unsupported file type '{suffix}'; use one of {', '.join(READERS)}")
    if len({READERS[s] for s in suffixes}) > 1 or {".csv", ".tsv"} <= suffixes:
        raise DataError(f"task.path mixes file types ({', '.join(sorted(suffixes))}); use one")
    for file in files:
        if file.stat().st_size == 0:
            raise DataError(f"{file} is empty")
    datasets.disable_progress_bars()  # a local file loads in a moment; its bars would only clutter the run's output
    suffix = files[0].suffix
    options: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if suffix in (".csv", ".tsv"):  # every cell as written: '007' stays '007' (pandas would make it 7.0)
        options["features"] = text_columns(files[0], options.get("delimiter", ","))
    origin = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"
    datasets_log = logging.getLogger("datasets")
    level, datasets_log.level = datasets_log.level, logging.CRITICAL  # it logs each failure before raising it
    try:
        table = datasets.load_dataset(READERS[suffix], data_files=[str(f) for f in files], split="train", **options)
    except Exception as exc:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(exc):  # a CSV header without rows
            raise DataError(f"{origin} holds no rows") from None
        raise DataError(malformed_json_line(files) or f"cannot read {origin}: {root_cause(exc)}") from None
    finally:
        datasets_log.level = level
    require_columns(cfg, table.column_names, origin)
    return table


def text_columns(file: Path, delimiter: str) -> Any:
    """Features that read every column of a CSV/TSV file (named by its header) as text."""
    import datasets

    try:
        with open(file, encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), [])
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    return datasets.Features({column: datasets.Value("string") for column in header})


def root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause: `datasets` wraps a reader's own error in a generic one."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return first_line(exc)


def malformed_json_line(files: list[Path]) -> str | None:
    """'<file>:<line>: ...' for the first line of a JSON Lines file that is not one JSON value, if any."""
    for file in files:
        if file.suffix != ".jsonl":
            continue
        with open(file, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{file}:{number}: malformed JSON line ({exc.msg}, column {exc.colno})"
    return None


def require_columns(cfg: TaskConfig, columns: Sequence[str], origin: str) -> None:
    """Every column the task's format reads must exist (the roles a format can do without may be absent)."""
    mapping = {**DEFAULT_COLUMNS[cfg.format], **(cfg.columns or {})}
    optional = set(mapping) - set(REQUIRED_ROLES[cfg.format])
    for role, column in mapping.items():
        if column is None or column in columns:
            continue
        if role in optional and (cfg.columns or {}).get(role) is None:
            continue  # an optional role left at its default column name, which this data does not have
        raise DataError(
            f"{origin}: missing column '{column}' (task.columns.{role}, format {cfg.format})"
            f"{did_you_mean(column, columns)}; the data has: {', '.join(columns)}"
        )
