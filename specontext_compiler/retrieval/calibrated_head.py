"""A calibrated retrieval head: the pruned head, what calibration measured, and its files.

``specontext.calibrate`` (specontext_compiler/calibration.py) makes one; ``CalibratedHead.save`` writes
``specontext_head.json`` (kind, layer, heads, head map, coverage, parameter counts, the draft's config)
plus ``head.safetensors``; :func:`load_head` rebuilds it without running pickled code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

MANIFEST = "specontext_head.json"
TENSORS = "head.safetensors"
FORMAT_VERSION = 2  # 2: draft-free heads score with the prefill prior


def is_calibrated_head(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class CalibrationReport:
    """What calibration measured and kept."""

    kind: str  # "target_layer", "draft_model" or "eagle3"
    layer: int
    heads: list[int]
    head_map: list[list[int]] | None
    layer_kl: dict[int, float]
    layer_agreement: dict[int, float]
    layer_coverage: dict[int, float]
    coverage: float
    parameters_before: int
    parameters_after: int
    token_budget: int
    texts: int
    decode_steps: int
    draft_config: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        return 1.0 - self.parameters_after / self.parameters_before if self.parameters_before else 0.0

    def summary(self) -> str:
        return (
            f"{self.kind} head: layer {self.layer} (KL to dense {self.layer_kl[self.layer]:.4f}, top-1 agreement "
            f"{self.layer_agreement[self.layer]:.3f}), {len(self.heads)} heads kept, coverage {self.coverage:.3f}; "
            f"parameters {self.parameters_before:,} -> {self.parameters_after:,} ({100 * self.reduction:.1f}% fewer)"
        )


class CalibratedHead:
    """A pruned retrieval head and its calibration report; pass it (or its saved directory) as ``draft=``."""

    def __init__(self, head, report: CalibrationReport):
        self.head = head
        self.report = report

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.head.state_tensors() if hasattr(self.head, "state_tensors") else {}
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / TENSORS))
        manifest = {"format": "specontext-retrieval-head", "version": FORMAT_VERSION, **asdict(self.report)}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return path


def load_head(path: str | Path, model):
    """Rebuild a saved calibrated head for ``model`` (the target) from JSON + safetensors."""
    from .draft_model_head import DraftModelHead
    from .target_layer_head import TargetLayerHead
    from ..planning import num_kv_heads

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != "specontext-retrieval-head" or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / MANIFEST} is not a version-{FORMAT_VERSION} specontext retrieval head")
    kind = manifest["kind"]
    if kind == "target_layer":
        if manifest["layer"] >= model.config.num_hidden_layers:
            raise ValueError(f"{path}: calibrated for layer {manifest['layer']}, the model has {model.config.num_hidden_layers}")
        return TargetLayerHead(manifest["layer"], prefill_prior=True)
    device, dtype = model.get_input_embeddings().weight.device, model.get_input_embeddings().weight.dtype
    tensors = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in load_file(str(path / TENSORS)).items()}
    if kind == "draft_model":
        return DraftModelHead.from_saved(manifest, tensors, num_kv_heads(model.config), device, dtype)
    if kind == "eagle3":
        from .eagle3 import Eagle3Head

        return Eagle3Head.from_saved(manifest, tensors, model)
    raise ValueError(f"{path / MANIFEST}: unknown head kind {kind!r}")
