"""Tasks as data: built-in and user task definitions, sources (local files, hub, generator), encoding, packing."""

from loralab.data.sources import load_task, resolved_spec
from loralab.data.tasks import Example, TaskData, TaskSpec, get_task, task_names, task_spec

__all__ = ["Example", "TaskData", "TaskSpec", "get_task", "load_task", "resolved_spec", "task_names", "task_spec"]
