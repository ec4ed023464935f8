"""The `loralab` command line: one sub-command per verb; user errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from loralab.errors import LoraLabError

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("loralab").setLevel(logging.INFO)
    try:
        return args.handler(args)
    except LoraLabError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"loralab: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loralab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train one run (no arguments: the offline quickstart)")
    add_config_arguments(train)
    train.set_defaults(handler=cmd_train)

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="action", required=True, parser_class=Parser)
    show = config_commands.add_parser("show", help="print the fully resolved config")
    add_config_arguments(show)
    show.set_defaults(handler=cmd_config_show)

    evaluate = commands.add_parser("eval", help="evaluate a run's adapter, or a base model + adapter on a task")
    evaluate.add_argument("--run", type=Path, help="a run directory (uses its config.yaml and adapter/)")
    evaluate.add_argument("--base", help="base model (preset, local path or hub id)")
    evaluate.add_argument("--adapter", type=Path, help="adapter directory")
    evaluate.add_argument("--task", help="task name")
    evaluate.add_argument("--max_samples", "--max-samples", type=int, help="evaluate the first N examples")
    evaluate.add_argument("--out", type=Path, help="directory for eval.json and predictions.jsonl")
    add_config_arguments(evaluate, files=True)
    evaluate.set_defaults(handler=cmd_eval)

    export = commands.add_parser(
        "export", help="write a dual-rank view, or a GRIT adapter at its reprojection ranks, as a plain PEFT adapter"
    )
    export.add_argument("adapter", type=Path, help="adapter directory, or a run directory holding adapter/")
    form = export.add_mutually_exclusive_group()
    form.add_argument("--view", choices=("core", "full"), help="dual-rank view: core (rank r, the default) or full")
    form.add_argument("--compress", action="store_true", help="GRIT: per-module rank k_m (PEFT rank_pattern)")
    export.add_argument("--out", type=Path, required=True, help="directory for the exported adapter")
    export.set_defaults(handler=cmd_export)

    report = commands.add_parser("report", help="mean ± std tables of completed runs, grouped by all but the seed")
    report.add_argument("paths", nargs="+", type=Path, help="run roots or run directories")
    report.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    report.add_argument("--out", type=Path, help="write the table here too")
    report.set_defaults(handler=cmd_report)

    score = commands.add_parser("score", help="re-score a predictions.jsonl file")
    score.add_argument("--task", required=True)
    score.add_argument("--predictions", required=True, type=Path)
    score.add_argument("--out", type=Path, help="write the metrics as JSON here too")
    score.set_defaults(handler=cmd_score)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, files: bool = True) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="a.b=v", help="override a key (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="a.b=v", help="overrides in the bare form")


def resolve(args: argparse.Namespace, extra: list[str] = ()):
    from loralab.config import load_config

    return load_config(args.config, [*extra, *args.set, *args.overrides])


def cmd_train(args: argparse.Namespace) -> int:
    from loralab.config.load import packaged_experiment
    from loralab.training.recipe import run_training

    quickstart = not (args.config or args.set or args.overrides)
    if quickstart:
        args.config = [str(packaged_experiment("quickstart"))]
        print(
            "loralab: no arguments, running the offline quickstart (LoRA on MiniLM, synthetic/sentiment)",
            file=sys.stderr,
        )
    outcome = run_training(resolve(args))
    print_results(outcome.metrics, outcome.directory, outcome.action)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from loralab.config import config_hash, dump_yaml

    config = resolve(args)
    print(f"# config hash: {config_hash(config)}")
    print(dump_yaml(config), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from loralab.evaluation.standalone import evaluate_adapter

    if args.run is not None:
        if args.base or args.adapter or args.task:
            raise LoraLabError("eval takes either --run DIR or --base/--adapter/--task, not both")
        run_config = args.run / "config.yaml"
        if not run_config.is_file():
            raise LoraLabError(f"not a run directory (no config.yaml): {args.run}")
        config = resolve(
            argparse.Namespace(config=[str(run_config), *args.config], set=args.set, overrides=args.overrides)
        )
        adapter = args.run / "adapter"
        out = args.out or args.run / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        if not (args.base and args.adapter and args.task):
            raise LoraLabError("eval needs --run DIR, or all of --base MODEL --adapter DIR --task TASK")
        config = resolve(args, [f"model.name={args.base}", f"task.name={args.task}"])
        adapter = args.adapter
        out = args.out or Path("evals") / f"{Path(args.task).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    metrics = evaluate_adapter(config, adapter, out, args.max_samples)
    print_results(metrics, out, "eval")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from loralab.adapters.compress import compress_adapter
    from loralab.adapters.dual_rank import export_view

    source = args.adapter / "adapter" if (args.adapter / "adapter").is_dir() else args.adapter
    if args.compress:
        ranks = compress_adapter(source, args.out)
        low, high, kept = min(ranks.values()), max(ranks.values()), sum(ranks.values())
        print(f"{source} written at per-module ranks {low}..{high} (sum {kept}) as a PEFT adapter: {args.out}")
        return 0
    view = args.view or "core"
    out = export_view(source, args.out, view)
    print(f"{view} view of {source} written as a PEFT adapter: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from loralab.experiments.report import find_groups, render, table

    text = render(*table(find_groups(args.paths)), args.format)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from loralab.evaluation.standalone import score_predictions

    metrics = score_predictions(args.task, args.predictions)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def print_results(metrics: dict[str, float], directory: Path, action: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"results ({action})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"run directory: {directory}")


if __name__ == "__main__":
    raise SystemExit(main())
