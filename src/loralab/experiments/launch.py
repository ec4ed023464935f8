"""`loralab launch slurm`: a loralab command line as submitit jobs, one job or a SLURM job array.

- Any command is one job that runs `python -m loralab <command>`.
- `sweep ... --array`: the sweep is expanded and planned here by sweep.py's own `plan_sweep`; each run that is not
  completed becomes one array task, `loralab train` with the sweep's config files and that run's overrides
  (io.overwrite=skip unless a config file or an override sets it), so submitting the same command again submits
  only the runs still missing.
- `hpo ... --workers N --array`: N array tasks, each the same hpo command with `--workers 1`: N workers claiming
  trials of one study from its shared Optuna storage.

Every task is a submitit `Checkpointable`: preempted or timed out, submitit requeues it with io.overwrite=resume,
so runs continue from their last `checkpoints/step-N`. A train task over more than one GPU runs under
`accelerate launch` (one process per GPU of every node). `--dry-run` renders the sbatch script with submitit's
own SlurmExecutor, so it works where SLURM is not installed; `--executor local` runs the same tasks on this
machine through submitit's LocalExecutor, `--max-parallel` at a time, and waits for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loralab.errors import ConfigError, LoraLabError, RunError, first_line

try:
    import submitit
    from submitit.core.utils import UncompletedJobError
    from submitit.helpers import Checkpointable, DelayedSubmission
except ModuleNotFoundError as exc:
    if exc.name != "submitit":
        raise
    raise LoraLabError("loralab launch needs submitit: pip install 'loralab[slurm]'") from None

if TYPE_CHECKING:
    from loralab.experiments.sweep import SweepRun

RUN_VERBS = ("train", "sweep", "hpo")  # commands with config overrides: a requeue appends io.overwrite=resume
RESUME = "io.overwrite=resume"
PORT = 29500  # accelerate's rendezvous port, offset per job so that two jobs on one node do not collide
POLL_S = 0.2  # how often local tasks are checked


@dataclass(frozen=True)
class Resources:
    """What each task asks SLURM for (partition, GPUs and CPUs, nodes, memory, minutes) and the array's parallelism."""

    partition: str | None
    gpus_per_node: int
    nodes: int
    cpus_per_task: int | None
    mem_gb: int | None
    time: int
    max_parallel: int | None

    def check(self) -> None:
        """Refuse counts below their minimum before anything is planned."""
        minimums = {
            "gpus-per-node": (self.gpus_per_node, 0),
            "nodes": (self.nodes, 1),
            "cpus-per-task": (self.cpus_per_task, 1),
            "mem-gb": (self.mem_gb, 1),
            "time": (self.time, 1),
            "max-parallel": (self.max_parallel, 1),
        }
        for flag, (value, minimum) in minimums.items():
            if value is not None and value < minimum:
                raise ConfigError(f"--{flag} must be ≥ {minimum}, got {value}")

    def slurm(self, name: str) -> dict[str, Any]:
        """SlurmExecutor's parameters (sbatch flags); options not given, and zero GPUs, are left to the cluster."""
        given = {
            "job_name": name,
            "partition": self.partition,
            "time": self.time,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node or None,
            "cpus_per_task": self.cpus_per_task,
            "mem": None if self.mem_gb is None else f"{self.mem_gb}GB",
            "array_parallelism": self.max_parallel,
        }
        return {key: value for key, value in given.items() if value is not None}

    def local(self) -> dict[str, Any]:
        """LocalExecutor's parameters: the time limit and the GPUs it makes visible (one node; no partition, memory)."""
        if self.nodes > 1:
            raise ConfigError("--executor local runs on this machine: --nodes must be 1")
        return {"timeout_min": self.time, "gpus_per_node": self.gpus_per_node}


@dataclass(frozen=True)
class Node:
    """Where one node of a multi-node task stands: its rank, the first node's host and the job's port."""

    rank: str
    master: str
    port: str

    @classmethod
    def current(cls) -> Node:
        """This node, read from the running submitit job's environment."""
        env = submitit.JobEnvironment()
        return cls(str(env.node), env.hostnames[0], str(PORT + int(env.raw_job_id) % 10000))


UNKNOWN_NODE = Node("<node rank>", "<first node>", "<port>")  # what --dry-run shows: known once the job runs


@dataclass(frozen=True)
class LaunchTask(Checkpointable):
    """One task: `python -m loralab <argv>` in `cwd`; requeued on preemption with io.overwrite=resume."""

    argv: tuple[str, ...]
    cwd: str
    gpus_per_node: int = 0
    nodes: int = 1
    threads: int | None = None
    resume: bool = False

    def __call__(self) -> None:
        """Run the command in a child process whose output goes to the task's log; a non-zero exit fails the task
        with the child's last error line."""
        command = self.command(Node.current() if self.nodes > 1 else None)
        last = ""
        options = {"cwd": self.cwd, "env": self.environment(), "stderr": subprocess.PIPE, "text": True}
        with subprocess.Popen(command, **options) as child:
            try:
                for line in child.stderr:
                    sys.stderr.write(line)
                    last = line.strip() or last
            except BaseException:  # requeued (submitit exits on its signal) or interrupted: the child goes too
                child.kill()
                raise
        if child.returncode != 0:
            error = last.removeprefix("loralab: error: ")
            raise RunError(f"loralab {self.argv[0]} exited with code {child.returncode}: {error}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """What submitit requeues on preemption or timeout: the same command, resuming its runs."""
        return DelayedSubmission(dataclasses.replace(self, resume=True))

    def command(self, node: Node | None = None) -> list[str]:
        """The command line; a requeued run command ends with io.overwrite=resume, the last override to apply."""
        argv = [*self.argv, RESUME] if self.resume and self.argv[0] in RUN_VERBS else list(self.argv)
        return [*self.launcher(node), *argv]

    def launcher(self, node: Node | None) -> list[str]:
        """`python -m loralab`, or `accelerate launch` over every GPU of every node for a distributed train."""
        processes = self.gpus_per_node * self.nodes
        if self.argv[0] != "train" or processes < 2:
            return [sys.executable, "-m", "loralab"]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}"]
        if self.nodes > 1:
            launch += [
                f"--num_machines={self.nodes}",
                f"--machine_rank={node.rank}",
                f"--main_process_ip={node.master}",
                f"--main_process_port={node.port}",
            ]
        return [*launch, "-m", "loralab"]

    def environment(self) -> dict[str, str]:
        """This process's environment, with OMP_NUM_THREADS from --cpus-per-task unless it is set already."""
        env = dict(os.environ)
        if self.threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(self.threads))
        return env


@dataclass(frozen=True)
class Plan:
    """A launch's jobs: the job name, the tasks (more than one: a job array) and a line saying how they were chosen."""

    name: str
    tasks: list[LaunchTask]
    note: str


# ---- planning -------------------------------------------------------------------------------------


def plan_launch(argv: Sequence[str], command: argparse.Namespace, array: bool, resources: Resources) -> Plan:
    """Check the resources and the command, and turn the command into its tasks."""
    resources.check()
    verb = argv[0]
    if resources.max_parallel is not None and not array:
        raise ConfigError("--max-parallel limits a job array: add --array")
    if array:
        argvs, note = array_argvs(argv, command)
    else:
        check_command(verb, command)
        argvs, note = [overrides_last(argv, command)], f"{verb}: one job"
    if resources.nodes > 1 and (resources.gpus_per_node < 1 or any(args[0] != "train" for args in argvs)):
        raise ConfigError("--nodes above 1 spreads one train over the nodes' GPUs: it needs train tasks and GPUs")
    tasks = [
        LaunchTask(tuple(args), os.getcwd(), resources.gpus_per_node, resources.nodes, resources.cpus_per_task)
        for args in argvs
    ]
    return Plan(f"loralab-{verb}", tasks, note)


def array_argvs(argv: Sequence[str], command: argparse.Namespace) -> tuple[list[list[str]], str]:
    """A sweep's runs that are not completed, one train each; or an hpo command's workers, one each."""
    verb = argv[0]
    if verb == "sweep":
        return sweep_argvs(command)
    if verb == "hpo":
        if command.workers < 1:
            raise ConfigError(f"--workers must be ≥ 1, got {command.workers}")
        check_command(verb, command)
        worker = overrides_last([*argv, "--workers=1"], command)
        return [worker] * command.workers, f"hpo: {command.workers} workers on one study, one array task each"
    raise ConfigError(f"--array makes a sweep's runs or an hpo command's workers array tasks; '{verb}' is neither")


def sweep_argvs(command: argparse.Namespace) -> tuple[list[list[str]], str]:
    """`loralab train` for each run of the sweep that is not completed (sweep.py's own plan and overwrite policy)."""
    from loralab.experiments.sweep import train_argv

    if command.jobs != 1 or command.out or command.dry_run:
        raise ConfigError(
            "with --array each sweep run is its own task: drop the sweep's --jobs, --out and --dry-run "
            "(launch's --dry-run lists the tasks; loralab report makes the table)"
        )
    runs = sweep_runs(command)
    pending = [run for run in runs if run.action != "skip"]
    note = f"sweep: {len(runs)} runs: {len(pending)} to submit, {len(runs) - len(pending)} skipped (completed)"
    return [train_argv(run, command.config) for run in pending], note


def sweep_runs(command: argparse.Namespace) -> list[SweepRun]:
    """The sweep command's planned runs (every run resolved: a bad key or value fails now)."""
    from loralab.config.load import run_files
    from loralab.experiments.sweep import parse_seeds, plan_sweep

    overrides = [*command.set, *command.overrides]
    return plan_sweep(run_files(command.config), overrides, command.grid, command.ablation, parse_seeds(command.seeds))


def check_command(verb: str, command: argparse.Namespace) -> None:
    """Resolve a train's or an hpo's config, or plan a sweep, so that a bad key fails here and not in the queue."""
    if verb == "sweep":
        sweep_runs(command)
    elif verb in RUN_VERBS:
        from loralab.config.load import load_config, run_files

        load_config(run_files(command.config), [*command.set, *command.overrides])


def overrides_last(argv: Sequence[str], command: argparse.Namespace) -> list[str]:
    """The command with its bare a.b=v overrides moved to the end (they apply last wherever they stand), so that an
    override appended on requeue is the last word and argparse still reads one block of positionals."""
    overrides = list(getattr(command, "overrides", []))
    argv = list(argv)
    if not overrides:
        return argv
    size = len(overrides)
    start = next(i for i in range(len(argv) - size, -1, -1) if argv[i : i + size] == overrides)
    return [*argv[:start], *argv[start + size :], *overrides]


# ---- submitting -----------------------------------------------------------------------------------


class ScriptExecutor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor where SLURM is not installed: it renders sbatch scripts and never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def sbatch_script(plan: Plan, resources: Resources, folder: str) -> str:
    """The sbatch script submitit writes for the plan: an array (--array=0-N%K) when it has more than one task."""
    executor = ScriptExecutor(folder)
    executor.update_parameters(**resources.slurm(plan.name))
    if len(plan.tasks) > 1:
        executor.parameters["map_count"] = len(plan.tasks)  # what SlurmExecutor sets when it submits an array
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def dry_run(plan: Plan, resources: Resources, folder: str) -> str:
    """The sbatch script, then a comment line per task (its array index) with the command that task runs."""
    node = UNKNOWN_NODE if resources.nodes > 1 else None
    tasks = [f"# task {index}: {shlex.join(task.command(node))}\n" for index, task in enumerate(plan.tasks)]
    return sbatch_script(plan, resources, folder) + "\n" + "".join(tasks)


def make_executor(kind: str, folder: str, resources: Resources, name: str) -> submitit.core.core.PicklingExecutor:
    """A submitit executor with the resources set: SLURM's (sbatch), or the local one (child processes here)."""
    if kind == "local":
        parameters = resources.local()
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(**parameters)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder)
    except RuntimeError:
        raise LoraLabError(
            "no SLURM on this machine (srun not found): --dry-run prints the script, --executor local runs it here"
        ) from None
    executor.update_parameters(**resources.slurm(name))
    return executor


def launch(
    plan: Plan,
    resources: Resources,
    kind: str,
    folder: str,
    dry: bool,
    echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Print the dry run, submit the tasks to SLURM (one job, or one array), or run them here and wait."""
    executor = None if dry else make_executor(kind, folder, resources, plan.name)
    echo(plan.note)
    if not plan.tasks:
        echo("nothing to submit")
        return 0
    if executor is None:
        print(dry_run(plan, resources, folder), end="")
        return 0
    if kind == "local":
        return run_here(executor, plan.tasks, resources.max_parallel or 1, echo)
    try:
        jobs = executor.submit_array(plan.tasks)
    except UncompletedJobError as exc:  # sbatch refused the script: its own message
        raise LoraLabError(f"sbatch failed: {last_line(exc)}") from None
    print(f"submitted {len(jobs)} task(s) as SLURM job {jobs[0].job_id.split('_')[0]}; logs in {executor.folder}")
    return 0


def run_here(
    executor: submitit.LocalExecutor, tasks: Sequence[LaunchTask], parallel: int, echo: Callable[[str], None]
) -> int:
    """Run the tasks as local jobs, `parallel` at a time, a line each as it ends; 1 when any failed. Ctrl-C
    cancels the running ones (the same command later submits what is missing)."""
    echo(f"running {len(tasks)} task(s) here, {parallel} at a time; logs in {executor.folder}")
    waiting, running, failed = list(enumerate(tasks)), {}, 0
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                index, task = waiting.pop(0)
                running[index] = executor.submit(task)
            for index, job in [(index, job) for index, job in running.items() if job.done()]:
                del running[index]
                failed += not finished(index, job, echo)
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for job in running.values():
            job.cancel(check=False)
        raise
    echo(f"{len(tasks)} tasks: {len(tasks) - failed} done, {failed} failed")
    return 1 if failed else 0


def finished(index: int, job: submitit.Job, echo: Callable[[str], None]) -> bool:
    """Report an ended local task, done or failed with its log; whether it succeeded."""
    try:
        job.result()
    except UncompletedJobError as exc:
        echo(f"task {index} failed (job {job.job_id}): {task_error(exc)}; log: {job.paths.stderr}")
        return False
    echo(f"task {index} done (job {job.job_id})")
    return True


def last_line(exc: BaseException) -> str:
    """The last non-empty line of sbatch's error output: its error comes after any warnings."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def task_error(exc: BaseException) -> str:
    """A failed task's own RunError line, out of the traceback submitit wraps it in; else the report's first line."""
    marker = f"{RunError.__module__}.{RunError.__qualname__}: "
    lines = [line.removeprefix(marker) for line in str(exc).splitlines() if line.startswith(marker)]
    return lines[-1] if lines else first_line(exc)
