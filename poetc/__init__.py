"""poetc: compile ONNX training graphs so that on-device training fits a RAM budget.

The pipeline imports a model into ONNX Runtime training artifacts, lowers the training graph to a
`TrainGraph`, prices every op for a target device, solves a POET-style mixed-integer program that
decides per activation whether to keep it, recompute it or page it to flash, rewrites the training
graph accordingly and exports artifacts that ONNX Runtime runs within the budget.
"""

__version__ = "0.1.0"
