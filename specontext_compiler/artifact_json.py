"""The error every refusal of an artifact raises, and the strict JSON reading its files go through."""

from __future__ import annotations

import json
from pathlib import Path


class ArtifactError(ValueError):
    """An exported artifact is missing, damaged, truncated, unsafe or made by an incompatible version."""

    def __init__(self, file: Path | str, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{file}: {problem}")


def parse_json_value(data: bytes, file: Path):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:  # ValueError: also an integer of over 4,300 digits
        raise ArtifactError(file, f"not valid JSON ({error})") from None


def parse_json(data: bytes, file: Path) -> dict:
    value = parse_json_value(data, file)
    if not isinstance(value, dict):
        raise ArtifactError(file, f"holds a JSON {type(value).__name__}, not an object")
    return value
