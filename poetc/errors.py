"""Typed errors. Each carries the process exit code the CLI uses for it (see docs/errors.md)."""

from __future__ import annotations


class PoetcError(Exception):
    """Base class: a problem the user can act on. `exit_code` is what `poetc` exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(PoetcError):
    """Malformed command line value: sizes, times, names, flags."""

    exit_code = 2


class InputFileError(PoetcError):
    """The model file is missing, unreadable, not ONNX, truncated or invalid."""

    exit_code = 3


class UnsupportedModelError(PoetcError):
    """The model is valid ONNX but poetc cannot train it: an op without a gradient, a dtype,
    an unresolved dynamic dimension, an opset ONNX Runtime 1.19 cannot load."""

    exit_code = 4


class TargetError(PoetcError):
    """Unknown target name or malformed target / cost file."""

    exit_code = 5


class InfeasibleError(PoetcError):
    """No schedule can meet the RAM budget (below the lower bound) or the deadline."""

    exit_code = 6


class OutputError(PoetcError):
    """The output directory exists (without --force) or cannot be written."""

    exit_code = 7


class VerificationError(PoetcError):
    """`poetc verify`: the compiled artifacts train differently or exceed the budget (message from
    `VerifyReport.failure()`)."""

    exit_code = 8


class RuntimeFailure(PoetcError):
    """ONNX Runtime or the native Spill/Restore library failed while running a step."""

    exit_code = 9


class ArtifactError(PoetcError):
    """`poetc train` / `verify`: a compiled artifact differs from the SHA-256 report.json records
    (modified, replaced or missing since compile); nothing was loaded or run."""

    exit_code = 10


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when poetc receives SIGTERM: unwinds like Ctrl-C (temporary,
    staging and worker processes are cleaned up) and exits 143."""


class InternalError(PoetcError):
    """A bug in poetc: an invariant did not hold. Please report it with the command line."""

    exit_code = 70


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unclassified poetc error",
    2: "usage: malformed option value (size, time, name)",
    3: "input file missing, unreadable, not ONNX or corrupt",
    4: "model not supported (op without gradient, dtype, dynamic dimension, opset)",
    5: "unknown or malformed target / cost file",
    6: "infeasible: budget below the lower bound or deadline impossible",
    7: "output directory exists or cannot be written",
    8: "verification failed: results differ or measured peak above budget",
    9: "runtime failure in ONNX Runtime or the Spill/Restore library (a spill file not written by this run included)",
    10: "compiled artifacts modified since compile (SHA-256 differs from report.json)",
    70: "internal error (a poetc bug)",
    130: "interrupted (SIGINT, Ctrl-C)",
    143: "terminated (SIGTERM)",
}
