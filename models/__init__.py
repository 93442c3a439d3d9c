"""Seeded generators of real architectures (torch) exported to ONNX for poetc.

Quick use::

    from models import MODELS, export_onnx, make_batch, build
    path = build("resnet18_cifar", batch=8)         # cached forward model
    feeds = make_batch("resnet18_cifar", 8)          # {"input": ..., "labels": ...}

See :mod:`models.zoo` for how models are exported (training-form BatchNorm)
and :func:`training_artifacts` for building ORT training artifacts.
"""

from .zoo import (BATCH_DIM, LABELS_NAME, MAX_IR_VERSION, MODELS, OPSET, OUTPUT_NAME,
                  InputSpec, ModelSpec, build, default_cache_dir, export_onnx, export_proto,
                  get_spec, instantiate, make_batch, trainable_initializers,
                  training_artifacts)

__all__ = ["BATCH_DIM", "LABELS_NAME", "MAX_IR_VERSION", "MODELS", "OPSET", "OUTPUT_NAME",
           "InputSpec", "ModelSpec", "build", "default_cache_dir", "export_onnx",
           "export_proto", "get_spec", "instantiate", "make_batch", "trainable_initializers",
           "training_artifacts"]
