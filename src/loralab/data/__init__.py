"""Tasks: the registry, sources (hub, local files, synthetic), templates, and tokenisation."""

from loralab.data.sources import load_task
from loralab.data.tasks import Example, TaskData, TaskSpec, get_task, task_names

__all__ = ["Example", "TaskData", "TaskSpec", "get_task", "load_task", "task_names"]
