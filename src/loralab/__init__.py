"""loralab: a research framework for low-rank adaptation (LoRA) of transformers."""

__version__ = "0.1.0"
