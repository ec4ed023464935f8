"""Configuration: typed schema, YAML composition, --set overrides, validation and the run hash."""

from loralab.config.load import compose, config_hash, config_to_dict, dump_yaml, load_config, preset_names
from loralab.config.schema import RunConfig

__all__ = [
    "RunConfig",
    "compose",
    "config_hash",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "preset_names",
]
