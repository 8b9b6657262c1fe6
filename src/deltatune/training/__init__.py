"""Fine-tuning: data formats and tokenisation, a plain PyTorch trainer with exact resume, metrics, plots."""

from deltatune.training.data import Dataset, Encoder, collate, load_dataset, read_records
from deltatune.training.trainer import TrainConfig, Trainer, TrainingInterrupted, TrainResult

__all__ = ["Dataset", "Encoder", "TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted", "collate",
           "load_dataset", "read_records"]
