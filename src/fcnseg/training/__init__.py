"""Training: config, loss, step, trainer, checkpoints, distributed set-up, feature cache, tuning."""
from fcnseg.training.config import TrainConfig
from fcnseg.training.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
