"""SpeContext compiler: speculative context sparsity for long-context decoding of HF causal LMs.

The implementation package. Users import :mod:`specontext`, which re-exports the public API.
"""

from .api import SpeContextModel, compile
from .artifact import ArtifactError, export, load
from .calibration import calibrate
from .retrieval.calibrated_head import CalibratedHead, CalibrationReport
from .capture import SUPPORTED_FAMILIES
from .config import BudgetError, GuardSettings, parse_budget
from .dynamo_backend import register as _register_dynamo_backend
from .planning.planner import MemoryPlan, plan_memory

__version__ = "0.1.0"

_register_dynamo_backend()  # torch.compile(..., backend="specontext"); the entry point covers fresh processes

__all__ = [
    "GuardSettings",
    "ArtifactError",
    "BudgetError",
    "export",
    "load",
    "MemoryPlan",
    "plan_memory",
    "SUPPORTED_FAMILIES",
    "CalibratedHead",
    "CalibrationReport",
    "SpeContextModel",
    "__version__",
    "calibrate",
    "compile",
    "parse_budget",
]
