"""The tokenizer an artifact carries: the files ``load`` reads, and reading them without running code."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import BinaryIO

from .artifact_json import ArtifactError, parse_json

#: The tokenizer files load reads (a config.json there could name model code; .py files are code).
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "chat_template.jinja", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                             "spiece.model", "sentencepiece.bpe.model"})


def _check_tokenizer_class(name, file: Path) -> None:
    """transformers resolves ``tokenizer_class`` as any of its attributes (a model class would then be
    loaded from the folder, with a remote-code prompt): it must name a tokenizer class."""
    if name is None:
        return
    import transformers

    candidate = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedTokenizerBase)):
        raise ArtifactError(file, f"tokenizer_class {name!r} is not a transformers tokenizer class")


def load_tokenizer(path: Path, files: dict[str, BinaryIO]):
    """The exported tokenizer, read from a private copy of the listed files only, never running code."""
    names = [name for name in files if name.startswith("tokenizer/")]
    if not names:
        return None
    for name in names:
        if name.count("/") != 1 or name.split("/")[1] not in TOKENIZER_FILES:
            raise ArtifactError(path / name, f"not a tokenizer file specontext reads ({', '.join(sorted(TOKENIZER_FILES))}): "
                                             "loading never runs code from an artifact")
    if "tokenizer/tokenizer_config.json" in files:
        settings_file = path / "tokenizer/tokenizer_config.json"
        settings = parse_json(files["tokenizer/tokenizer_config.json"].read(), settings_file)
        files["tokenizer/tokenizer_config.json"].seek(0)
        if "auto_map" in settings:
            raise ArtifactError(settings_file, "asks for tokenizer code (auto_map); loading never runs code from an artifact")
        _check_tokenizer_class(settings.get("tokenizer_class"), settings_file)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="specontext-tokenizer-") as folder:
        for name in names:
            Path(folder, Path(name).name).write_bytes(files[name].read())
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as error:  # transformers raises many types for a bad tokenizer: name the folder
            raise ArtifactError(path / "tokenizer", f"not a loadable tokenizer ({type(error).__name__}: {error})") from error
