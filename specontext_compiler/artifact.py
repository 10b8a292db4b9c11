"""Export a compiled model to a directory, and load it back without the HF model and without unpickling.

``specontext.export(compiled, path, tokenizer=None)`` writes:

* ``step.pt2`` — the transformed step program (``torch.export.save``): the retrieval node, the sparse
  attention, prefetch and wait nodes, and the model's weights. One program serves prefill chunks and
  decode steps (its batch, new-token and total-token sizes are dynamic). Saved without sample inputs:
  ``torch.export.load`` would unpickle them.
* ``config.json``, ``generation_config.json`` — the model's transformers configs (JSON).
* ``head.json`` (+ ``head.safetensors`` for a head with tensors) — the retrieval head.
* ``options.json`` — the compile options; ``memory_plan.json`` — the plan for the budget at export (a JSON
  object; format 2 wrote it as a JSON string holding the object; :func:`read_memory_plan` reads both).
* ``tokenizer/`` — the tokenizer's files, when one is given.
* ``manifest.json`` — the format version, the library, torch (and its export schema), transformers and
  Python versions, and every file's size and sha256.

``specontext.load(path, device=None, budget=None)`` checks the manifest first: the format and export
schema versions, then every file's size and checksum, then that ``step.pt2`` holds no pickled payload;
any problem raises :class:`ArtifactError` (a ``ValueError``) naming the file and what is wrong, before
anything is deserialized. It reads only JSON, safetensors and ``torch.export.load``; a retrieval head with
weights is built after the program is loaded (an EAGLE-3 head uses the program's embedding); the memory plan is
made again for the device and budget given (each ``generate`` plans its own sequence anyway), so it
never reads ``memory_plan.json``. It reads format versions 2 and 3 (:data:`READ_VERSIONS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import stat
from pathlib import Path
from typing import BinaryIO

import torch

from .artifact_head import (HeadDescriptionError, TargetParts, check_head_fields, head_description,
                            head_from_description, is_int, program_tensors)
from .artifact_json import ArtifactError, parse_json, parse_json_value
from .artifact_safety import UnsafeProgram, scan_program_archive
from .artifact_tokenizer import load_tokenizer
from .capture import CapturedStep
from .config import MIN_PREFILL_CHUNK, BudgetError, CompileConfig, check_cuda_graph, format_bytes, parse_budget

logger = logging.getLogger(__name__)

FORMAT = "specontext-artifact"
#: 2: prefetch and wait return the tokens the next op takes (ops.py). 3: ``memory_plan.json`` holds an object
#: (2: a JSON string of one); draft-model and EAGLE-3 heads export (``head.json`` kinds a format-2 reader lacks).
FORMAT_VERSION = 3
#: Versions ``load`` reads: a format-2 artifact differs only in ``memory_plan.json``, which load does not read.
READ_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
PROGRAM = "step.pt2"
HEAD_TENSORS = "head.safetensors"
MEMORY_PLAN = "memory_plan.json"
#: Reference context of the stored memory plan (capped by the model's max positions).
PLAN_CONTEXT = 32768


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return _digest(handle)


def _digest(handle: BinaryIO) -> str:
    """sha256 of what is left to read in ``handle``."""
    digest = hashlib.sha256()
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


def _guard_option(value):
    """options.json's guard: null/false (off; artifacts from before the guard: false) or its settings."""
    from .runtime.accuracy_guard import GuardSettings

    if value is None or value is False:
        return False
    if not isinstance(value, dict) or set(value) - {"threshold", "hold_steps", "check_every", "layer", "dense_start"}:
        raise ValueError(f"guard is {value!r}; accepted: null or an object of threshold, hold_steps, check_every, "
                         "layer, dense_start")
    return GuardSettings(**{"dense_start": 0, **value})  # artifacts from before dense_start ran without it


# -- export -------------------------------------------------------------------------------------------------
def export(compiled, path: str | Path, tokenizer=None) -> Path:
    """Write ``compiled`` (a :class:`~specontext_compiler.api.SpeContextModel`) to the directory ``path``.

    ``tokenizer``: a transformers tokenizer to store beside it (``load`` returns it as ``.tokenizer``).
    The directory must not exist or be empty. Returns its path.
    """
    from .api import SpeContextModel

    if not isinstance(compiled, SpeContextModel):
        raise TypeError(f"specontext.export takes a model from specontext.compile; got {type(compiled).__name__}")
    if compiled.tensor_parallel is not None:
        # The program holds one rank's shards and collectives bound to this run's process group.
        raise ValueError(f"specontext.export takes a model compiled with tensor_parallel=1; this one is rank "
                         f"{compiled.tensor_parallel.rank} of tensor_parallel={compiled.tensor_parallel.size}, whose "
                         "program holds that rank's shard and this run's process group; export the model compiled "
                         "with tensor_parallel=1 (specontext.load runs it on one device)")
    path = check_export_path(path)
    # refuse an unsupported head before writing anything
    head, head_tensors = head_description(compiled.head, compiled.step.program)
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

        save_file(_unshared(head_tensors), str(path / HEAD_TENSORS))
    (path / "head.json").write_text(json.dumps(head, indent=2))
    options = {
        "budget_bytes": config.budget_bytes, "token_budget": config.token_budget, "sink_tokens": config.sink_tokens,
        "local_window": config.local_window, "selection": config.selection,
        "offload": config.offload if isinstance(config.offload, str) else list(config.offload),
        "elastic": config.elastic, "sticky_margin": config.sticky_margin, "prefill_chunk": config.prefill_chunk,
        "guard": None if config.guard is None else dataclasses.asdict(config.guard),
        "last_only": compiled.step.last_only, "aux_layers": list(compiled.step.aux_layers),
        "device": str(compiled.device), "dtype": str(compiled.dtype).removeprefix("torch."),
        "vocab_size": compiled.vocab_size, "weight_bytes": compiled.weight_bytes,
    }
    (path / "options.json").write_text(json.dumps(options, indent=2))
    (path / MEMORY_PLAN).write_text(json.dumps(_plan(compiled).to_dict(), indent=2))
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


def check_export_path(path: str | Path) -> Path:
    """``path`` as a Path where :func:`export` may write (absent, or an empty directory); else ValueError."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"export path {str(path)!r} exists and is not an empty directory")
    return path


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors accepts: it refuses tensors sharing memory (a draft's rotary ``inv_freq`` and
    ``original_inv_freq`` may be one tensor), so a tensor whose memory was already taken is cloned."""
    seen: set[int] = set()
    plain = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        key = tensor.untyped_storage().data_ptr()
        plain[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return plain


def _plan(compiled):
    from .planning.planner import plan_memory

    context = min(compiled.max_positions or PLAN_CONTEXT, PLAN_CONTEXT)
    return plan_memory(compiled.hf_config, compiled.config.budget_bytes, context, token_budget=compiled.config.token_budget,
                       dtype=compiled.dtype)


# -- checks -------------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict:
    """The manifest of the artifact at ``path`` after checking the format and export-schema versions and
    every listed file's size and sha256 (raises :class:`ArtifactError`)."""
    manifest, files = _open_checked(Path(path))
    for handle in files.values():
        handle.close()
    return manifest


def read_memory_plan(path: str | Path) -> dict:
    """The memory plan stored at export (``memory_plan.json``, informative: ``load`` plans again), after the
    manifest checks of :func:`read_manifest`. Format 3 stores it as a JSON object; format 2 stored a JSON
    string holding that object, which is read too. Raises :class:`ArtifactError` for anything else."""
    path = Path(path)
    manifest, files = _open_checked(path)
    try:
        if MEMORY_PLAN not in files:
            raise ArtifactError(path / MEMORY_PLAN, "not listed in the manifest")
        file = path / MEMORY_PLAN
        value = parse_json_value(files[MEMORY_PLAN].read(), file)
        if manifest["format_version"] == 2 and isinstance(value, str):  # format 2 wrapped the object in a string
            value = parse_json_value(value.encode(), file)
        if not isinstance(value, dict):
            raise ArtifactError(file, f"holds a JSON {type(value).__name__}; accepted: an object (format "
                                      f"{manifest['format_version']})")
        return value
    finally:
        for handle in files.values():
            handle.close()


def _open_checked(path: Path) -> tuple[dict, dict[str, BinaryIO]]:
    """The manifest, and every file it lists opened once for reading and checked: a regular file (no
    symbolic links on the way), the listed size and sha256. Later reads use these handles, so a file
    swapped after the check is never read."""
    if not path.is_dir():
        raise ArtifactError(path, "no such artifact directory")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file() or manifest_file.is_symlink():
        raise ArtifactError(manifest_file, "missing: not a specontext artifact (export writes manifest.json last)")
    manifest = parse_json(manifest_file.read_bytes(), manifest_file)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(manifest_file, f"not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not is_int(version) or version not in READ_VERSIONS:
        raise ArtifactError(manifest_file, f"format version {version!r} written by specontext "
                                           f"{manifest.get('specontext')}; this specontext reads versions "
                                           f"{', '.join(map(str, READ_VERSIONS))}")
    here = versions()
    schema = manifest.get("export_schema")
    if not isinstance(schema, list) or len(schema) != 2 or schema[0] != here["export_schema"][0]:
        raise ArtifactError(path / PROGRAM, (
            f"exported with torch {manifest.get('torch')} (export schema {schema}); this torch {here['torch']} reads "
            f"export schema {here['export_schema'][0]}.x: the program cannot be loaded; export it again with this torch"))
    for required in (PROGRAM, "config.json", "generation_config.json", "head.json", "options.json"):
        if required not in manifest["files"]:
            raise ArtifactError(path / required, "not listed in the manifest")
    files: dict[str, BinaryIO] = {}
    try:
        for name, entry in manifest["files"].items():
            files[name] = _open_listed(path, name, entry, manifest_file)
    except BaseException:
        for handle in files.values():
            handle.close()
        raise
    stored = (Path(folder, name).relative_to(path).as_posix() for folder, _, names in os.walk(path) for name in names)
    unlisted = sorted(name for name in stored if name not in manifest["files"] and name != MANIFEST)
    if unlisted:
        logger.warning("%s: files not in the manifest are ignored (never read): %s", path, ", ".join(unlisted))
    return manifest, files


def _open_listed(path: Path, name, entry, manifest_file: Path) -> BinaryIO:
    parts = Path(name).parts if isinstance(name, str) else ()
    if not parts or Path(name).is_absolute() or any(part in ("..", ".") for part in parts) or "\\" in name:
        raise ArtifactError(manifest_file, f"lists a file outside the artifact or not a plain relative path: {name!r}")
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
        raise ArtifactError(manifest_file, f"the entry for {name!r} lacks its bytes and sha256")
    file = path / name
    for depth in range(1, len(parts) + 1):  # no link anywhere below the artifact's directory
        if (path.joinpath(*parts[:depth])).is_symlink():
            raise ArtifactError(path.joinpath(*parts[:depth]), "is a symbolic link; an artifact's files are read "
                                                                "only as regular files inside its directory")
    try:
        descriptor = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ArtifactError(file, "missing") from None
    except OSError as error:
        raise ArtifactError(file, f"cannot be opened as a regular file ({error.strerror})") from None
    handle = os.fdopen(descriptor, "rb")
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ArtifactError(file, "not a regular file")
        if status.st_size != entry["bytes"]:
            raise ArtifactError(file, f"truncated or changed: {status.st_size} bytes, the manifest says {entry['bytes']}")
        if _digest(handle) != entry["sha256"]:
            raise ArtifactError(file, "damaged: its sha256 differs from the manifest's")
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return handle


def check_program_archive(file: Path | str) -> None:
    """Refuse (:class:`ArtifactError`) a ``.pt2`` archive that ``torch.export.load`` could run code from:
    pickles, expressions it evaluates, guards it executes, targets it calls (``artifact_safety``)."""
    with open(file, "rb") as handle:
        _check_program(handle, Path(file))


def _check_program(handle: BinaryIO, file: Path) -> None:
    try:
        scan_program_archive(handle)
    except UnsafeProgram as error:
        raise ArtifactError(file, f"{error}; loading never unpickles, evaluates or calls what an artifact "
                                  "names beyond operators and size expressions") from None


# -- load ---------------------------------------------------------------------------------------------------
DTYPES = ("float32", "float16", "bfloat16")
OPTIONS = {  # options.json: key -> (check, what is accepted)
    "budget_bytes": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "token_budget": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null"),
    "sink_tokens": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    "local_window": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    "selection": (lambda v: isinstance(v, str), "a string"),
    "offload": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(is_int(i) for i in v)),
                "a mode or a list of layer indices"),
    "elastic": (lambda v: isinstance(v, bool), "true or false"),
    "prefill_chunk": (lambda v: v is None or (is_int(v) and v >= MIN_PREFILL_CHUNK),
                      f"an integer of at least {MIN_PREFILL_CHUNK} or null"),
    "last_only": (lambda v: isinstance(v, bool), "true or false"),
    "aux_layers": (lambda v: isinstance(v, list) and all(is_int(i) and i >= 0 for i in v), "a list of layer indices"),
    "device": (lambda v: isinstance(v, str), "a device name"),
    "dtype": (lambda v: v in DTYPES, " or ".join(DTYPES)),
    "vocab_size": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "weight_bytes": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
}
def load(path: str | Path, device: str | torch.device | None = None, budget: int | str | None = None,
         compile_decode_step: bool | None = None, cuda_graph: bool | None = None):
    """A runnable compiled model (``generate``, ``replay``) from an artifact written by :func:`export`.

    ``device``: where to run (default: the device it was exported on, or the CPU if that is a GPU this
    machine lacks); ``budget``: the GPU memory budget (default: the exported one). The memory plan is
    made for them. ``compile_decode_step``, ``cuda_graph``: as :func:`specontext.compile`'s (choices of
    this process, not stored in the artifact). The model's tokenizer, if exported, is ``.tokenizer``.
    """
    for name, value in (("compile_decode_step", compile_decode_step), ("cuda_graph", cuda_graph)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None (None: on CUDA); got {value!r}")
    path = Path(path)
    manifest, files = _open_checked(path)
    with contextlib.ExitStack() as stack:
        for handle in files.values():
            stack.callback(handle.close)
        return _load_checked(path, manifest, files, device, budget, compile_decode_step, cuda_graph)


def _load_checked(path: Path, manifest: dict, files: dict[str, BinaryIO], device, budget, compile_decode_step: bool | None,
                  cuda_graph: bool | None):
    from transformers import AutoConfig, GenerationConfig

    from .api import SpeContextModel

    program_file = files[PROGRAM]
    _check_program(program_file, path / PROGRAM)
    here = versions()
    if manifest.get("torch") != here["torch"] or manifest.get("transformers") != here["transformers"]:
        logger.info("%s: exported with torch %s / transformers %s, loading with torch %s / transformers %s",
                    path, manifest.get("torch"), manifest.get("transformers"), here["torch"], here["transformers"])
    options = _read_json(files, path, "options.json")
    for key, (accepts, what) in OPTIONS.items():
        if key not in options or not accepts(options[key]):
            raise ArtifactError(path / "options.json", f"{key} is {options.get(key, 'missing')!r}; accepted: {what}")
    try:
        hf_config = AutoConfig.for_model(**_read_json(files, path, "config.json"))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ArtifactError(path / "config.json", f"not a usable transformers config ({error})") from None
    try:
        generation_config = GenerationConfig.from_dict(_read_json(files, path, "generation_config.json"))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ArtifactError(path / "generation_config.json", f"not a usable generation config ({error})") from None
    tensors = {}
    if HEAD_TENSORS in files:
        from safetensors.torch import load as load_safetensors

        try:
            tensors = load_safetensors(files[HEAD_TENSORS].read())
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise ArtifactError(path / HEAD_TENSORS, f"not a readable safetensors file ({error})") from error
    head_json = _read_json(files, path, "head.json")
    try:
        check_head_fields(head_json)  # the fields now; the head is built once the program is loaded
    except HeadDescriptionError as error:
        raise ArtifactError(path / error.file, str(error)) from error
    try:
        exported_on = torch.device(options["device"])
        config = CompileConfig.from_arguments(
            options["budget_bytes"], options["token_budget"], sink_tokens=options["sink_tokens"],
            local_window=options["local_window"], selection=options["selection"],
            offload=options["offload"] if isinstance(options["offload"], str) else tuple(options["offload"]),
            elastic=options["elastic"], prefill_chunk=options["prefill_chunk"],
            sticky_margin=options.get("sticky_margin", 0.0),  # artifacts from before the option: off
            guard=_guard_option(options.get("guard", False)),
            compile_decode_step=compile_decode_step, cuda_graph=cuda_graph,
        )
    except (ValueError, TypeError, RuntimeError) as error:
        raise ArtifactError(path / "options.json", str(error)) from None
    if budget is not None:  # the caller's budget: a bad one is the caller's ValueError, not the artifact's
        config = dataclasses.replace(config, budget_bytes=parse_budget(budget))
    if device is None:
        device = exported_on if exported_on.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this machine has no CUDA device; accepted: 'cpu'")
    if device.type == "cuda" and device.index is None:  # the runtime keys streams by indexed device
        device = torch.device("cuda", torch.cuda.current_device())
    check_cuda_graph(config, device)
    if options["weight_bytes"] > config.budget_bytes:
        raise BudgetError(f"budget is too small: the model needs at least {format_bytes(options['weight_bytes'])} for "
                         f"its weights alone, plus its KV cache; budget is {format_bytes(config.budget_bytes)}")
    try:
        program = torch.export.load(program_file)
    except Exception as error:  # a version skew surfaces here as any error type: name it and the versions
        raise ArtifactError(path / PROGRAM, (
            f"torch.export.load failed under torch {here['torch']} (exported with torch {manifest.get('torch')}): "
            f"{type(error).__name__}: {error}")) from error
    if device != exported_on:
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    _annotate(program)
    # After the program: an EAGLE-3 head reads the target's embedding from the program's parameters.
    target = TargetParts(getattr(hf_config, "num_hidden_layers", None), _num_kv_heads(hf_config),
                         getattr(hf_config, "hidden_size", None), getattr(hf_config, "vocab_size", None),
                         tuple(options["aux_layers"]), program_tensors(program), device,
                         getattr(torch, options["dtype"]))
    try:
        head = head_from_description(head_json, tensors, target.num_layers, target=target)
    except HeadDescriptionError as error:
        raise ArtifactError(path / error.file, str(error)) from error
    step = CapturedStep(program, options["last_only"], tuple(options["aux_layers"]))
    compiled = SpeContextModel.from_parts(config, hf_config, generation_config, step, head, device,
                                          getattr(torch, options["dtype"]), options["vocab_size"], options["weight_bytes"])
    compiled.tokenizer = load_tokenizer(path, files)
    logger.info("loaded %s from %s on %s", compiled, path, device)
    return compiled


def _num_kv_heads(hf_config) -> int | None:
    from .planning import num_kv_heads

    try:
        return num_kv_heads(hf_config)
    except (AttributeError, TypeError, ValueError):  # a config the head kinds that need it will refuse
        return None


def _annotate(program: torch.export.ExportedProgram) -> None:
    """Node annotations are not serialized: derive them again from the loaded graph."""
    from .passes.annotate_attention import annotate_attention

    annotate_attention(program.graph_module)


def _read_json(files: dict[str, BinaryIO], path: Path, name: str) -> dict:
    return parse_json(files[name].read(), path / name)
