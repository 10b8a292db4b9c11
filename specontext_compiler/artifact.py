"""Export a compiled model to a directory, and load it back without the HF model and without unpickling.

``specontext.export(compiled, path, tokenizer=None)`` writes:

* ``step.pt2`` — the transformed step program (``torch.export.save``): the retrieval node, the sparse
  attention, prefetch and wait nodes, and the model's weights. One program serves prefill chunks and
  decode steps (its batch, new-token and total-token sizes are dynamic). Saved without sample inputs:
  ``torch.export.load`` would unpickle them.
* ``config.json``, ``generation_config.json`` — the model's transformers configs (JSON).
* ``head.json`` (+ ``head.safetensors`` for a head with tensors) — the retrieval head.
* ``options.json`` — the compile options; ``memory_plan.json`` — the plan for the budget at export.
* ``tokenizer/`` — the tokenizer's files, when one is given.
* ``manifest.json`` — the format version, the library, torch (and its export schema), transformers and
  Python versions, and every file's size and sha256.

``specontext.load(path, device=None, budget=None)`` checks the manifest first: the format and export
schema versions, then every file's size and checksum, then that ``step.pt2`` holds no pickled payload;
any problem raises :class:`ArtifactError` (a ``ValueError``) naming the file and what is wrong, before
anything is deserialized. It reads only JSON, safetensors and ``torch.export.load``; the memory plan is
made again for the device and budget given (each ``generate`` plans its own sequence anyway).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import zipfile
from pathlib import Path

import torch

from .capture import CapturedStep
from .config import CompileConfig, format_bytes

logger = logging.getLogger(__name__)

FORMAT = "specontext-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRAM = "step.pt2"
HEAD_TENSORS = "head.safetensors"
#: Reference context of the stored memory plan (capped by the model's max positions).
PLAN_CONTEXT = 32768


class ArtifactError(ValueError):
    """An exported artifact is missing, damaged, truncated, unsafe or made by an incompatible version."""

    def __init__(self, file: Path | str, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{file}: {problem}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _export_schema() -> list[int]:
    from torch._export.serde.schema import SCHEMA_VERSION

    return [int(SCHEMA_VERSION[0]), int(SCHEMA_VERSION[1])]


def versions() -> dict:
    """What the manifest records about the software that wrote (or reads) an artifact."""
    import transformers

    from . import __version__

    return {"specontext": __version__, "torch": torch.__version__, "export_schema": _export_schema(),
            "transformers": transformers.__version__, "python": platform.python_version()}


# -- the retrieval head as JSON + safetensors ---------------------------------------------------------------
def _head_description(head) -> tuple[dict, dict[str, torch.Tensor]]:
    from .retrieval import OracleTopK, QuestPages, StreamingLLM, TargetLayerHead

    if head is None:
        return {"kind": "none"}, {}
    if isinstance(head, TargetLayerHead):
        return {"kind": "target_layer", "layers": list(head.layers), "prefill_prior": head.prefill_prior,
                "query_weight": head.query_weight}, {}
    if isinstance(head, StreamingLLM):
        return {"kind": "streaming"}, {}
    if isinstance(head, QuestPages):
        return {"kind": "quest", "page_size": head.page_size}, {}
    if isinstance(head, OracleTopK):
        return {"kind": "oracle"}, {}
    raise ValueError(
        f"export does not support a {type(head).__name__} retrieval head yet; supported: the draft-free head "
        "(draft=None, or a calibrated draft-free head) and the baselines (streaming, quest, oracle)"
    )


def _head_from_description(description: dict, tensors: dict[str, torch.Tensor], file: Path):
    from .retrieval import OracleTopK, QuestPages, StreamingLLM, TargetLayerHead

    kind = description.get("kind")
    if kind == "none":
        return None
    if kind == "target_layer":
        return TargetLayerHead(tuple(description["layers"]), prefill_prior=description["prefill_prior"],
                               query_weight=description["query_weight"])
    if kind == "streaming":
        return StreamingLLM()
    if kind == "quest":
        return QuestPages(description["page_size"])
    if kind == "oracle":
        return OracleTopK()
    raise ArtifactError(file, f"unknown retrieval head kind {kind!r}")


# -- export -------------------------------------------------------------------------------------------------
def export(compiled, path: str | Path, tokenizer=None) -> Path:
    """Write ``compiled`` (a :class:`~specontext_compiler.api.SpeContextModel`) to the directory ``path``.

    ``tokenizer``: a transformers tokenizer to store beside it (``load`` returns it as ``.tokenizer``).
    The directory must not exist or be empty. Returns its path.
    """
    from .api import SpeContextModel

    if not isinstance(compiled, SpeContextModel):
        raise TypeError(f"specontext.export takes a model from specontext.compile; got {type(compiled).__name__}")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"export path {str(path)!r} exists and is not an empty directory")
    head, head_tensors = _head_description(compiled.head)  # refuse an unsupported head before writing anything
    path.mkdir(parents=True, exist_ok=True)

    program = compiled.step.program  # its data-dependent sizes were bounded when it was captured
    saved_inputs = program._example_inputs
    program._example_inputs = None  # torch.export.load unpickles sample inputs: store none
    try:
        torch.export.save(program, path / PROGRAM)
    finally:
        program._example_inputs = saved_inputs

    config = compiled.config
    (path / "config.json").write_text(compiled.hf_config.to_json_string())
    (path / "generation_config.json").write_text(compiled.generation_config.to_json_string())
    if head_tensors:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in head_tensors.items()}, str(path / HEAD_TENSORS))
    (path / "head.json").write_text(json.dumps(head, indent=2))
    options = {
        "budget_bytes": config.budget_bytes, "token_budget": config.token_budget, "sink_tokens": config.sink_tokens,
        "local_window": config.local_window, "selection": config.selection,
        "offload": config.offload if isinstance(config.offload, str) else list(config.offload),
        "elastic": config.elastic, "prefill_chunk": config.prefill_chunk,
        "last_only": compiled.step.last_only, "aux_layers": list(compiled.step.aux_layers),
        "device": str(compiled.device), "dtype": str(compiled.dtype).removeprefix("torch."),
        "vocab_size": compiled.vocab_size, "weight_bytes": compiled.weight_bytes,
    }
    (path / "options.json").write_text(json.dumps(options, indent=2))
    (path / "memory_plan.json").write_text(json.dumps(_plan(compiled).to_json(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(path / "tokenizer")

    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        files[name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **versions(),
                "model_type": compiled.hf_config.model_type, "files": files}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    logger.info("exported %s to %s: %d files, %s", compiled, path, len(files),
                format_bytes(sum(f["bytes"] for f in files.values())))
    return path


def _plan(compiled):
    from .planning.planner import plan_memory

    context = min(compiled.max_positions or PLAN_CONTEXT, PLAN_CONTEXT)
    return plan_memory(compiled.hf_config, compiled.config.budget_bytes, context, token_budget=compiled.config.token_budget,
                       dtype=compiled.dtype)


# -- checks -------------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict:
    """The manifest of the artifact at ``path`` after checking the format and export-schema versions and
    every listed file's size and sha256 (raises :class:`ArtifactError`)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(path, "no such artifact directory")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ArtifactError(manifest_file, "missing: not a specontext artifact (export writes manifest.json last)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(manifest_file, f"not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(manifest_file, f"not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(manifest_file, f"format version {manifest.get('format_version')!r} written by specontext "
                                           f"{manifest.get('specontext')}; this specontext reads version {FORMAT_VERSION}")
    here = versions()
    schema = manifest.get("export_schema")
    if not isinstance(schema, list) or len(schema) != 2 or schema[0] != here["export_schema"][0]:
        raise ArtifactError(path / PROGRAM, (
            f"exported with torch {manifest.get('torch')} (export schema {schema}); this torch {here['torch']} reads "
            f"export schema {here['export_schema'][0]}.x: the program cannot be loaded; export it again with this torch"))
    for name, entry in manifest["files"].items():
        file = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise ArtifactError(manifest_file, f"lists a file outside the artifact: {name!r}")
        if not file.is_file():
            raise ArtifactError(file, "missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise ArtifactError(file, f"truncated or changed: {size} bytes, the manifest says {entry.get('bytes')}")
        if _sha256(file) != entry.get("sha256"):
            raise ArtifactError(file, "damaged: its sha256 differs from the manifest's")
    for required in (PROGRAM, "config.json", "generation_config.json", "head.json", "options.json"):
        if required not in manifest["files"]:
            raise ArtifactError(path / required, "not listed in the manifest")
    unlisted = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                      if p.is_file() and p.relative_to(path).as_posix() not in manifest["files"] and p.name != MANIFEST)
    if unlisted:
        logger.warning("%s: files not in the manifest are ignored (never read): %s", path, ", ".join(unlisted))
    return manifest


_ARCHIVE_ENTRY = re.compile(
    r"(models/[\w.-]+\.json|data/weights/weight_\d+|data/weights/model_weights_config\.json|data/constants/tensor_\d+"
    r"|data/constants/model_constants_config\.json|data/sample_inputs/[\w.-]+|archive_format|archive_version|byteorder"
    r"|\.data/version|\.data/serialization_id)"
)


def check_program_archive(file: Path) -> None:
    """Refuse a ``.pt2`` archive that ``torch.export.load`` would unpickle anything from: sample inputs,
    weights or constants flagged as pickles, custom or opaque objects, legacy ``.pt`` payloads, or any
    entry outside the layout ``torch.export.save`` writes for a plain program."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError) as error:
        raise ArtifactError(file, f"not a readable torch.export archive ({error})") from None
    with archive:
        for info in archive.infolist():
            name = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            if info.is_dir():
                continue
            if not _ARCHIVE_ENTRY.fullmatch(name):
                raise ArtifactError(file, f"unexpected archive entry {name!r} (only weights, constants, JSON and "
                                          "version records are accepted: loading never unpickles)")
            if name.startswith("data/sample_inputs/") and info.file_size:
                raise ArtifactError(file, f"{name} holds pickled sample inputs ({info.file_size} bytes); specontext "
                                          "artifacts store none, and loading never unpickles")
            if name.endswith("_config.json"):
                try:
                    config = json.loads(archive.read(info))
                except (UnicodeDecodeError, json.JSONDecodeError) as error:
                    raise ArtifactError(file, f"{name} is not valid JSON ({error})") from None
                for key, entry in (config.get("config") or {}).items():
                    if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise ArtifactError(file, f"{name}: {key!r} is stored as a pickle or an object, not raw "
                                                  "tensor bytes; loading never unpickles")


# -- load ---------------------------------------------------------------------------------------------------
def load(path: str | Path, device: str | torch.device | None = None, budget: int | str | None = None):
    """A runnable compiled model (``generate``, ``replay``) from an artifact written by :func:`export`.

    ``device``: where to run (default: the device it was exported on, or the CPU if that is a GPU this
    machine lacks); ``budget``: the GPU memory budget (default: the exported one). The memory plan is
    made for them. The model's tokenizer, if exported, is ``.tokenizer``.
    """
    from transformers import AutoConfig, GenerationConfig

    from .api import SpeContextModel

    path = Path(path)
    manifest = read_manifest(path)
    check_program_archive(path / PROGRAM)
    here = versions()
    if manifest.get("torch") != here["torch"] or manifest.get("transformers") != here["transformers"]:
        logger.info("%s: exported with torch %s / transformers %s, loading with torch %s / transformers %s",
                    path, manifest.get("torch"), manifest.get("transformers"), here["torch"], here["transformers"])
    options = _read_json(path / "options.json")
    hf_dict = _read_json(path / "config.json")
    try:
        hf_config = AutoConfig.for_model(**hf_dict)
        generation_config = GenerationConfig.from_dict(_read_json(path / "generation_config.json"))
    except (ValueError, TypeError, KeyError) as error:
        raise ArtifactError(path / "config.json", f"not a usable transformers config ({error})") from None
    tensors = {}
    if (path / HEAD_TENSORS).is_file() and HEAD_TENSORS in manifest["files"]:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path / HEAD_TENSORS))
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise ArtifactError(path / HEAD_TENSORS, f"not a readable safetensors file ({error})") from error
    head = _head_from_description(_read_json(path / "head.json"), tensors, path / "head.json")

    exported_on = torch.device(options["device"])
    if device is None:
        device = exported_on if exported_on.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this machine has no CUDA device; accepted: 'cpu'")
    if device.type == "cuda" and device.index is None:  # the runtime keys streams by indexed device
        device = torch.device("cuda", torch.cuda.current_device())
    config = CompileConfig.from_arguments(
        options["budget_bytes"] if budget is None else budget, options["token_budget"],
        sink_tokens=options["sink_tokens"], local_window=options["local_window"], selection=options["selection"],
        offload=options["offload"] if isinstance(options["offload"], str) else tuple(options["offload"]),
        elastic=options["elastic"], prefill_chunk=options["prefill_chunk"],
    )
    if options["weight_bytes"] > config.budget_bytes:
        raise ValueError(f"budget is too small: the model needs at least {format_bytes(options['weight_bytes'])} for "
                         f"its weights alone, plus its KV cache; budget is {format_bytes(config.budget_bytes)}")
    try:
        program = torch.export.load(path / PROGRAM)
    except Exception as error:  # a version skew surfaces here as any error type: name it and the versions
        raise ArtifactError(path / PROGRAM, (
            f"torch.export.load failed under torch {here['torch']} (exported with torch {manifest.get('torch')}): "
            f"{type(error).__name__}: {error}")) from error
    if device != exported_on:
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    _annotate(program)
    step = CapturedStep(program, bool(options["last_only"]), tuple(options["aux_layers"]))
    dtype = getattr(torch, options["dtype"])
    compiled = SpeContextModel.from_parts(config, hf_config, generation_config, step, head, device, dtype,
                                          int(options["vocab_size"]), int(options["weight_bytes"]))
    compiled.tokenizer = _load_tokenizer(path, manifest)
    logger.info("loaded %s from %s on %s", compiled, path, device)
    return compiled


def _annotate(program: torch.export.ExportedProgram) -> None:
    """Node annotations are not serialized: derive them again from the loaded graph."""
    from .passes.annotate_attention import annotate_attention

    annotate_attention(program.graph_module)


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(file, f"not valid JSON ({error})") from None


def _load_tokenizer(path: Path, manifest: dict):
    if not any(name.startswith("tokenizer/") for name in manifest["files"]):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
