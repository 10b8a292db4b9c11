"""specontext.export / specontext.load: round trips, damaged artifacts, and no unpickling."""

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import specontext
from specontext_compiler.artifact import ArtifactError, check_program_archive, read_manifest
from specontext.testing import padded_batch, tiny_model

GENERATE = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama compiled sparse (budget 16, every layer offloaded), its tokens, and its artifact."""
    model = tiny_model("llama")
    compiled = specontext.compile(model, "1GB", token_budget=16, offload="all", local_window=4, progress=False)
    ids, mask = padded_batch(96, [40, 29], seed=3)
    tokens = compiled.generate(ids, attention_mask=mask, **GENERATE)
    path = tmp_path_factory.mktemp("artifact") / "tiny-llama"
    specontext.export(compiled, path)
    return path, ids, mask, tokens


def copy_of(path: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(path, tmp_path / "copy"))


def rewrite_manifest(path: Path) -> None:
    """What an attacker who edits files also does: make the manifest's sizes and checksums match."""
    from specontext_compiler.artifact import _sha256

    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry.update(bytes=(path / name).stat().st_size, sha256=_sha256(path / name))
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_gives_identical_tokens(exported):
    path, ids, mask, tokens = exported
    names = set(read_manifest(path)["files"])
    assert {"step.pt2", "config.json", "generation_config.json", "head.json", "options.json", "memory_plan.json"} <= names
    loaded = specontext.load(path)
    assert loaded.model is None  # no HF model object
    assert loaded.runtime.store.num_layers == 2 and loaded.config.offload == "all" and loaded.config.local_window == 4
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **GENERATE), tokens)
    assert loaded.stats["attended_tokens_per_step"] <= 17  # sparse steps ran: the budget, not the 40+ tokens
    assert loaded.stats["h2d_bytes"] > 0  # and the offloaded layers loaded their selections from host memory


def test_round_trip_in_a_fresh_process_without_the_model(exported, tmp_path):
    """A process that never builds the HF model: only the artifact."""
    path, ids, mask, tokens = exported
    code = (
        "import json, sys, torch, specontext\n"
        f"ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})\n"
        f"m = specontext.load({str(path)!r}, budget='600MB')\n"
        f"out = m.generate(ids, attention_mask=mask, **{GENERATE!r})\n"
        "print(json.dumps({'tokens': out.tolist(), 'budget': m.config.budget_bytes}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokens"] == tokens.tolist() and report["budget"] == 600 * 10**6


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_round_trip_other_families_dense_and_sparse(family, tmp_path):
    model = tiny_model(family)
    ids, mask = padded_batch(96, [33, 20], seed=1)
    for token_budget in (None, 16):
        compiled = specontext.compile(model, "1GB", token_budget=token_budget, progress=False)
        expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
        path = specontext.export(compiled, tmp_path / f"{family}-{token_budget}")
        assert torch.equal(specontext.load(path).generate(ids, attention_mask=mask, **GENERATE), expected)


@pytest.fixture(scope="module")
def with_tokenizer(smollm2, tmp_path_factory):
    _, tokenizer = smollm2
    model = tiny_model("llama", vocab_size=len(tokenizer))
    compiled = specontext.compile(model, "1GB", token_budget=16, progress=False)
    return specontext.export(compiled, tmp_path_factory.mktemp("tokenizer") / "with-tokenizer", tokenizer=tokenizer), tokenizer


def test_tokenizer_travels_with_the_artifact(with_tokenizer):
    path, tokenizer = with_tokenizer
    loaded = specontext.load(path)
    text = "The orchard by the river"
    assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_tokenizer_code_is_never_run(with_tokenizer, tmp_path):
    """A tokenizer asking for its own code (auto_map), naming a non-tokenizer class (transformers would load a
    model from the folder, prompting for its remote code), or shipping .py files, is refused; unlisted files
    in tokenizer/ are not even copied where transformers could find them."""
    path = copy_of(with_tokenizer[0], tmp_path)
    marker = tmp_path / "pwned"
    (path / "tokenizer" / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (path / "tokenizer" / "vocab.pkl").write_bytes(pickle.dumps(Planted(marker)))
    assert specontext.load(path).tokenizer is not None and not marker.exists()  # unlisted: ignored

    rewrite = json.loads((path / "manifest.json").read_text())
    rewrite["files"]["tokenizer/tokenization_evil.py"] = {}
    (path / "manifest.json").write_text(json.dumps(rewrite))
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match="not a tokenizer file"):
        specontext.load(path)

    for setting, problem in [({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}, "auto_map"),
                             ({"tokenizer_class": "AutoModelForCausalLM"}, "not a transformers tokenizer class")]:
        path = copy_of(with_tokenizer[0], tmp_path / problem.split()[0])
        settings = json.loads((path / "tokenizer" / "tokenizer_config.json").read_text())
        settings.update(setting)
        (path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(settings))
        rewrite_manifest(path)
        with pytest.raises(ArtifactError, match=problem):
            specontext.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage, problem", [
    ("flip a byte of step.pt2", "damaged"),
    ("truncate config.json", "truncated"),
    ("delete head.json", "missing"),
    ("manifest not JSON", "not valid JSON"),
    ("newer format", "format version"),
    ("other export schema", "export schema"),
])
def test_damaged_artifact_names_the_file_and_the_problem(exported, tmp_path, damage, problem):
    path = copy_of(exported[0], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    if damage == "flip a byte of step.pt2":
        data = bytearray((path / "step.pt2").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / "step.pt2").write_bytes(bytes(data))
        file = "step.pt2"
    elif damage == "truncate config.json":
        (path / "config.json").write_text((path / "config.json").read_text()[:40])
        file = "config.json"
    elif damage == "delete head.json":
        (path / "head.json").unlink()
        file = "head.json"
    elif damage == "manifest not JSON":
        (path / "manifest.json").write_text("{ not json")
        file = "manifest.json"
    elif damage == "newer format":
        manifest["format_version"] = 99
        (path / "manifest.json").write_text(json.dumps(manifest))
        file = "manifest.json"
    else:
        manifest["export_schema"] = [manifest["export_schema"][0] + 1, 0]
        manifest["torch"] = "9.9.0"
        (path / "manifest.json").write_text(json.dumps(manifest))
        file = "step.pt2"
    with pytest.raises(ArtifactError, match=problem) as info:
        specontext.load(path)
    assert isinstance(info.value, ValueError) and info.value.file.endswith(file)
    if damage == "other export schema":
        assert "9.9.0" in str(info.value) and torch.__version__ in str(info.value)


def plain_torch_export_load_runs_it(archive: Path, marker: Path) -> None:
    """The threat is real: plain ``torch.export.load`` of a copy of ``archive`` runs the planted code (the
    marker appears), whatever error it raises afterwards. The marker is removed again."""
    demo = archive.with_name("demo.pt2")
    demo.write_bytes(archive.read_bytes())
    try:
        torch.export.load(demo)
    except Exception:  # noqa: BLE001 -- the archive is broken on purpose; only the marker matters here
        pass
    demo.unlink()
    assert marker.exists()
    marker.unlink()


class Planted:
    """A pickle that, when unpickled, creates a marker file (stands for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickle_in_sample_inputs_does_not_run(exported, tmp_path):
    """torch.export.load unpickles an archive's sample inputs (falling back to weights_only=False): shown
    here on a throwaway copy, then the same artifact through specontext.load, which refuses it unread."""
    path = copy_of(exported[0], tmp_path)
    marker = tmp_path / "pwned"
    edit_archive(path / "step.pt2", lambda name, content: pickle.dumps(Planted(marker))
                 if name == "data/sample_inputs/model.pt" else content)
    rewrite_manifest(path)

    plain_torch_export_load_runs_it(path / "step.pt2", marker)

    with pytest.raises(ArtifactError, match="pickled sample inputs"):
        specontext.load(path)
    assert not marker.exists()


def edit_archive(archive: Path, edit) -> None:
    """Rewrite the archive with ``edit(name, content) -> content`` applied to every entry (names without the
    archive's folder)."""
    source = zipfile.ZipFile(archive)
    entries = [(info, source.read(info)) for info in source.infolist()]
    source.close()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as target:
        for info, content in entries:
            target.writestr(info, edit(info.filename.split("/", 1)[1], content))


def edit_program(path: Path, edit) -> None:
    """Apply ``edit`` to the step program's JSON (models/model.json) and make the manifest match."""
    def rewrite(name, content):
        if name != "models/model.json":
            return content
        program = json.loads(content)
        edit(program)
        return json.dumps(program).encode()

    edit_archive(path / "step.pt2", rewrite)
    rewrite_manifest(path)


def first_with(value, key):
    """The first dict holding ``key`` in a JSON value."""
    stack = [value]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            if key in item:
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError(f"no {key}")


def test_weights_flagged_as_pickles_are_refused(exported, tmp_path):
    """A weight stored as a pickle that creates a file: plain torch.export.load runs it, specontext.load refuses."""
    path = copy_of(exported[0], tmp_path)
    marker = tmp_path / "pwned"

    def plant(name, content):
        if name == "data/weights/model_weights_config.json":
            config = json.loads(content)
            config["config"][next(iter(config["config"]))]["use_pickle"] = True
            return json.dumps(config).encode()
        return pickle.dumps(Planted(marker)) if name == "data/weights/weight_0" else content

    edit_archive(path / "step.pt2", plant)
    rewrite_manifest(path)
    plain_torch_export_load_runs_it(path / "step.pt2", marker)
    with pytest.raises(ArtifactError, match="stored as a pickle or an object"):
        check_program_archive(path / "step.pt2")
    with pytest.raises(ArtifactError, match="stored as a pickle or an object"):
        specontext.load(path)
    assert not marker.exists()


def test_size_expression_that_runs_code_is_refused(exported, tmp_path):
    """torch.export.load parses symbolic sizes with sympy.sympify, which evaluates Python: shown on a copy."""
    path = copy_of(exported[0], tmp_path)
    marker = tmp_path / "pwned"

    def plant(program):
        first_with(program["graph_module"], "expr_str")["expr_str"] = (
            f"__import__('builtins').open({str(marker)!r}, 'w') and Symbol('s70', positive=True, integer=True)")

    edit_program(path, plant)
    plain_torch_export_load_runs_it(path / "step.pt2", marker)
    with pytest.raises(ArtifactError, match="size expression") as info:
        specontext.load(path)
    assert info.value.file.endswith("step.pt2") and not marker.exists()


def set_target(program, target):
    node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.silu.default")
    node["target"] = target


def set_stack_trace(program, text):
    program["graph_module"]["graph"]["nodes"][3]["metadata"]["stack_trace"] = text


def signature(program):
    return program["graph_module"]["module_call_graph"][0]["signature"]


def set_spec_key(program, key):
    """Add ``key`` to the dict context of the step's in_spec (torch decodes spec JSON with an import hook)."""
    protocol, root = json.loads(signature(program)["in_spec"])
    kwargs = root["children_spec"][1]
    kwargs["context"] = json.dumps(json.loads(kwargs["context"]) + [key])
    kwargs["children_spec"].append({"type": None, "context": None, "children_spec": []})
    signature(program)["in_spec"] = json.dumps([protocol, root])


def rename_input(program, old, new):
    """Rename a graph input everywhere (FX writes placeholder targets verbatim into generated code)."""
    text = json.dumps(program).replace(json.dumps(old), json.dumps(new))
    program.clear()
    program.update(json.loads(text))


def set_parameter_name(program, new):
    spec = next(s for s in program["graph_module"]["signature"]["input_specs"] if "parameter" in s)
    spec["parameter"]["parameter_name"] = new


def add_subgraph_argument(program):
    node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.silu.default")
    node["inputs"].append({"name": "body", "arg": {"as_graph": {"name": "x", "graph": {}}}, "kind": 1})


@pytest.mark.parametrize("plant, problem", [
    (lambda p: p["guards_code"].append("__import__('os').system('true') is None"), "guard"),
    (lambda p: p["guards_code"].append("L['x'].size()[0] == len('\")+__import__(\"os\")#')"), "guard"),
    (lambda p: p["range_constraints"].update({"__import__('os')": {"min_val": 0, "max_val": 1}}), "field name"),
    (lambda p: set_target(p, "torch.os.system"), "node target"),
    (lambda p: set_target(p, "torch.load"), "node target"),
    (lambda p: set_target(p, "torch.ops.aten.silu.__class__"), "node target"),
    (lambda p: set_target(p, "#extension.op"), "node target"),
    (lambda p: set_stack_trace(p, 'File "x.py", line 1, in f\n  y\rimport os'), "control character"),
    (lambda p: first_with(p["graph_module"], "expr_str").update(expr_str="Symbol('s70').__class__"), "size expression"),
    (lambda p: first_with(p["graph_module"], "expr_str").update(expr_str="Integer(lambda: 0)"), "size expression"),
    (lambda p: first_with(p["graph_module"], "expr_str").update(expr_str="Mul(Integer(10), Integer(10**30))"),
     "size expression"),  # integers beyond int64 (and powers) are refused: a denial of service otherwise
    (lambda p: signature(p)["forward_arg_names"].__setitem__(2, 'position_ids=open("x", "w").close()'),
     "not an identifier"),
    (lambda p: rename_input(p, "position_ids", 'position_ids=open("x", "w").close()'), "not an identifier"),
    (lambda p: set_spec_key(p, {"__enum__": True, "fqn": "os:path", "name": "a"}), "in_spec"),
    (lambda p: set_spec_key(p, "z': open('x', 'w'), '"), "in_spec"),
    (lambda p: signature(p).update(out_spec=json.dumps(
        [1, {"type": "collections.defaultdict", "context": "null", "children_spec": []}])), "out_spec"),
    (lambda p: set_parameter_name(p, 'model.lm_head.weight"),open("x","w"),("'), "not a dotted name"),
    (add_subgraph_argument, "as_graph"),
    (lambda p: set_target(p, "torch.ops.aten.from_file.default"), "not an operator an exported model step uses"),
    (lambda p: set_target(p, "torch.ops.aten.copy_.default"), "writes into its arguments|not an operator an exported"),
    (lambda p: set_target(p, "torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors.default"),
     "not an operator an exported model step uses"),  # trusts its indices: writes out of bounds
    (lambda p: set_target(p, "torch.ops.aten.empty.memory_format"), "not an operator an exported model step uses"),
    (lambda p: set_target(p, "torch.ops.prims.device_put.default"), "not an operator of"),
    (lambda p: first_with(p["graph_module"]["graph"], "layout").update(layout=1), "layout 1"),  # sparse COO

    (lambda p: set_parameter_name(p, "model.lm_head.__class__.__init__"), "not a dotted name"),
    (lambda p: set_stack_trace(p, "x") or p["graph_module"]["graph"]["nodes"][3]["metadata"].update(
        source_fn_stack="f,torch.os.system"), "source_fn_stack"),
])
def test_program_strings_torch_would_evaluate_or_call_are_refused(exported, tmp_path, plant, problem):
    """Guards (exec-ed by ExportedProgram.module() when sample inputs exist), range-constraint symbols, node
    targets (called when the program runs), strings FX pastes into the Python it compiles (input names,
    argument names, parameter paths, spec keys), spec node types torch imports, subgraph arguments, size
    expressions (evaluated by sympify), operators that take paths or write into their arguments (mapping
    a file with aten::from_file and copy_-ing into it writes any file), metadata torch resolves into
    live objects."""
    path = copy_of(exported[0], tmp_path)
    edit_program(path, plant)
    with pytest.raises(ArtifactError, match=problem):
        specontext.load(path)


@pytest.mark.parametrize("mode", ["eager", "fixed"])
def test_a_selection_outside_the_kv_buffers_is_never_read(mode, monkeypatch):
    """A loaded program is data: attention computes from the selection its graph passes, so a selection far
    outside the KV buffers (which the Triton kernels would read unchecked) is clamped to the stored
    positions in an eager step, and refused in a fixed-shape step (which follows its retrieval only)."""
    from specontext_compiler.runtime import attention_runtime
    from specontext_compiler.runtime.attention_runtime import AttentionRuntime
    from specontext_compiler.runtime.cuda_graph_decode import StaticDecodeRuntime

    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, offload="none", progress=False)
    compiled.engine.decode_mode = mode
    ids, mask = padded_batch(96, [40, 27], seed=4)
    compiled.generate(ids, attention_mask=mask, **GENERATE)
    for runtime in (AttentionRuntime, StaticDecodeRuntime):
        original = runtime.attention

        def attention(self, layer, q, k, v, mask, scale, softcap, sliding_window=0, indices=None, _original=original):
            if indices is not None and indices.numel():
                indices = torch.full_like(indices, 2**40)
            return _original(self, layer, q, k, v, mask, scale, softcap, sliding_window, indices)

        monkeypatch.setattr(runtime, "attention", attention)
    read = []
    reference = attention_runtime.sparse_decode_attention

    def spy(q, keys, values, positions, *args):
        read.append(int(positions.max()) < keys.shape[2])
        return reference(q, keys, values, positions, *args)

    monkeypatch.setattr(attention_runtime, "sparse_decode_attention", spy)
    if mode == "fixed":
        with pytest.raises(ValueError, match="other than its retrieval's output"):
            compiled.generate(ids, attention_mask=mask, **GENERATE)
        return
    compiled.generate(ids, attention_mask=mask, **GENERATE)
    assert read and all(read)


@pytest.mark.parametrize("entry", [
    "data/weights/model.pt", "data/constants/model.pt", "data/constants/custom_obj_0", "data/constants/opaque_obj_0",
    "extra/notes.txt", "data/aotinductor/model/model.so", "serialized_state_dict.pt", "models/other.json",
])
def test_archive_entries_outside_a_plain_program_are_refused(exported, tmp_path, entry):
    """Legacy .pt payloads, custom and opaque objects, extra files, AOTInductor libraries, legacy-format
    records, a second program: anything torch would unpickle, load or read beyond one plain program."""
    path = copy_of(exported[0], tmp_path)
    with zipfile.ZipFile(path / "step.pt2", "a") as archive:
        archive.writestr(f"step/{entry}", pickle.dumps(Planted(tmp_path / "pwned")))
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match="unexpected archive entry"):
        specontext.load(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["custom_obj_0", "opaque_obj_0"])
def test_constants_stored_as_objects_are_refused(exported, tmp_path, kind):
    path = copy_of(exported[0], tmp_path)

    def plant(name, content):
        if name == "data/constants/model_constants_config.json":
            config = json.loads(content)
            config["config"][next(iter(config["config"]))].update(path_name=kind, use_pickle=True)
            return json.dumps(config).encode()
        return content

    edit_archive(path / "step.pt2", plant)
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match="pickle or an object"):
        specontext.load(path)


@pytest.mark.parametrize("layout", ["junk before the archive", "malicious archive after it",
                                    "malicious archive before it"])
def test_archives_two_zip_readers_could_read_differently_are_refused(exported, tmp_path, layout):
    """torch falls back to Python's zipfile (and unpickles) when its own reader fails: the scan reads with
    torch's reader and requires zipfile to agree, so neither reader can see entries the scan did not."""
    path = copy_of(exported[0], tmp_path)
    benign = (path / "step.pt2").read_bytes()
    marker = tmp_path / "pwned"
    edit_archive(path / "step.pt2", lambda name, content: pickle.dumps(Planted(marker))
                 if name == "data/sample_inputs/model.pt" else content)
    malicious = (path / "step.pt2").read_bytes()
    data = {"junk before the archive": b"\0" * 64 + benign, "malicious archive after it": benign + malicious,
            "malicious archive before it": malicious + benign}[layout]
    (path / "step.pt2").write_bytes(data)
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match="leading bytes|not a readable|disagree"):
        specontext.load(path)
    assert not marker.exists()


def test_symbolic_links_are_refused(exported, tmp_path):
    path = copy_of(exported[0], tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_bytes((path / "head.json").read_bytes())
    (path / "head.json").unlink()
    (path / "head.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match="symbolic link") as info:
        specontext.load(path)
    assert info.value.file.endswith("head.json")


@pytest.mark.parametrize("file, edit, problem", [
    ("options.json", lambda o: o.pop("token_budget"), "token_budget is 'missing'"),
    ("options.json", lambda o: o.update(dtype="load"), "dtype is 'load'"),
    ("options.json", lambda o: o.update(elastic="yes"), "elastic"),
    ("options.json", lambda o: o.update(offload="sometimes"), "offload='sometimes'"),
    ("options.json", lambda o: o.update(device="nowhere"), "nowhere"),
    ("head.json", lambda h: h.update(kind="pickle"), "unknown retrieval head kind"),
    ("head.json", lambda h: h.update(layers=[99]), "layers"),
    ("head.json", lambda h: h.update(layers="0"), "layers"),
    ("head.json", lambda h: h.update(lookbehind=-1), "lookbehind"),
    ("head.json", lambda h: h.update(prior_window=10**9), "prior_window"),
    ("head.json", lambda h: h.update(combine="max"), "combine"),
    ("config.json", lambda c: c.update(model_type="no-such-model"), "not a usable transformers config"),
])
def test_malformed_json_files_name_the_file_and_the_value(exported, tmp_path, file, edit, problem):
    path = copy_of(exported[0], tmp_path)
    content = json.loads((path / file).read_text())
    edit(content)
    (path / file).write_text(json.dumps(content))
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match=problem) as info:
        specontext.load(path)
    assert info.value.file.endswith(file)


def test_a_json_file_that_is_not_an_object_is_refused(exported, tmp_path):
    path = copy_of(exported[0], tmp_path)
    (path / "options.json").write_text("[1, 2]")
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match="not an object"):
        specontext.load(path)


def test_unlisted_files_are_never_read(exported, tmp_path, caplog):
    path = copy_of(exported[0], tmp_path)
    marker = tmp_path / "pwned"
    (path / "evil.pkl").write_bytes(pickle.dumps(Planted(marker)))
    (path / "head.safetensors").write_bytes(pickle.dumps(Planted(marker)))  # not in the manifest either
    _, ids, mask, tokens = exported
    with caplog.at_level("WARNING"):
        loaded = specontext.load(path)
    assert "evil.pkl" in caplog.text and not marker.exists()
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **GENERATE), tokens)


def test_bad_export_and_load_arguments(exported, tmp_path):
    path, *_ = exported
    with pytest.raises(TypeError, match="specontext.compile"):
        specontext.export(tiny_model("llama"), tmp_path / "x")
    with pytest.raises(ValueError, match="not an empty directory"):
        specontext.export(specontext.load(path), path)
    with pytest.raises(ArtifactError, match="no such artifact"):
        specontext.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="weights alone"):
        specontext.load(path, budget="1KB")
    with pytest.raises(TypeError, match="exported artifact"):
        specontext.load(path)(torch.ones(1, 4, dtype=torch.long))
    quest = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, selection="quest", progress=False)
    assert json.loads((specontext.export(quest, tmp_path / "quest") / "head.json").read_text())["kind"] == "quest"


def test_every_option_of_the_draft_free_head_survives_its_description(tmp_path):
    from specontext_compiler.artifact_head import head_description, head_from_description
    from specontext_compiler.retrieval import TargetLayerHead

    head = TargetLayerHead((1, 2), query_weight=4.0, lookahead=2, lookbehind=1, prior_window=16, prior_from=0.5,
                           combine="union")
    description, tensors = head_description(head)
    loaded = head_from_description(json.loads(json.dumps(description)), tensors, 4)
    for name in ("layers", "prefill_prior", "query_weight", "lookahead", "lookbehind", "prior_window", "prior_from",
                 "combine"):
        assert getattr(loaded, name) == getattr(head, name), name


def test_draft_heads_are_refused_before_writing(tmp_path):
    from specontext_compiler.retrieval import TargetLayerHead

    draft = tiny_model("llama", seed=1)
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, draft=draft, progress=False)
    with pytest.raises(ValueError, match="DraftModelHead"):
        specontext.export(compiled, tmp_path / "draft")
    assert not (tmp_path / "draft").exists()
    model = tiny_model("llama")
    predicted = TargetLayerHead(1, query="predicted", model=model)
    compiled = specontext.compile(model, "1GB", token_budget=16, draft=predicted, progress=False)
    with pytest.raises(ValueError, match="query='predicted'"):
        specontext.export(compiled, tmp_path / "predicted")
    assert not (tmp_path / "predicted").exists()


def test_dropout_in_training_mode_is_refused():
    """Dropout with train=True would draw from the process's global random generator."""
    from specontext_compiler.artifact_safety import UnsafeProgram, _check_node

    node = {"target": "torch.ops.aten.dropout.default", "outputs": [],
            "inputs": [{"name": "p", "arg": {"as_float": 0.1}}, {"name": "train", "arg": {"as_bool": True}}]}
    with pytest.raises(UnsafeProgram, match="train must be"):
        _check_node(node)
    node["inputs"][1]["arg"] = {"as_bool": False}
    _check_node(node)
