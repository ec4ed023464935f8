"""Whether this process is one of a multi-process launch: read from the environment, without importing torch."""

from __future__ import annotations

import os


def launched() -> bool:
    """True inside a multi-process launch (torchrun, accelerate launch, `loralab launch local`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
