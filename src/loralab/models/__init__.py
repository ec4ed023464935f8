"""Models: presets (tiny random models, the bundled MiniLM), local directories and hub ids."""

from loralab.models.load import load_model, load_tokenizer, model_family
from loralab.models.presets import PRESETS, is_preset

__all__ = ["PRESETS", "is_preset", "load_model", "load_tokenizer", "model_family"]
