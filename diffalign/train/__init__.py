"""Training: typed configs, the accelerate trainer, checkpoints and final weights."""

from diffalign.train.config import Config, load_config
from diffalign.train.trainer import PreferenceTrainer, train

__all__ = ["Config", "PreferenceTrainer", "load_config", "train"]
