"""The training loop and what it is built from.

``loop`` (read it top to bottom: :func:`train`, the epoch, the step, evaluate, record, finalize), ``config``
(:class:`TrainConfig`; optimizer, schedule, autocast), ``checkpoint`` (the run's state, save/restore), ``meters``
(totals, curve, NaN/Inf check, progress), ``summary`` (densities, summary table), ``parallel`` (the only module
here that knows about several processes).
"""

from sparsetrain.training.checkpoint import Session, TrainingInterrupted
from sparsetrain.training.config import TELEMETRY_POINTS, TrainConfig, check_device
from sparsetrain.training.loop import evaluate, finalize, record_epoch, setup, train, train_one_epoch
from sparsetrain.training.meters import CURVE_POINTS, NonFiniteError
from sparsetrain.training.summary import format_summary

__all__ = ["TrainConfig", "Session", "NonFiniteError", "TrainingInterrupted", "check_device", "train", "setup",
           "train_one_epoch", "evaluate", "record_epoch", "finalize", "format_summary", "TELEMETRY_POINTS",
           "CURVE_POINTS"]
