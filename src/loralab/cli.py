"""The `loralab` command line: one sub-command per verb; user errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import ConfigError, LoraLabError

EXIT_USAGE = 2
GSM8K_PROFILES = ("lm-eval", "paper_math")


def main(argv: list[str] | None = None) -> int:
    args = parse_command(build_parser(), argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("loralab").setLevel(logging.INFO)
    try:
        check_launch(args.command)
        return respond(args)
    except LoraLabError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of a pipe left early (`loralab config show | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def check_launch(command: str) -> None:
    """Under torchrun / accelerate launch only `train` runs: the processes of one launch share one run."""
    from loralab.launching import launched

    if launched() and command != "train":
        raise ConfigError(
            f"loralab {command} does not run under a multi-process launch (only train does); "
            "sweeps and HPO studies scale by separate processes: --jobs, --workers, or launch slurm --array"
        )


@dataclass
class Reply:
    """What a verb with --json found: its JSON object, how to print it for a person, and the exit code."""

    payload: dict
    human: Callable[[], None]
    code: int = 0


def respond(args: argparse.Namespace) -> int:
    """Run the verb; with --json whatever it prints goes to stderr and its reply is the one JSON object on stdout."""
    if not getattr(args, "json", False):
        reply = args.handler(args)
        if isinstance(reply, int):
            return reply
        reply.human()
        return reply.code
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        reply = args.handler(args)
    print(json.dumps(reply.payload, default=str), file=stdout)
    return reply.code


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (directory, action, metrics), nothing else"
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that names an option by its first long spelling (the others are aliases) and keeps the epilog's lines."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        longs = [name for name in action.option_strings if name.startswith("--")]
        if len(longs) > 1:
            action = copy.copy(action)
            action.option_strings = [name for name in action.option_strings if name not in longs[1:]]
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2; every long option also answers to its other
    spelling (`--calib-task` and `--calib_task` are one flag, listed dashed)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs) -> argparse.Action:
        return super().add_argument(*with_aliases(names), **kwargs)

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"loralab: error: {message} (see '{self.prog} --help')\n")


def with_aliases(names: tuple[str, ...]) -> list[str]:
    """Option names, each long one followed by its other spelling (dashes ↔ underscores); positionals unchanged."""
    spelled = []
    for name in names:
        other = "--" + (name[2:].replace("_", "-") if "_" in name else name[2:].replace("-", "_"))
        spelled += [name, other] if name.startswith("--") and other != name else [name]
    return list(dict.fromkeys(spelled))


TRAIN_EPILOG = """\
Without --config the packaged quickstart experiment is the base and the overrides apply on top.
`loralab config show` with the same arguments prints exactly what train runs (and its hash);
`loralab config list` names the packaged experiments --config takes.

examples:
  loralab train seed=1 train.lr=3e-4
  loralab train --config shake_align_rte model.name=tiny-roberta task.name=synthetic/entailment method.name=ours
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loralab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser(
        "train", help="train one run (no --config: the quickstart, overrides on top)", epilog=TRAIN_EPILOG
    )
    add_config_arguments(train)
    add_json_argument(train)
    train.set_defaults(handler=cmd_train)

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="action", required=True, parser_class=Parser)
    show = config_commands.add_parser("show", help="print the fully resolved config")
    add_config_arguments(show)
    show.set_defaults(handler=cmd_config_show)
    listing = config_commands.add_parser("list", help="the packaged experiments that --config NAME finds")
    listing.set_defaults(handler=cmd_config_list)
    explaining = config_commands.add_parser("explain", help="type, default, allowed values and help of one key")
    explaining.add_argument("key", help="a dotted key: train.lr, method.adapter.r, method.gradient.grit.kfac_damping")
    add_config_arguments(explaining)
    explaining.set_defaults(handler=cmd_config_explain)

    evaluate = commands.add_parser("eval", help="evaluate a run's adapter, or a base model + adapter on a task")
    evaluate.add_argument("--run", type=Path, help="a run directory (uses its config.yaml and adapter/)")
    evaluate.add_argument("--base", help="base model (preset, local path or hub id)")
    evaluate.add_argument("--adapter", type=Path, help="adapter directory")
    evaluate.add_argument("--task", help="a built-in task name, or a YAML file with a task: section")
    evaluate.add_argument("--out", type=Path, help="directory for eval.json and predictions.jsonl")
    add_generation_arguments(evaluate)
    add_config_arguments(evaluate, files=True)
    add_json_argument(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    edit = commands.add_parser("edit", help="edit a trained adapter post hoc")
    edit_commands = edit.add_subparsers(dest="action", required=True, parser_class=Parser)
    spectral = edit_commands.add_parser("spectral", help="LoRA Spectral Edit: rescale singular values by sensitivity")
    add_spectral_arguments(spectral)
    spectral.set_defaults(handler=cmd_edit_spectral)

    export = commands.add_parser(
        "export",
        help="write a dual-rank view, or a GRIT adapter at its reprojection ranks, as a plain PEFT adapter; "
        "or push an adapter to the Hugging Face Hub",
    )
    export.add_argument("adapter", type=Path, help="adapter directory, or a run directory holding adapter/")
    form = export.add_mutually_exclusive_group()
    form.add_argument("--view", choices=("core", "full"), help="dual-rank view: core (rank r, the default) or full")
    form.add_argument("--compress", action="store_true", help="GRIT: per-module rank k_m (PEFT rank_pattern)")
    export.add_argument("--out", type=Path, help="directory for the exported adapter (needed but with --push-to-hub)")
    export.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="upload the adapter (or the exported one) with a model card to the Hub"
    )
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    export.set_defaults(handler=cmd_export)
    add_analysis_commands(commands)

    report = commands.add_parser("report", help="mean ± std tables of completed runs, grouped by all but the seed")
    report.add_argument("paths", nargs="+", type=Path, help="run roots or run directories")
    report.add_argument("--format", choices=("md", "csv", "latex"), default="md", help="table format (default md)")
    report.add_argument("--out", type=Path, help="write the table here too")
    report.add_argument("--plots", type=Path, metavar="DIR", help="also write convergence and method plots (PNG, PDF)")
    add_json_argument(report)
    report.set_defaults(handler=cmd_report)

    sweep = commands.add_parser("sweep", help="train the product of grids, an ablation and seeds; then the table")
    add_config_arguments(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a swept key (repeatable)")
    sweep.add_argument("--ablation", metavar="NAME", help="a protocol ablation: rank, alpha or modules")
    sweep.add_argument("--seeds", default="42,1337,2024", help="comma-separated seeds (default 42,1337,2024)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time; above 1, one process per run")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and what each would do; train nothing")
    sweep.add_argument("--format", choices=("md", "csv", "latex"), default="md", help="table format (default md)")
    sweep.add_argument("--out", type=Path, help="write the table here too")
    add_json_argument(sweep)
    sweep.set_defaults(handler=cmd_sweep)
    add_hpo_command(commands)
    add_launch_command(commands)

    score = commands.add_parser("score", help="re-score a predictions.jsonl file")
    score.add_argument("--task", required=True, help="a built-in task name, or a YAML file with a task: section")
    score.add_argument("--predictions", required=True, type=Path, help="a predictions.jsonl of train or eval")
    score.add_argument("--out", type=Path, help="write the metrics as JSON here too")
    score.add_argument("--profile", choices=GSM8K_PROFILES, help="GSM8K-style tasks: the scoring profile (lm-eval)")
    add_json_argument(score)
    score.set_defaults(handler=cmd_score)
    return parser


def add_hpo_command(commands) -> None:
    """`hpo`: an Optuna study (or the hierarchical stages) over the config; each flag sets an hpo.* key."""
    hpo = commands.add_parser("hpo", help="tune hyper-parameters with Optuna: trials are runs; resumable, many workers")
    add_config_arguments(hpo)
    hpo.add_argument("--n-trials", type=int, metavar="N", help="finished trials wanted (hpo.n_trials)")
    hpo.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes (default 1)")
    hpo.add_argument("--schedule", metavar="NAME", help="a packaged schedule: preeval or final (hpo.schedule)")
    hpo.add_argument("--storage", metavar="URL", help="Optuna storage URL or journal file (hpo.storage)")
    hpo.add_argument("--study", metavar="NAME", help="study name (hpo.study_name)")
    add_json_argument(hpo)
    hpo.set_defaults(handler=cmd_hpo)


def cmd_hpo(args: argparse.Namespace) -> Reply:
    from loralab.config.load import run_files
    from loralab.experiments.hpo import run_hpo

    flags = {"n_trials": args.n_trials, "schedule": args.schedule, "storage": args.storage, "study_name": args.study}
    extra = [f"hpo.{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    results = run_hpo(run_files(args.config), [*args.set, *args.overrides, *extra], args.workers)
    unfinished = [result for result in results if not result.finished and result.plan.timeout is None]
    for result in unfinished:
        print(f"loralab: study {result.plan.name} is not finished; run the command again to continue", file=sys.stderr)
    studies = [
        {
            "name": result.plan.name,
            "directory": result.plan.directory,
            "complete": result.complete,
            "pruned": result.pruned,
            "failed": result.failed,
            "n_trials": result.plan.n_trials,
            "finished": result.finished,
            "best": result.best,
        }
        for result in results
    ]
    payload = {"verb": "hpo", "action": "hpo", "studies": studies}
    return Reply(payload, lambda: print("\n".join(result.line() for result in results)), 1 if unfinished else 0)


def add_launch_command(commands) -> None:
    """`launch slurm`: submit a loralab command through submitit; `launch local`: train data-parallel here."""
    launch = commands.add_parser(
        "launch", help="run a loralab command as SLURM jobs (sweeps and hpo workers as arrays) or data-parallel here"
    )
    targets = launch.add_subparsers(dest="target", required=True, parser_class=Parser)
    slurm = targets.add_parser(
        "slurm",
        help="submit a command through submitit: loralab launch slurm [options] -- <loralab command>",
        description="Submit `python -m loralab <command>` through submitit; preempted tasks are requeued and resume.",
    )
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument(
        "--gpus-per-node", type=int, default=0, metavar="G", help="default 0; a train over 2+ runs under accelerate"
    )
    slurm.add_argument("--nodes", type=int, default=1, metavar="N", help="default 1; above 1: one multi-node train")
    slurm.add_argument("--cpus-per-task", type=int, metavar="N", help="CPUs per task (also its OMP_NUM_THREADS)")
    slurm.add_argument("--mem-gb", type=int, metavar="GB", help="memory per node")
    slurm.add_argument("--time", type=int, default=240, metavar="MIN", help="minutes per task (default 240)")
    slurm.add_argument(
        "--array", action="store_true", help="sweep: an array task per run not completed; hpo: one per --workers"
    )
    slurm.add_argument("--max-parallel", type=int, metavar="K", help="array tasks at once (--array=0-N%%K)")
    slurm.add_argument("--folder", default="runs/slurm/%j", help="submitit's scripts and logs (default runs/slurm/%%j)")
    slurm.add_argument(
        "--executor", choices=("slurm", "local"), default="slurm", help="local: submitit's LocalExecutor, waited for"
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script and each task's command")
    slurm.add_argument("launched", nargs="*", metavar="-- COMMAND", help="the loralab command, after --")
    slurm.set_defaults(handler=cmd_launch_slurm)
    local = targets.add_parser(
        "local",
        help="train one run in N data-parallel processes on this machine (torchrun; gloo on CPU)",
        description="Run `loralab train ...` in --procs processes through torchrun; see docs/parallel.md.",
    )
    local.add_argument("--procs", type=int, default=2, metavar="N", help="processes (default 2)")
    local.add_argument("launched", nargs="*", metavar="-- COMMAND", help="the loralab train command, after --")
    local.set_defaults(handler=cmd_launch_local)


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    from loralab.experiments.launch import Resources, launch, plan_launch

    limits = args.partition, args.gpus_per_node, args.nodes, args.cpus_per_task, args.mem_gb, args.time
    resources = Resources(*limits, args.max_parallel)
    plan = plan_launch(args.launched, parse_launched(args.launched), args.array, resources)
    return launch(plan, resources, args.executor, args.folder, args.dry_run)


def cmd_launch_local(args: argparse.Namespace) -> int:
    from loralab.experiments.launch_local import launch_local

    if parse_launched(args.launched).command != "train":
        raise ConfigError(f"launch local runs train in data-parallel processes, not {args.launched[0]}")
    return launch_local(args.procs, args.launched)


def parse_launched(command: list[str]) -> argparse.Namespace:
    """The launched command, parsed by loralab's own parser so that a typo fails now and not in the queue."""
    if not command:
        raise LoraLabError("launch: no loralab command after '--' (e.g. loralab launch local -- train ...)")
    if command[0] == "launch":
        raise LoraLabError("launch: the launched command cannot be launch itself")
    return parse_command(build_parser(), command)


def parse_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a command whose bare `a.b=v` overrides may stand on both sides of its options (`seed=1 --json
    train.lr=0.1`): argparse takes only the first group as the positional, so the later ones join it, in order."""
    args, extra = parser.parse_known_args(argv)
    scattered = [word for word in extra if "=" in word and not word.startswith("-")]
    if extra != scattered or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if scattered:
        args.overrides = [*args.overrides, *scattered]
    return args


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ `low` (argparse reports anything else in one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value

    return parse


def add_generation_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """GSM8K-style evaluation flags; each sets an eval.* key (a flag left out keeps the config's value)."""
    flag = f"--{prefix.replace('_', '-')}"
    parser.add_argument(
        f"{flag}fewshot", type=at_least(0), help="shots from the train split (default: the profile's, 5)"
    )
    parser.add_argument(f"{flag}profile", choices=GSM8K_PROFILES, help="prompting and scoring (default lm-eval)")
    parser.add_argument(f"{flag}backend", choices=("hf", "vllm"), help="generation backend (default hf)")
    parser.add_argument(f"{flag}max-samples", type=at_least(1), help="evaluate the first N examples")
    parser.add_argument(f"{flag}max-new-tokens", type=at_least(1), help="token budget (default: the profile's)")
    parser.add_argument(f"{flag}batch-size", type=at_least(1), help="generation batch size (default 32)")


def generation_overrides(args: argparse.Namespace, prefix: str = "") -> list[str]:
    """eval.* overrides for the generation flags that were given."""
    keys = ("fewshot", "profile", "backend", "batch_size")
    values = {key: getattr(args, prefix + key) for key in keys}
    return [f"eval.{key}={value}" for key, value in values.items() if value is not None]


def add_spectral_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the published LoRA Spectral Edit tool, plus calibration data, device and evaluation choices."""
    from loralab.edit.options import CHOICES, FIELD_HELP, EditRule

    parser.add_argument(
        "--base", "--base-model", required=True, help="base model (preset, local path or hub id); also --base_model"
    )
    parser.add_argument(
        "--adapter", "--lora-path", required=True, help="LoRA adapter directory or hub id; also --lora_path"
    )
    parser.add_argument(
        "--out", "--out-dir", required=True, type=Path, help="directory for the edited adapter; also --out_dir"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=["down_proj", "o_proj"],
        metavar="NAME",
        help="modules to edit, matched on the last name (default down_proj o_proj)",
    )
    parser.add_argument("--layer-min", type=int, help="first layer to edit (inclusive)")
    parser.add_argument("--layer-max", type=int, help="last layer to edit (inclusive)")
    for name, default in EditRule().as_dict().items():  # the rule's defaults and choices, so they cannot drift
        flag, text = "--" + name.replace("_", "-"), FIELD_HELP[name]
        if name == "asymmetric_update":
            parser.add_argument(flag, action="store_true", help=text)
        elif name in CHOICES:
            parser.add_argument(flag, default=default, choices=CHOICES[name], help=f"{text} (default {default})")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"{text} (default {default})")
    parser.add_argument(
        "--calib-task",
        default="gsm8k",
        help="calibration task (train split): a built-in sft/chat task or a YAML file with a task: section",
    )
    parser.add_argument("--calib-path", help="calibration data in the hub's schema (a file or directory)")
    parser.add_argument("--calib-samples", type=at_least(1), default=32, help="calibration examples (default 32)")
    parser.add_argument("--calib-batch-size", type=at_least(1), default=2, help="calibration batch size (default 2)")
    parser.add_argument("--max-length", type=at_least(1), default=512, help="calibration token limit (default 512)")
    parser.add_argument(
        "--calib-tokenization",
        default="loralab",
        choices=["loralab", "published"],
        help="loralab: the prompt with the tokenizer's special tokens (BOS), as loralab trains; published: "
        "prompt + answer + EOS text without special tokens, as the published tool (default loralab)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights for calibration and --eval (default auto: float16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--eval", choices=("gsm8k",), help="evaluate the source and the edited adapter")
    parser.add_argument("--eval-task", default="gsm8k", help="GSM8K-style task to evaluate on (default gsm8k)")
    parser.add_argument("--eval-path", help="evaluation data in the hub's schema (a file or directory)")
    add_generation_arguments(parser, prefix="eval_")


def add_config_arguments(parser: argparse.ArgumentParser, files: bool = True) -> None:
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE|NAME",
        help="a YAML file or a packaged experiment (loralab config list); repeatable, later wins",
    )
    parser.add_argument("--set", action="append", default=[], metavar="a.b=v", help="override a key (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="a.b=v", help="overrides in the bare form")


def resolve(args: argparse.Namespace, extra: list[str] = ()):
    from loralab.config import load_config

    return load_config(args.config, [*extra, *args.set, *args.overrides])


def train_config(args: argparse.Namespace):
    """What `train` runs and `config show` prints: the --config files (none: the quickstart) and the overrides."""
    from loralab.config.load import load_config, run_files

    return load_config(run_files(args.config), [*args.set, *args.overrides])


def cmd_train(args: argparse.Namespace) -> Reply | int:
    from loralab.config import config_hash
    from loralab.training.recipe import run_training

    if not (args.config or args.set or args.overrides):
        print(
            "loralab: no arguments, running the offline quickstart (LoRA on MiniLM, synthetic/sentiment)",
            file=sys.stderr,
        )
    from loralab import collectives

    config = train_config(args)
    outcome = run_training(config)
    if not collectives.is_main():  # under a multi-process launch every process returns the same outcome
        return 0
    payload = result_payload("train", outcome.action, outcome.directory, outcome.metrics)
    payload["config_hash"] = config_hash(config)
    return Reply(payload, lambda: print_results(outcome.metrics, outcome.directory, outcome.action))


def cmd_config_show(args: argparse.Namespace) -> int:
    from loralab.config import config_hash, dump_yaml

    config = train_config(args)
    print(f"# config hash: {config_hash(config)}")
    print(dump_yaml(config), end="")
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    from loralab.config.load import experiment_names, experiment_summary

    names = experiment_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {experiment_summary(name)}")
    return 0


def cmd_config_explain(args: argparse.Namespace) -> int:
    """One key's reference entry; `method.<axis>.<field>` is read for the kinds the config resolves to."""
    from loralab.config.load import config_to_dict, dotted_items
    from loralab.config.reference import explain

    config = train_config(args)
    kinds = {"adapter": config.method.adapter.kind, "gradient": config.method.gradient.kind}
    print(explain(args.key, kinds, dotted_items(config_to_dict(config))))
    return 0


def cmd_eval(args: argparse.Namespace) -> Reply:
    from loralab.evaluation.standalone import evaluate_adapter

    if args.run is not None:
        if args.base or args.adapter or args.task:
            raise LoraLabError("eval takes either --run DIR or --base/--adapter/--task, not both")
        run_config = args.run / "config.yaml"
        if not run_config.is_file():
            raise LoraLabError(f"not a run directory (no config.yaml): {args.run}")
        config = resolve(
            argparse.Namespace(config=[str(run_config), *args.config], set=args.set, overrides=args.overrides),
            generation_overrides(args),
        )
        adapter = args.run / "adapter"
        out = args.out or args.run / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        if not (args.base and args.adapter and args.task):
            raise LoraLabError("eval needs --run DIR, or all of --base MODEL --adapter DIR --task TASK")
        if Path(args.task).suffix in (".yaml", ".yml"):  # a file with a task: section of one's own
            args.config = [args.task, *args.config]
            task = []
        else:
            task = [f"task.name={args.task}"]
        config = resolve(args, [f"model.name={args.base}", *task, *generation_overrides(args)])
        adapter = args.adapter
        out = args.out or Path("evals") / f"{Path(args.task).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    metrics = evaluate_adapter(config, adapter, out, args.max_samples, args.max_new_tokens)
    return Reply(result_payload("eval", "eval", out, metrics), lambda: print_results(metrics, out, "eval"))


def cmd_edit_spectral(args: argparse.Namespace) -> int:
    from loralab.config import load_config
    from loralab.data import load_task
    from loralab.edit import EditRule, SpectralEdit, spectral_edit
    from loralab.edit.evaluate import evaluate_before_after
    from loralab.evaluation.generate import require_vllm

    edit = SpectralEdit(
        args.base,
        args.adapter,
        args.out,
        EditRule(**{key: getattr(args, key) for key in EditRule.__dataclass_fields__}),
        tuple(args.target_modules),
        args.layer_min,
        args.layer_max,
        args.calib_task,
        args.calib_path,
        args.calib_samples,
        args.calib_batch_size,
        args.max_length,
        args.dtype,
        args.device,
        args.overwrite,
        args.calib_tokenization,
    )
    config = None
    if args.eval:  # checked before the edit runs, so a bad evaluation setting costs no calibration
        task = [f"task.name={args.eval_task}"] + ([f"task.path={args.eval_path}"] if args.eval_path else [])
        model = [f"model.name={args.base}", f"model.dtype={edit.model_config().dtype}"]
        config = load_config([], [*model, *task, *generation_overrides(args, "eval_")])
        if config.eval.backend == "vllm":
            require_vllm()
        load_task(config.task)
    outcome = spectral_edit(edit)
    print(f"edited {len(outcome.sigma_stats)} modules of {args.adapter} ({args.mode}): {outcome.out_dir}")
    if config is not None:
        results = evaluate_before_after(config, outcome, args.eval_max_samples, args.eval_max_new_tokens)
        print_results({f"{name}/{k}": v for name, m in results.items() for k, v in m.items()}, outcome.out_dir, "edit")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    run = args.adapter if (args.adapter / "adapter").is_dir() else None
    source = args.adapter / "adapter" if run else args.adapter
    if args.push_to_hub is None or args.view or args.compress:
        if args.out is None:
            raise LoraLabError("export needs --out DIR (only --push-to-hub alone uploads the adapter as it is)")
        source = write_export(source, args.out, args.view, args.compress)
    if args.push_to_hub is not None:
        from loralab.hub import push_adapter

        files = push_adapter(source, args.push_to_hub, args.private, run)
        print(f"pushed {source} to https://huggingface.co/{args.push_to_hub}: {', '.join(files)}")
    return 0


def write_export(source: Path, out: Path, view: str | None, compress: bool) -> Path:
    """A GRIT adapter at its per-module ranks (compress) or a dual-rank view (core by default), written to `out`."""
    from loralab.adapters.compress import compress_adapter
    from loralab.adapters.dual_rank import export_view

    if compress:
        ranks = compress_adapter(source, out)
        low, high, kept = min(ranks.values()), max(ranks.values()), sum(ranks.values())
        print(f"{source} written at per-module ranks {low}..{high} (sum {kept}) as a PEFT adapter: {out}")
        return out
    exported = export_view(source, out, view or "core")
    print(f"{view or 'core'} view of {source} written as a PEFT adapter: {exported}")
    return exported


def add_analysis_commands(commands) -> None:
    """`merge` (fold a PEFT adapter into its base, optionally checked and timed) and `analyze`."""
    source_help = "adapter directory, or a run directory holding adapter/ (its config gives base, head and task)"
    merge = commands.add_parser("merge", help="merge a PEFT adapter into its base model (PEFT merge_and_unload)")
    merge.add_argument("adapter", type=Path, help=source_help)
    merge.add_argument("--base", help="base model (preset, local path or hub id); default: the run's")
    merge.add_argument("--task", help="task (head and probe texts); default: the run's")
    merge.add_argument("--out", type=Path, required=True, help="directory for the merged model and tokenizer")
    merge.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="merged weights (float32)"
    )
    merge.add_argument("--check", action="store_true", help="compare logits; time adapter, merged and base")
    merge.add_argument("--probe-batch", type=int, default=8, metavar="N", help="probe texts for --check (default 8)")
    merge.add_argument("--tol", type=float, default=1e-5, help="largest allowed max |Δ| of the logits (1e-5)")
    merge.add_argument("--rounds", type=int, default=6, help="--check timing rounds (default 6)")
    merge.add_argument("--repeats", type=int, default=5, help="forward passes per side per round (default 5)")
    merge.set_defaults(handler=cmd_merge)

    analyze = commands.add_parser("analyze", help="parameter counts, frozen-base hash, LoRA spectra and ranks, plots")
    analyze.add_argument("adapter", type=Path, help=source_help)
    analyze.add_argument("--base", help="base model (preset, local path or hub id); default: the run's")
    analyze.add_argument("--task", help="task (head and probe texts); default: the run's")
    analyze.add_argument("--out", type=Path, help="directory for analysis.json and figures (default ../analysis)")
    analyze.add_argument("--tau", type=float, default=0.9, help="energy share of the energy rank (default 0.9)")
    analyze.add_argument("--representations", type=int, metavar="N", help="compare hidden states on N probe texts")
    analyze.set_defaults(handler=cmd_analyze)


def cmd_merge(args: argparse.Namespace) -> int:
    from loralab.analysis.merge import latency_table, merge_adapter, mergeable_source

    source = mergeable_source(args.adapter, args.base, args.task)
    outcome = merge_adapter(
        source, args.out, args.dtype, args.check, args.probe_batch, args.tol, args.rounds, args.repeats
    )
    print(f"merged {source.adapter} into {source.model.name} ({args.dtype}): {outcome.out}")
    if outcome.check is None:
        return 0
    check = outcome.check
    diffs = check["max_abs_diff"], check["reload_max_abs_diff"]
    print("max |Δ| logits, adapter vs merged: {:.3e} (reloaded from --out: {:.3e})".format(*diffs))
    print(latency_table(check["latency"]), end="")
    if not outcome.ok:
        print(f"loralab: merge check failed: max |Δ| {max(diffs):.3e} > --tol {args.tol:g}", file=sys.stderr)
        return 1
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from loralab.analysis.analyze import analyze, default_out
    from loralab.analysis.source import resolve_source

    source = resolve_source(args.adapter, args.base, args.task)
    out = args.out or default_out(source)
    document = analyze(source, out, args.tau, args.representations)
    params, lora = document["parameters"], document["lora"]["summary"]
    print(f"adapter parameters: {params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.3f} %)")
    frozen = document["frozen_base"]
    verdict = "n/a, nothing is frozen" if frozen["frozen_base_ok"] is None else frozen["frozen_base_ok"]
    print(f"frozen base unchanged: {verdict} ({frozen['frozen_tensors']} tensors hashed)")
    if lora["modules"]:
        print(
            f"LoRA modules: {lora['modules']}, mean effective rank {lora['mean_effective_rank']:.2f}, "
            f"mean utilisation {lora['mean_rank_utilisation']:.3f}"
        )
    print(f"analysis: {out / 'analysis.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> Reply:
    from loralab.experiments.report import find_groups, summaries, table
    from loralab.tables import render

    groups = find_groups(args.paths)
    text = render(*table(groups), args.format)
    if args.out:
        write_text(args.out, text)
    payload = {"verb": "report", "action": "report", "groups": summaries(groups), "plots": []}
    if args.plots is not None:
        from loralab.experiments.curves import write_plots

        files, notes = write_plots(groups, args.plots)
        payload["plots"] = [str(path) for path in files]
        for line in [*notes, *(f"plot: {path}" for path in files)]:
            print(line, file=sys.stderr)
    return Reply(payload, lambda: print(text, end=""))


def cmd_sweep(args: argparse.Namespace) -> Reply:
    from loralab.config.load import run_files
    from loralab.experiments.sweep import describe_plan, parse_seeds, plan_sweep, run_sweep, summary

    files, overrides = run_files(args.config), [*args.set, *args.overrides]
    runs = plan_sweep(files, overrides, args.grid, args.ablation, parse_seeds(args.seeds))
    if args.dry_run:
        plan = [{"directory": str(run.directory), "action": run.action, "point": run.name} for run in runs]
        return Reply({"verb": "sweep", "action": "dry-run", "runs": plan}, lambda: print(describe_plan(runs), end=""))
    results = run_sweep(runs, files, args.jobs)
    text, legend = summary(results, args.format)
    for line in legend:
        print(line, file=sys.stderr)
    if text and args.out:
        write_text(args.out, text)
    failed = [result for result in results if result.state == "failed"]
    if failed:
        print(f"loralab: {len(failed)} of {len(results)} runs failed:", file=sys.stderr)
        for result in failed:
            print(f"  {result.run.label} {result.run.name}: {result.error}", file=sys.stderr)
    done = [
        {
            "directory": str(r.run.directory),
            "action": r.state,
            "point": r.run.name,
            "metrics": r.metrics,
            "error": r.error,
        }
        for r in results
    ]
    return Reply({"verb": "sweep", "action": "sweep", "runs": done}, lambda: print(text, end=""), 1 if failed else 0)


def cmd_score(args: argparse.Namespace) -> Reply:
    from loralab.evaluation.standalone import score_predictions

    metrics = score_predictions(args.task, args.predictions, args.profile)
    text = json.dumps(metrics, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
    payload = {"verb": "score", "action": "score", "predictions": str(args.predictions), "metrics": metrics}
    return Reply(payload, lambda: print(text))


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` (an --out file), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def result_payload(verb: str, action: str, directory: Path, metrics: dict[str, float]) -> dict:
    """The --json object of one run: verb, action, directory and metrics."""
    return {"verb": verb, "action": action, "directory": str(directory), "metrics": metrics}


def print_results(metrics: dict[str, float], directory: Path, action: str) -> None:
    """The metrics as a table and the run directory on a line of its own (never wrapped, so a pipe gets it whole)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"results ({action})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    terminal = sys.stdout.isatty()
    Console(width=None if terminal else 10_000).print(table)
    print(f"run directory: {directory}")


if __name__ == "__main__":
    raise SystemExit(main())
