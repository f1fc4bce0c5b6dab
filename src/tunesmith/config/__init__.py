"""Config: the pydantic schema and the YAML + overrides loader."""

from tunesmith.config.load import dump_config, load_config, parse_override
from tunesmith.config.schema import Config

__all__ = ["Config", "dump_config", "load_config", "parse_override"]
