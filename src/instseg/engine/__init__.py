"""Training, checkpoints, schedules and inference loops."""

from instseg.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_from_checkpoint,
    save_checkpoint,
)
from instseg.engine.schedule import lr_at

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "lr_at",
    "save_checkpoint",
]

from instseg.engine.ema import ModelEMA  # noqa: E402
from instseg.engine.inference import evaluate, predict_dataset, run_evaluation  # noqa: E402
from instseg.engine.trainer import NonFiniteLossError, Trainer, train  # noqa: E402

__all__ += ["ModelEMA", "NonFiniteLossError", "Trainer", "evaluate", "predict_dataset", "run_evaluation", "train"]
