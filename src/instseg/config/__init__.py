"""Run configuration: dataclass schema, named presets and YAML / ``--set`` overrides."""

from instseg.config.schema import Config, DataConfig, ModelConfig, TrainConfig

__all__ = ["Config", "DataConfig", "ModelConfig", "TrainConfig"]
