"""`loralab launch slurm`: the sbatch script of a sweep array, the same array run with submitit's local executor,
re-submission after a lost run, requeue with io.overwrite=resume, multi-GPU trains and the one-line errors."""

from __future__ import annotations

import json
import shlex
import shutil
import sys

import pytest

pytest.importorskip("submitit")

from submitit.helpers import DelayedSubmission

from conftest import TINY
from loralab.cli import build_parser, main
from loralab.config import load_config
from loralab.experiments.launch import Node, Resources, plan_launch

GRID = ["--grid", "method.adapter.r=4,8", "--seeds", "42,1337"]
POINTS = [("4", "42"), ("4", "1337"), ("8", "42"), ("8", "1337")]  # the sweep's order: grid values, seeds fastest
OPTIONS = ["--partition", "gpu", "--gpus-per-node", "1", "--nodes", "1", "--time", "30", "--cpus-per-task", "4"]
OPTIONS += ["--mem-gb", "16"]


def sweep_command(root) -> list[str]:
    return ["sweep", *TINY, f"io.root={root}", *GRID]


def task_line(index: int, root, rank: str, seed: str) -> str:
    """What the dry run prints for one array task: `loralab train` with the run's overrides as --set (no --config:
    the quickstart, which sets io.overwrite=skip as a sweep would)."""
    overrides = [*TINY, f"io.root={root}", f"method.adapter.r={rank}", f"seed={seed}"]
    command = [sys.executable, "-m", "loralab", "train", *(f"--set={text}" for text in overrides)]
    return f"# task {index}: {shlex.join(command)}"


def expected_script(folder, array: str) -> list[str]:
    """submitit's sbatch script for a 4-task array with OPTIONS; logs under the job folder."""
    logs = f"{folder}/%A_%a/%A_%a"
    python = shlex.quote(sys.executable)
    return [
        "#!/bin/bash",
        "",
        "# Parameters",
        f"#SBATCH --array={array}",
        "#SBATCH --cpus-per-task=4",
        f"#SBATCH --error={logs}_0_log.err",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --job-name=loralab-sweep",
        "#SBATCH --mem=16GB",
        "#SBATCH --nodes=1",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}_0_log.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --time=30",
        "#SBATCH --wckey=submitit",
        "",
        "# command",
        "export SUBMITIT_EXECUTOR=slurm",
        f"srun --unbuffered --output {logs}_%t_log.out --error {logs}_%t_log.err "
        f"{python} -u -m submitit.core._submit {folder}/%j",
        "",
    ]


def launch(*argv: str) -> int:
    """main(['launch', 'slurm', ...]); a usage error's SystemExit becomes its exit code."""
    try:
        return main(["launch", "slurm", *argv])
    except SystemExit as exc:
        return exc.code


def ended(err: str) -> dict[int, str]:
    """How each local task ended (done or failed), from launch's line per task."""
    return {int(line.split()[1]): line.split()[2] for line in err.splitlines() if line.startswith("task ")}


def plan(argv: list[str], array: bool = False, gpus: int = 0, nodes: int = 1):
    resources = Resources(None, gpus, nodes, None, None, 240, None)
    return plan_launch(argv, build_parser().parse_args(argv), array, resources)


def resolved(command: list[str]):
    """The config that a task's command line (after `python -m loralab`) resolves to."""
    args = build_parser().parse_args(command[3:])
    return load_config(args.config, [*args.set, *args.overrides])


# ---- the sbatch script ----------------------------------------------------------------------------


def test_dry_run_of_a_sweep_array_renders_the_sbatch_script_and_each_task(tmp_path, capsys):
    root, folder = tmp_path / "runs", tmp_path / "slurm"
    argv = [*OPTIONS, "--array", "--folder", f"{folder}/%j", "--dry-run", "--", *sweep_command(root)]
    assert launch("--max-parallel", "2", *argv) == 0
    captured = capsys.readouterr()
    tasks = [task_line(index, root, *point) for index, point in enumerate(POINTS)]
    assert captured.out.splitlines() == [*expected_script(folder, "0-3%2"), *tasks]
    assert captured.err == "sweep: 4 runs: 4 to submit, 0 skipped (completed)\n"

    assert launch(*argv) == 0  # without --max-parallel submitit still writes the array's size as its limit
    assert capsys.readouterr().out.splitlines() == [*expected_script(folder, "0-3%4"), *tasks]
    assert not root.exists() and not folder.exists()


def test_the_dry_run_is_what_submitit_submits(tmp_path, capsys, monkeypatch):
    """With stand-in srun and sbatch on PATH the real SlurmExecutor submits: the script it hands sbatch is the dry
    run's, and the pickled tasks run the dry run's commands; each requeues with io.overwrite=resume."""
    bin_dir, root, folder = tmp_path / "bin", tmp_path / "runs", tmp_path / "slurm"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    argv = [*OPTIONS, "--array", "--max-parallel", "2", "--folder", f"{folder}/%j"]

    assert launch(*argv, "--dry-run", "--", *sweep_command(root)) == 0
    dry = capsys.readouterr().out
    assert launch(*argv, "--", *sweep_command(root)) == 0
    assert capsys.readouterr().out == f"submitted 4 task(s) as SLURM job 4242; logs in {folder}/%j\n"
    script = (folder / "4242" / "4242_submission.sh").read_text()
    assert dry.startswith(script)
    blank, *lines = dry.removeprefix(script).splitlines()
    assert not blank and lines == [task_line(index, root, *point) for index, point in enumerate(POINTS)]
    for index, line in enumerate(lines):
        delayed = DelayedSubmission.load(folder / f"4242_{index}" / f"4242_{index}_submitted.pkl")
        assert f"# task {index}: {shlex.join(delayed.function.command())}" == line
        requeued = delayed._checkpoint_function().function.command()  # what submitit calls on preemption
        assert requeued == [*delayed.function.command(), "io.overwrite=resume"]
        assert resolved(requeued).io.overwrite == "resume" and resolved(requeued).seed == int(POINTS[index][1])


# ---- requeue and the task commands ----------------------------------------------------------------


def test_requeue_resumes_whatever_the_command_set_and_leaves_other_verbs_alone():
    (train,) = plan(["train", "io.overwrite=force", *TINY, "--set", "seed=3"]).tasks
    assert list(train.argv) == ["train", "--set", "seed=3", "io.overwrite=force", *TINY]  # bare overrides last
    assert resolved(train.command()).io.overwrite == "force"
    requeued = train.checkpoint().function
    assert requeued.resume and requeued.command()[-1] == "io.overwrite=resume"
    config = resolved(requeued.command())
    assert (config.io.overwrite, config.seed, config.model.name) == ("resume", 3, "tiny-bert")
    assert requeued.checkpoint().function.command() == requeued.command()  # requeued again: one resume

    workers = plan(["hpo", *TINY, "--workers", "3", "--n-trials", "4"], array=True).tasks
    assert len(workers) == 3 and len({task.argv for task in workers}) == 1
    hpo = build_parser().parse_args(workers[0].checkpoint().function.command()[3:])
    assert (hpo.workers, hpo.n_trials, hpo.overrides) == (1, 4, [*TINY, "io.overwrite=resume"])

    (report,) = plan(["report", "runs"]).tasks
    assert report.checkpoint().function.command() == [sys.executable, "-m", "loralab", "report", "runs"]


def test_a_multi_gpu_train_runs_under_accelerate_launch(tmp_path, capsys):
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    (one_node,) = plan(["train", *TINY], gpus=4).tasks
    assert one_node.command() == [*prefix, "--num_processes=4", "-m", "loralab", "train", *TINY]
    (two_nodes,) = plan(["train", *TINY], gpus=4, nodes=2).tasks
    machines = ["--num_machines=2", "--machine_rank=1", "--main_process_ip=node01", "--main_process_port=29542"]
    expected = [*prefix, "--num_processes=8", *machines, "-m", "loralab", "train", *TINY]
    assert two_nodes.command(Node("1", "node01", "29542")) == expected
    array = plan(sweep_command(tmp_path / "runs"), array=True, gpus=2).tasks
    assert len(array) == 4 and all(task.command()[:5] == [*prefix, "--num_processes=2"] for task in array)
    (hpo,) = plan(["hpo", *TINY], gpus=2).tasks
    assert hpo.command()[:3] == [sys.executable, "-m", "loralab"]  # trials run inside the hpo worker

    assert launch("--gpus-per-node", "4", "--nodes", "2", "--folder", f"{tmp_path}/%j", "--dry-run", "--", "train") == 0
    script, task = capsys.readouterr().out.split("\n\n# task 0: ")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script and "--array" not in script
    rank = ["--machine_rank=<node rank>", "--main_process_ip=<first node>", "--main_process_port=<port>"]
    assert shlex.split(task)[:-3] == [*prefix, "--num_processes=8", "--num_machines=2", *rank]  # known on the node


# ---- the local executor: 4 runs, then only the missing one ---------------------------------------


@pytest.mark.slow
def test_the_array_runs_locally_and_a_resubmission_trains_only_what_is_missing(tmp_path, capsys):
    root = tmp_path / "runs"
    argv = ["--executor", "local", "--cpus-per-task", "1", "--array", "--max-parallel", "2"]
    argv += ["--folder", f"{tmp_path}/slurm/%j"]
    argv += ["--", *sweep_command(root)]
    assert launch(*argv) == 0
    first = capsys.readouterr()
    assert "sweep: 4 runs: 4 to submit, 0 skipped (completed)" in first.err
    assert f"running 4 task(s) here, 2 at a time; logs in {tmp_path}/slurm/%j" in first.err
    assert first.err.endswith("4 tasks: 4 done, 0 failed\n") and ended(first.err) == dict.fromkeys(range(4), "done")
    runs = sorted(root.rglob("seed*"))
    assert len(runs) == 4 and all(json.loads((run / "status.json").read_text())["state"] == "completed" for run in runs)

    def stamps(run):
        files = ("status.json", "eval.json", "adapter/adapter_model.safetensors")
        return [(run / name).stat().st_mtime_ns for name in files]

    lost, *kept = runs
    before = {run: stamps(run) for run in kept}
    shutil.rmtree(lost)  # a task killed before it wrote anything: its run is missing
    assert launch(*argv) == 0
    again = capsys.readouterr()
    assert "sweep: 4 runs: 1 to submit, 3 skipped (completed)" in again.err
    assert again.err.endswith("1 tasks: 1 done, 0 failed\n") and ended(again.err) == {0: "done"}
    assert json.loads((lost / "status.json").read_text())["state"] == "completed"
    assert {run: stamps(run) for run in kept} == before and sorted(root.rglob("seed*")) == runs

    assert launch(*argv) == 0
    assert capsys.readouterr().err == "sweep: 4 runs: 0 to submit, 4 skipped (completed)\nnothing to submit\n"


# ---- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--"], "launch: no loralab command after '--'"),
        (["--", "python", "train.py"], "argument command: invalid choice: 'python'"),
        (["--", "launch", "slurm", "--", "train"], "the launched command cannot be launch itself"),
        (["--array", "--", "train", *TINY], "--array makes a sweep's runs or an hpo command's workers array tasks"),
        (["--gpus-per-node", "-1", "--", "train"], "--gpus-per-node must be ≥ 0, got -1"),
        (["--nodes", "0", "--", "train"], "--nodes must be ≥ 1, got 0"),
        (["--time", "-5", "--", "train"], "--time must be ≥ 1, got -5"),
        (["--array", "--max-parallel", "0", "--", *sweep_command("runs")], "--max-parallel must be ≥ 1, got 0"),
        (["--max-parallel", "2", "--", "train"], "--max-parallel limits a job array: add --array"),
        (["--nodes", "2", "--", "train", *TINY], "--nodes above 1 spreads one train over the nodes' GPUs"),
        (["--executor", "local", "--nodes", "2", "--gpus-per-node", "1", "--", "train"], "--nodes must be 1"),
        (["--array", "--", *sweep_command("runs"), "--jobs", "2"], "drop the sweep's --jobs, --out and --dry-run"),
        (["--array", "--", "hpo", *TINY, "--workers", "0"], "--workers must be ≥ 1, got 0"),
        (["--", "train", "train.lrr=0.1"], "unknown key 'train.lrr' (did you mean 'lr'?)"),
        (["--", "sweep", *TINY, "--grid", "method.adapter.r=4,big"], "sweep run 4/6 (method.adapter.r=big seed=42)"),
        (["--", "train", "--bogus"], "unrecognized arguments: --bogus"),
        (["--", "train", *TINY], "no SLURM on this machine (srun not found)"),
    ],
)
def test_bad_launches_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    assert launch(*argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("loralab: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert list(tmp_path.iterdir()) == []  # nothing planned, written or submitted
