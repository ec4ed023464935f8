"""Run loralab's gradient rules inside other training frameworks (transformers' Trainer: `loralab.integrations.hf`)."""
