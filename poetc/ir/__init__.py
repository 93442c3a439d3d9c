"""poetc's intermediate representation of a training step."""

from .graph import Op, Role, Tensor, TensorKind, TrainGraph
from .lower import load_artifacts, lower_training_model

__all__ = ["Op", "Role", "Tensor", "TensorKind", "TrainGraph", "load_artifacts", "lower_training_model"]
