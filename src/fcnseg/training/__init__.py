"""Training: config, loss, step, trainer, checkpoints, distributed set-up, feature cache, tuning."""
from fcnseg.training.callbacks import Callback
from fcnseg.training.config import TrainConfig
from fcnseg.training.state import RunState
from fcnseg.training.trainer import TrainResult, train

__all__ = ["Callback", "RunState", "TrainConfig", "TrainResult", "train"]
