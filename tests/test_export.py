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
from tiny_models import padded_batch, tiny_model

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


def test_tokenizer_travels_with_the_artifact(smollm2, tmp_path):
    _, tokenizer = smollm2
    model = tiny_model("llama", vocab_size=len(tokenizer))
    compiled = specontext.compile(model, "1GB", token_budget=16, progress=False)
    path = specontext.export(compiled, tmp_path / "with-tokenizer", tokenizer=tokenizer)
    loaded = specontext.load(path)
    text = "The orchard by the river"
    assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


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


class Planted:
    """A pickle that, when unpickled, creates a marker file (stands for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def replace_entry(archive: Path, suffix: str, data: bytes) -> None:
    source = zipfile.ZipFile(archive)
    entries = [(info, source.read(info)) for info in source.infolist()]
    source.close()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as target:
        for info, content in entries:
            target.writestr(info, data if info.filename.endswith(suffix) else content)


def test_planted_pickle_in_sample_inputs_does_not_run(exported, tmp_path):
    """torch.export.load unpickles an archive's sample inputs (falling back to weights_only=False): shown
    here on a throwaway copy, then the same artifact through specontext.load, which refuses it unread."""
    path = copy_of(exported[0], tmp_path)
    marker = tmp_path / "pwned"
    replace_entry(path / "step.pt2", "data/sample_inputs/model.pt", pickle.dumps(Planted(marker)))
    rewrite_manifest(path)

    demo = tmp_path / "demo.pt2"
    demo.write_bytes((path / "step.pt2").read_bytes())
    try:
        torch.export.load(demo)
    except Exception:
        pass
    assert marker.exists()  # the threat is real: plain torch.export.load ran the planted pickle
    marker.unlink()

    with pytest.raises(ArtifactError, match="pickled sample inputs"):
        specontext.load(path)
    assert not marker.exists()


def test_weights_flagged_as_pickles_are_refused(exported, tmp_path):
    path = copy_of(exported[0], tmp_path)
    archive = zipfile.ZipFile(path / "step.pt2")
    name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
    config = json.loads(archive.read(name))
    archive.close()
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    replace_entry(path / "step.pt2", "model_weights_config.json", json.dumps(config).encode())
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match="pickle"):
        check_program_archive(path / "step.pt2")
    with pytest.raises(ArtifactError, match="pickle"):
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


def test_draft_heads_are_refused_before_writing(tmp_path):
    draft = tiny_model("llama", seed=1)
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, draft=draft, progress=False)
    with pytest.raises(ValueError, match="DraftModelHead"):
        specontext.export(compiled, tmp_path / "draft")
    assert not (tmp_path / "draft").exists()
