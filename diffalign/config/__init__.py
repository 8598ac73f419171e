"""The run configuration: its schema (:mod:`~diffalign.config.schema`), the ranges of its numbers
(:mod:`~diffalign.config.bounds`) and the methods' own options (:mod:`~diffalign.config.options`).

This package sits below the objectives, losses and trainer: the objectives import their types from here.
Checking a config against the objective and loss it names is :func:`diffalign.train.config.validate`'s work.
"""

from diffalign.config.options import NoOptions, build_options, describe, field_docs, ranged
from diffalign.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OnlineConfig,
    TrainConfig,
    ValidationConfig,
    read_config,
    save_config,
    to_dict,
)

__all__ = ["Config", "DataConfig", "ModelConfig", "NoOptions", "ObjectiveConfig", "OnlineConfig", "TrainConfig",
           "ValidationConfig", "build_options", "describe", "field_docs", "ranged", "read_config", "save_config",
           "to_dict"]
