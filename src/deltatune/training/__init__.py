"""Fine-tuning: data formats and tokenisation, a plain PyTorch trainer with exact resume, metrics, plots."""

from deltatune.training.data import Dataset, Encoder, collate, load_dataset, read_records
from deltatune.training.trainer import (
    CheckpointError,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
)

__all__ = ["CheckpointError", "Dataset", "Encoder", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged",
           "TrainingInterrupted", "collate", "load_dataset", "read_records"]
