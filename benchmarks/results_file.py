"""Where a GPU benchmark's JSON goes: benchmarks/results/, and $OUT too when the device tool set it
(what a run leaves there comes back to the development machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_results(payload: dict, name: str, quiet: bool = False) -> Path:
    """Write ``payload`` as ``<name>.json`` under benchmarks/results/ (and $OUT); returns the path."""
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(payload, indent=2)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(text)
    if not quiet:
        print(f"wrote {path}")
    return path
