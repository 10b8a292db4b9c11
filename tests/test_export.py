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
from specontext_compiler.artifact import ArtifactError, check_program_archive, read_manifest, read_memory_plan
from specontext.testing import padded_batch, tiny_model, write_eagle3_checkpoint

GENERATE = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama compiled sparse (budget 16, every layer offloaded, sticky selection), its tokens, and its
    artifact."""
    model = tiny_model("llama")
    compiled = specontext.compile(model, "1GB", token_budget=16, offload="all", local_window=4, progress=False,
                                  sticky_margin=0.01)
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
    assert loaded.config.sticky_margin == 0.01 and loaded.runtime.sparse.sticky_margin == 0.01
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **GENERATE), tokens)
    assert loaded.stats["attended_tokens_per_step"] <= 17  # sparse steps ran: the budget, not the 40+ tokens
    assert loaded.stats["h2d_bytes"] > 0  # and the offloaded layers loaded their selections from host memory


def test_an_artifact_from_before_sticky_selection_loads_with_it_off(exported, tmp_path):
    path = copy_of(exported[0], tmp_path)
    options = json.loads((path / "options.json").read_text())
    del options["sticky_margin"]
    (path / "options.json").write_text(json.dumps(options))
    rewrite_manifest(path)
    assert specontext.load(path).config.sticky_margin == 0.0


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


def test_memory_plan_is_a_json_object_and_format_2_artifacts_still_load(exported, tmp_path):
    """memory_plan.json holds the plan as an object (format 3); format 2 wrote a JSON string holding it: such
    an artifact still loads (load never reads the plan: it plans again) and read_memory_plan reads both."""
    path, ids, mask, tokens = exported
    plan = json.loads((path / "memory_plan.json").read_text())
    assert isinstance(plan, dict) and read_manifest(path)["format_version"] == 3
    assert {"budget_bytes", "batch", "context", "token_budget", "peak_bytes", "gpu_layers", "cpu_layers", "terms",
            "expressions", "thresholds"} <= set(plan)
    assert plan["budget_bytes"] == 10**9 and plan["token_budget"] == 16 and plan["context"] == 512
    assert read_memory_plan(path) == plan

    old = copy_of(path, tmp_path)
    (old / "memory_plan.json").write_text(json.dumps(json.dumps(plan, indent=2), indent=2))  # as format 2 wrote it
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    rewrite_manifest(old)
    assert read_memory_plan(old) == plan
    assert torch.equal(specontext.load(old).generate(ids, attention_mask=mask, **GENERATE), tokens)

    manifest["format_version"] = 3  # format 3 with format 2's string: refused by the reader of the plan
    (old / "manifest.json").write_text(json.dumps(manifest))
    rewrite_manifest(old)
    with pytest.raises(ArtifactError, match=r"memory_plan.json: holds a JSON str; accepted: an object \(format 3\)"):
        read_memory_plan(old)
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 1 .* this specontext reads versions 2, 3"):
        specontext.load(old)


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
    (lambda p: p["guards_code"].append(HANGING_GUARD), r"guard .*10\*\*10\*\*10.* powers are not accepted"),
    (lambda p: p["guards_code"].append("L['input_ids'].size()[1] == 2 ** 3"), "powers are not accepted"),
    (lambda p: p["guards_code"].append(f"L['input_ids'].size()[1] != {2**64 + 1}"),
     "the integer 18446744073709551617 is beyond"),
    (lambda p: p["guards_code"].append(f"L['input_ids'].size()[{2**70}] == 1"), "beyond the accepted magnitude"),
    (lambda p: p["range_constraints"]["s43"].update(max_val=10**1000), "max_val: the integer of 3322 bits is beyond"),
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
    (lambda p: set_target(p, "_operator.pow"), "not an operator of"),  # pow(s0, 2**63 - 1) would hang each run
    (lambda p: set_target(p, "_operator.lshift"), "not an operator of"),
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


#: A guard Python would evaluate for ever (10**10**10 has ten billion digits): torch execs guards_code when
#: a program has sample inputs; the grammar refuses powers and integers beyond 2**63 wherever it would run.
HANGING_GUARD = "L['input_ids'].size()[1] == 10**10**10"


def test_a_guard_that_computes_for_ever_is_refused_within_seconds(exported, tmp_path):
    """The load runs in a child process under a 10 s alarm whose default action ends the process even
    inside C code (a Python signal handler would wait for 10**10**10 to finish): a hang fails the test
    with the alarm's exit code instead of stalling the suite."""
    path = copy_of(exported[0], tmp_path)
    edit_program(path, lambda p: p["guards_code"].append(HANGING_GUARD))
    code = (
        "import signal, sys, time, specontext\n"
        "from specontext_compiler.artifact import ArtifactError\n"
        "signal.alarm(10)\n"
        "started = time.perf_counter()\n"
        f"try:\n    specontext.load({str(path)!r})\nexcept ArtifactError as error:\n"
        "    print(f'{time.perf_counter() - started:.2f}', error)\n    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode != -14, "the load ran past the 10 s alarm: the guard was evaluated"
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, message = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert float(seconds) < 10 and "step.pt2" in message and HANGING_GUARD in message
    assert "powers are not accepted" in message


def test_integers_too_long_for_python_are_refused_as_damage(exported, tmp_path):
    """A program JSON holding an integer of over 4,300 digits (Python's json refuses to convert it with a
    plain ValueError) is an ArtifactError naming step.pt2, like any other JSON it cannot read."""
    path = copy_of(exported[0], tmp_path)

    def widen(name, content):
        if name != "models/model.json":
            return content
        return content.replace(b'"max_val": 4096', b'"max_val": ' + b"9" * 5000, 1)

    edit_archive(path / "step.pt2", widen)
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match="models/model.json is not valid JSON .*4300") as info:
        specontext.load(path)
    assert info.value.file.endswith("step.pt2")


# -- retrieval heads with weights: draft model and EAGLE-3 -----------------------------------------------------
HEAD_KINDS = ["default", "draft_model", "draft_model pruned", "eagle3", "eagle3 pruned"]
SPARSE = dict(token_budget=20, sink_tokens=2, local_window=4, progress=False)


@pytest.fixture(scope="module")
def head_parts(tmp_path_factory):
    """A tiny 4-layer Llama target, a 6-layer Qwen3 draft (q/k norms), an EAGLE-3 checkpoint, a batch."""
    target = tiny_model("llama", num_hidden_layers=4)
    return (target, tiny_model("qwen3", seed=1, num_hidden_layers=6),
            write_eagle3_checkpoint(tmp_path_factory.mktemp("eagle3")), padded_batch(96, [40, 27], seed=11))


def compiled_with_head(kind: str, head_parts):
    from specontext_compiler.retrieval import DraftModelHead, Eagle3Head

    target, draft, eagle_dir, _ = head_parts
    heads = {
        "default": None,
        "draft_model": draft,
        # a calibrated draft's shape: scoring layer 0 (no body layers), two kept heads, a head map
        "draft_model pruned": DraftModelHead(draft, 2, layer=0, heads=[1, 3], head_map=[[1], [1, 3]]),
        "eagle3": str(eagle_dir),
        "eagle3 pruned": Eagle3Head(eagle_dir, target.get_input_embeddings(), 4, 2).pruned([0, 2, 3], [[0], [2, 3]]),
    }
    return specontext.compile(target, "1GB", draft=heads[kind], **SPARSE)


def head_tensors(head) -> dict:
    return head.export_tensors() if hasattr(head, "export_tensors") else dict(getattr(head, "tensors", {}))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_every_head_kind_exports_and_loads_with_identical_tokens(kind, head_parts, tmp_path):
    """Each head kind round-trips: weights through head.safetensors, the description through head.json
    (no pickle); the loaded head holds the same tensors and generates the same tokens. The pruned kinds
    are exported a second time from the loaded model (its head rebuilt from the artifact alone)."""
    from specontext_compiler.retrieval import DraftModelHead, Eagle3Head, TargetLayerHead

    ids, mask = head_parts[3]
    compiled = compiled_with_head(kind, head_parts)
    expected_type = {"default": TargetLayerHead, "draft_model": DraftModelHead, "eagle3": Eagle3Head}[kind.split()[0]]
    assert isinstance(compiled.head, expected_type)
    tokens = compiled.generate(ids, attention_mask=mask, **GENERATE)
    path = specontext.export(compiled, tmp_path / "artifact")
    description = json.loads((path / "head.json").read_text())
    assert description["kind"] == {"default": "target_layer"}.get(kind, kind.split()[0])
    assert ("head.safetensors" in read_manifest(path)["files"]) == (kind != "default")
    loaded = specontext.load(path)
    assert type(loaded.head) is expected_type and loaded.model is None
    original, rebuilt = head_tensors(compiled.head), head_tensors(loaded.head)
    assert original.keys() == rebuilt.keys() and all(torch.equal(original[k], rebuilt[k]) for k in original)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **GENERATE), tokens)
    assert loaded.runtime.attended_tokens[1:] == [20] * (GENERATE["max_new_tokens"] - 1)  # the head selected
    if kind.endswith("pruned"):
        again = specontext.export(loaded, tmp_path / "again")
        assert json.loads((again / "head.json").read_text()) == description
        assert torch.equal(specontext.load(again).generate(ids, attention_mask=mask, **GENERATE), tokens)


def test_an_eagle3_head_shares_the_programs_embedding(head_parts, tmp_path):
    """The EAGLE-3 head reads the target's input embedding: the artifact names the program's parameter
    instead of storing a second copy, and the loaded head uses that very tensor (Gemma 3: and its scale)."""
    ids, mask = head_parts[3]
    target = tiny_model("gemma3_text", num_hidden_layers=4)
    compiled = specontext.compile(target, "1GB", draft=str(head_parts[2]), **SPARSE)
    tokens = compiled.generate(ids, attention_mask=mask, **GENERATE)
    path = specontext.export(compiled, tmp_path / "gemma3")
    embedding = json.loads((path / "head.json").read_text())["embedding"]
    assert embedding == {"weight": "model.model.embed_tokens.weight", "scale": "model.model.embed_tokens.embed_scale"}
    from safetensors.torch import load_file

    assert not any("embed" in name for name in load_file(str(path / "head.safetensors")))
    loaded = specontext.load(path)
    assert loaded.head.embedding.weight is loaded.step.program.state_dict[embedding["weight"]]
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **GENERATE), tokens)


def test_the_default_head_exports(tmp_path):
    """Whatever head specontext.compile picks by default (no draft, no selection) exports and loads."""
    compiled = specontext.compile(tiny_model("llama"), "1GB", progress=False)
    path = specontext.export(compiled, tmp_path / "default")
    assert json.loads((path / "head.json").read_text())["kind"] == "target_layer"
    assert type(specontext.load(path).head) is type(compiled.head)


@pytest.fixture(scope="module")
def head_artifacts(head_parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    return {kind: specontext.export(compiled_with_head(kind, head_parts), folder / kind) for kind in ("draft_model", "eagle3")}


def edit_head_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "head.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "head.safetensors"))


@pytest.mark.parametrize("kind, edit, file, problem", [
    ("draft_model", lambda h: h["config"].update(model_type="gpt2"), "head.json", "config.model_type is 'gpt2'; accepted: llama"),
    ("draft_model", lambda h: h["config"].update(auto_map={"AutoModelForCausalLM": "evil.Model"}), "head.json",
     r"config holds \['auto_map'\]"),
    ("draft_model", lambda h: h["config"].update(quantization_config={"quant_method": "bitsandbytes"}), "head.json",
     r"config holds \['quantization_config'\]"),
    ("draft_model", lambda h: h.update(attn_implementation="kernels-community/flash-attn"), "head.json",
     "attn_implementation is 'kernels-community/flash-attn'; accepted: 'sdpa' or 'eager'"),
    ("draft_model", lambda h: h.update(layer=10**6), "head.json", "layer is 1000000; accepted: an integer in"),
    ("draft_model", lambda h: h.update(layer=2), "head.json", "num_hidden_layers is 5; accepted: layer \+ 1 = 3"),
    ("draft_model", lambda h: h.update(heads=[3, 1]), "head.json", "heads is \[3, 1\]"),
    ("draft_model", lambda h: h.update(head_map=[[0]]), "head.json", "head_map"),
    ("draft_model", lambda h: h["config"].update(vocab_size=50), "head.json", "vocab_size is 50; accepted: the model's 96"),
    ("draft_model", lambda h: h["config"].update(hidden_act="os.system"), "head.json", "does not build a qwen3 draft"),
    ("draft_model", lambda h: h["config"].update(head_dim=10**9), "head.json",  # pruning indexes heads x head_dim rows
     "config.head_dim is 1000000000; accepted: an integer in \\[1, 4096\\]"),
    ("draft_model", lambda t: t.pop("body.embed_tokens.weight"), "head.safetensors", "missing \['body.embed_tokens.weight'\]"),
    ("draft_model", lambda t: t.update({"body.norm.weight": torch.ones(3)}), "head.safetensors", "unexpected"),
    ("draft_model", lambda t: t.update({"scorer.q_proj.weight": torch.ones(3, 3)}), "head.safetensors",
     "scorer.q_proj.weight has shape \(3, 3\)"),
    ("eagle3", lambda h: h["embedding"].update(weight="no.such.tensor"), "head.json", "embedding.weight is 'no.such.tensor'"),
    ("eagle3", lambda h: h["embedding"].update(scale="model.model.embed_tokens.weight"), "head.json", "embedding.scale"),
    ("eagle3", lambda h: h.update(aux_layers=[0, 1, 2]), "head.json", "aux_layers is \[0, 1, 2\]; accepted: options.json's"),
    ("eagle3", lambda h: h["config"].update(auto_map={}), "head.json", "config holds \['auto_map'\]"),
    ("eagle3", lambda h: h["config"].update(head_dim=15), "head.json", "config.head_dim is 15"),
    ("eagle3", lambda h: h["config"].update(rope_parameters={"rope_type": "no-such-rope", "rope_theta": 1.0}), "head.json",
     "rotary embedding"),
    ("eagle3", lambda t: t.update({"fc.weight": torch.ones(64, 5)}), "head.safetensors", "fc.weight has shape \(64, 5\)"),
    ("eagle3", lambda t: t.update({"midlayer.mlp.down_proj.weight": torch.ones(2)}), "head.safetensors", "unexpected"),
    ("eagle3", lambda t: t.pop("fc.weight"), "head.safetensors", "lack \['fc.weight'\]"),
])
def test_malformed_heads_with_weights_are_refused(head_artifacts, tmp_path, kind, edit, file, problem):
    path = copy_of(head_artifacts[kind], tmp_path)
    if file == "head.json":
        description = json.loads((path / file).read_text())
        edit(description)
        (path / file).write_text(json.dumps(description))
    else:
        edit_head_tensors(path, edit)
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match=problem) as info:
        specontext.load(path)
    assert info.value.file.endswith(file)


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


def test_unsupported_heads_are_refused_before_writing(tmp_path):
    from specontext_compiler.retrieval import TargetLayerHead

    draft = tiny_model("llama", seed=1)
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, draft=draft, progress=False)
    compiled.head.body.config._attn_implementation = "flash_attention_2"  # as a draft loaded with it would run
    with pytest.raises(ValueError, match="attn_implementation 'sdpa' or 'eager'; this draft runs 'flash_attention_2'"):
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
