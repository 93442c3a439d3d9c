"""Graph rewrites that apply a schedule to an ONNX Runtime training model (shipped as poetc.passes).

Each pass applies decisions already made; none calls a solver. `default_pipeline()` lists them in the
order they run.
"""

from .async_paging import AsyncPaging
from .cleanup import Cleanup
from .drop_unread_outputs import DropUnreadOutputs
from .insert_recompute import InsertRecompute
from .insert_spill_restore import InsertSpillRestore
from .insert_state_io import InsertStateIO
from .manager import PassContext, PassError, PassManager, PassResult
from .order import OrderNodes


def default_pipeline() -> list:
    return [InsertRecompute(), InsertSpillRestore(), InsertStateIO(), DropUnreadOutputs(), OrderNodes(), AsyncPaging(),
            Cleanup()]


__all__ = ["AsyncPaging", "Cleanup", "DropUnreadOutputs", "InsertRecompute", "InsertSpillRestore", "InsertStateIO",
           "OrderNodes", "PassContext", "PassError",
           "PassManager", "PassResult", "default_pipeline"]
