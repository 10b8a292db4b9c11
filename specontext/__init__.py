"""SpeContext: fast long-context decoding of Hugging Face LLMs under a GPU memory budget.

``specontext.compile(model, budget="24GB")`` returns a model with ``generate`` and ``__call__``;
``specontext.export(compiled, path)`` writes it to a directory and ``specontext.load(path)`` runs it again.
This package only re-exports the public API of :mod:`specontext_compiler`.
"""

from specontext_compiler import (
    ArtifactError,
    BudgetError,
    SUPPORTED_FAMILIES,
    CalibratedHead,
    CalibrationReport,
    GuardSettings,
    MemoryPlan,
    SpeContextModel,
    __version__,
    calibrate,
    compile,
    export,
    load,
    parse_budget,
    plan_memory,
)

__all__ = [
    "ArtifactError",
    "BudgetError",
    "export",
    "load",
    "SUPPORTED_FAMILIES",
    "CalibratedHead",
    "CalibrationReport",
    "GuardSettings",
    "MemoryPlan",
    "SpeContextModel",
    "__version__",
    "calibrate",
    "compile",
    "parse_budget",
    "plan_memory",
]
