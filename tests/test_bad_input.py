"""Bad input gets a clear error (naming the value and what is accepted) before any work starts.

One registry, ``CASES`` (the Python API) and ``CLI_CASES`` (the ``specontext`` command), drives the tests
and the table in docs/bad_input.md: ``test_the_docs_table_is_the_registry`` fails when they differ
(``python tests/test_bad_input.py`` prints the table to paste).
"""

from __future__ import annotations

import atexit
import inspect
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import specontext
from specontext_compiler.artifact import ArtifactError
from specontext.testing import tiny_model
from specontext_compiler.planning.known_models import load_config

DOCS = Path(__file__).parents[1] / "docs" / "bad_input.md"

_FAST: dict = {}


def fast():
    """A compiled tiny Llama with 64 positions (compiled once, on first use)."""
    if "model" not in _FAST:
        _FAST["model"] = specontext.compile(tiny_model("llama", max_position_embeddings=64), "1GB", progress=False)
    return _FAST["model"]


def compile_with(*args, **kwargs):
    return lambda: specontext.compile(tiny_model("llama"), *args, **kwargs)


TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def compile_under(environment: dict, *args, **kwargs):
    """``compile_with`` in a process whose torchrun variables are exactly ``environment`` (the others unset)."""
    import os

    def call():
        saved = {name: os.environ.pop(name) for name in TORCHRUN if name in os.environ}
        os.environ.update(environment)
        try:
            return compile_with(*args, **kwargs)()
        finally:
            for name in TORCHRUN:
                os.environ.pop(name, None)
            os.environ.update(saved)
    return call


def compile_in_a_group_of_one(tmp_path: Path):
    """``tensor_parallel=2`` where the caller initialized a process group of one process (gloo)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        return specontext.compile(tiny_model("llama"), "1GB", tensor_parallel=2)
    finally:
        dist.destroy_process_group()


def generate_with(input_ids, **kwargs):
    return lambda: fast().generate(input_ids, **kwargs)


def ids(*shape, low=3, high=96):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(0))


def batch_past_the_largest():
    """A budget with room for 2 x (20 + 10) tokens with every layer's KV on the GPU; ``generate`` at batch 3."""
    model = tiny_model("llama")
    probe = specontext.compile(model, "1GB", offload="none", progress=False)
    budget = probe.memory.model(30).peak(2, 30, 2, 30, prompt=20)
    compiled = specontext.compile(model, budget, offload="none", progress=False)
    return compiled.generate(ids(3, 20), max_new_tokens=10, min_new_tokens=10)


def with_token(token: int):
    prompt = ids(1, 5)
    prompt[0, 2] = token
    return prompt


def too_small_for_kv():
    model = tiny_model("llama")
    weights = sum(p.numel() * 4 for p in model.parameters())
    return specontext.compile(model, weights + 10_000, progress=False).generate(ids(4, 100), max_new_tokens=100)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return specontext.compile(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)), "1GB")


def bert():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16))
    return specontext.compile(model, "1GB")


def kernels_without_triton():
    """``use_kernels(True)`` as on a machine without Triton (tests/test_triton_optional.py hides it for real)."""
    from specontext_compiler import kernels

    saved = kernels.TRITON_AVAILABLE, kernels._triton_missing
    kernels.TRITON_AVAILABLE, kernels._triton_missing = False, "No module named 'triton'"
    try:
        kernels.use_kernels(True)
    finally:
        kernels.TRITON_AVAILABLE, kernels._triton_missing = saved


def load_on_cuda(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    compiled = specontext.compile(tiny_model("llama"), "1GB", progress=False)
    specontext.export(compiled, tmp_path / "artifact")
    return specontext.load(tmp_path / "artifact", device="cuda")


def draft_artifact() -> Path:
    """A tiny Llama compiled with a draft model's head, exported (once per process)."""
    if "artifact" not in _FAST:
        compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16,
                                      draft=tiny_model("qwen3", seed=1, num_hidden_layers=3), progress=False)
        folder = tempfile.mkdtemp(prefix="bad-input-")
        atexit.register(shutil.rmtree, folder, True)
        _FAST["artifact"] = specontext.export(compiled, Path(folder) / "draft")
    return _FAST["artifact"]


def edited_artifact(tmp_path: Path, file: str, edit) -> Path:
    """A copy of the draft artifact with ``edit`` applied to ``file`` (a JSON object, the safetensors' tensors or
    the step program's JSON) and the manifest made to match, as someone editing the files would."""
    from safetensors.torch import load_file, save_file

    from test_export import edit_program, rewrite_manifest

    path = Path(shutil.copytree(draft_artifact(), tmp_path / "artifact"))
    if file == "step.pt2":
        edit_program(path, edit)
        return path
    if file.endswith(".safetensors"):
        tensors = load_file(str(path / file))
        edit(tensors)
        save_file(tensors, str(path / file))
    else:
        value = json.loads((path / file).read_text())
        (path / file).write_text(json.dumps(edit(value) or value))
    rewrite_manifest(path)
    return path


def load_edited(file: str, edit):
    return lambda tmp_path: specontext.load(edited_artifact(tmp_path, file, edit))


def memory_plan_as_a_string(tmp_path: Path):
    from specontext_compiler.artifact import read_memory_plan

    return read_memory_plan(edited_artifact(tmp_path, "memory_plan.json", lambda plan: json.dumps(plan)))


# (what, the input as the docs show it, call, error class, message regex)
CASES = [
    ("budget", '`compile(model, "-1GB")`', compile_with("-1GB"), ValueError, r"budget must be positive; got '-1GB'"),
    ("budget", '`compile(model, "0")`', compile_with("0"), ValueError, r"budget must be positive; got '0'"),
    ("budget", "`compile(model, 0)`", compile_with(0), ValueError, r"budget must be positive; got 0"),
    ("budget", '`compile(model, "24XB")`', compile_with("24XB"), ValueError, r"budget '24XB' has unknown unit 'XB'; accepted units"),
    ("budget", '`compile(model, "abc")`', compile_with("abc"), ValueError, r"budget 'abc' is not understood; expected a positive number"),
    ("budget", '`compile(model, "")`', compile_with(""), ValueError, r"budget '' is not understood"),
    ("budget", '`compile(model, "5000TB")`', compile_with("5000TB"), ValueError, r"budget '5000TB' = 5000 TB is larger than any GPU"),
    ("budget", "`compile(model, None)`", compile_with(None), TypeError, r"budget must be a positive number of bytes .*; got None"),
    ("budget", "`compile(model, 2.5e10)`", compile_with(2.5e10), TypeError, r"budget must be .*; got 25000000000.0 of type float"),
    ("budget", '`compile(model, "1KB")` (smaller than the weights)', compile_with("1KB"), specontext.BudgetError,
     r"budget is too small: the model needs at least .* for its weights alone, plus its KV cache; budget is 1.0 KB"),
    ("budget", "a budget with room for the weights but not for 4 x 200 tokens of KV, at `generate`", too_small_for_kv,
     specontext.BudgetError, r"needs at least .* for batch 4 x 200 tokens with every layer offloaded.*budget is .*; it "
     r"admits no batch of a 100-token prompt growing to 200 tokens"),
    ("batch", "a batch past the largest the budget admits (2, every layer's KV on the GPU), at `generate`",
     batch_past_the_largest, specontext.BudgetError, r"needs at least .* for batch 3 x 30 tokens with 2 of 2 layers' KV on "
     r"the GPU.*; the largest batch it admits for a 20-token prompt growing to 30 tokens is 2"),
    ("batch", '`plan_memory(config, "24GB", 8192, batch="many")`',
     lambda: specontext.plan_memory(tiny_model("llama").config, "24GB", 8192, batch="many"), ValueError,
     r"batch must be a positive int or 'max'; got 'many'"),
    ("token_budget", "`token_budget=0`", compile_with("1GB", token_budget=0), ValueError, r"token_budget must be None \(dense attention\), a positive int"),
    ("token_budget", "`token_budget=-1`", compile_with("1GB", token_budget=-1), ValueError, r"token_budget must be .*; got -1"),
    ("token_budget", "`token_budget=1.5`", compile_with("1GB", token_budget=1.5), ValueError, r"token_budget must be .*; got the float 1.5"),
    ("token_budget", '`token_budget=float("nan")`', compile_with("1GB", token_budget=float("nan")), ValueError, r"got the float nan"),
    ("token_budget", '`token_budget="64"`', compile_with("1GB", token_budget="64"), TypeError, r"token_budget must be .*; got '64' of type str"),
    ("token_budget", "`token_budget=True`", compile_with("1GB", token_budget=True), TypeError, r"got True of type bool"),
    ("sink_tokens", "`sink_tokens=-1`", compile_with("1GB", sink_tokens=-1), ValueError, r"sink_tokens must be a non-negative int; got -1"),
    ("sink_tokens", "`sink_tokens=2.5`", compile_with("1GB", sink_tokens=2.5), ValueError, r"sink_tokens must be a non-negative int; got 2.5"),
    ("local_window", "`local_window=-8`", compile_with("1GB", local_window=-8), ValueError, r"local_window must be a non-negative int; got -8"),
    ("local_window", '`local_window="64"`', compile_with("1GB", local_window="64"), ValueError, r"local_window must be a non-negative int; got '64'"),
    ("host_budget", '`host_budget="plenty"`', compile_with("1GB", host_budget="plenty"), ValueError,
     r"host_budget: budget 'plenty' is not understood; expected a positive number of bytes"),
    ("sticky_margin", "`sticky_margin=-0.1`", compile_with("1GB", sticky_margin=-0.1), ValueError,
     r"sticky_margin must be a finite float >= 0.0 in the retrieval scores' units \(0.0: off\); got -0.1"),
    ("sticky_margin", '`sticky_margin=float("nan")`', compile_with("1GB", sticky_margin=float("nan")), ValueError,
     r"sticky_margin must be a finite float >= 0.0 .*; got nan"),
    ("sticky_margin", "`sticky_margin=1` (an int)", compile_with("1GB", sticky_margin=1), TypeError,
     r"sticky_margin must be a finite float >= 0.0 .*; got 1 of type int"),
    ("sticky_margin", '`sticky_margin="0.1"`', compile_with("1GB", sticky_margin="0.1"), TypeError,
     r"sticky_margin must be a finite float >= 0.0 .*; got '0.1' of type str"),
    ("prefill_chunk", "`prefill_chunk=0`", compile_with("1GB", prefill_chunk=0), ValueError, r"prefill_chunk must be an int of at least 16 tokens .*; got 0"),
    ("prefill_chunk", "`prefill_chunk=8`", compile_with("1GB", prefill_chunk=8), ValueError, r"prefill_chunk must be an int of at least 16 tokens \(a prefill step's tokens over the batch, at least 16 per row\); got 8"),
    ("offload", '`offload="some"`', compile_with("1GB", offload="some"), ValueError, r"offload='some' is not one of 'auto', 'none', 'all'"),
    ("offload", "`offload=[7]` (2 layers)", compile_with("1GB", offload=[7]), ValueError, r"offload lists layers \[7\]; the model has layers 0..1"),
    ("option", "`compile(model, budget, windw=4)`", compile_with("1GB", windw=4), TypeError, r"unknown option\(s\) \['windw'\] for specontext.compile; accepted:"),
    ("option", '`compile_decode_step="yes"`', compile_with("1GB", compile_decode_step="yes"), TypeError, r"compile_decode_step must be True, False or None \(None: on CUDA\); got 'yes'"),
    ("option", '`cuda_graph="yes"`', compile_with("1GB", cuda_graph="yes"), TypeError, r"cuda_graph must be True, False or None \(None: on CUDA\); got 'yes'"),
    ("option", "`cuda_graph=True` on the CPU", compile_with("1GB", cuda_graph=True), ValueError, r"cuda_graph=True needs a CUDA device; the model runs on cpu"),
    ("tensor_parallel", '`tensor_parallel="2"`', compile_with("1GB", tensor_parallel="2"), TypeError,
     r"tensor_parallel must be an int >= 1 \(1: one process; N > 1: N processes, e.g. torchrun --nproc-per-node N\); got '2' of type str"),
    ("tensor_parallel", "`tensor_parallel=True`", compile_with("1GB", tensor_parallel=True), TypeError, r"tensor_parallel must be an int >= 1 .*; got True of type bool"),
    ("tensor_parallel", "`tensor_parallel=0`", compile_with("1GB", tensor_parallel=0), ValueError, r"tensor_parallel must be an int >= 1 .*; got 0"),
    ("tensor_parallel", "`tensor_parallel=3` (4 attention heads)", compile_with("1GB", tensor_parallel=3), ValueError,
     r"tensor_parallel=3 does not divide the model's 4 attention heads \(num_attention_heads\): .*accepted for this model: \[1, 2\]"),
    ("tensor_parallel", "`tensor_parallel=2` (1 KV head)",
     lambda: specontext.compile(tiny_model("llama", num_key_value_heads=1), "1GB", tensor_parallel=2), ValueError,
     r"tensor_parallel=2 does not divide the model's 1 KV heads \(num_key_value_heads\): .*accepted for this model: \[1\]"),
    ("tensor_parallel", "`tensor_parallel=2` with a draft model", compile_with("1GB", tensor_parallel=2, draft=tiny_model("llama", seed=1)),
     ValueError, r"tensor_parallel=2 works with the head derived from the target \(draft=None\) or a baseline"),
    ("tensor_parallel", "`tensor_parallel=2` in one process (no process group, no torchrun environment)", compile_under({}, "1GB", tensor_parallel=2),
     ValueError, r"tensor_parallel=2 needs 2 processes, one per GPU, .*no process group and no torchrun environment .*torchrun --nproc-per-node 2"),
    ("tensor_parallel", "`tensor_parallel=2` under `torchrun --nproc-per-node 4`",
     compile_under({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                   "1GB", tensor_parallel=2),
     ValueError, r"tensor_parallel=2 but torchrun started WORLD_SIZE=4 processes; accepted: tensor_parallel=4"),
    ("tensor_parallel", "`tensor_parallel=2` in a process group of 1 process", compile_in_a_group_of_one, ValueError,
     r"tensor_parallel=2 but the process group has 1 processes; accepted: tensor_parallel=1"),
    ("tensor_parallel", "`plan_memory(llama-3.1-8b config, ..., tensor_parallel=3)` (32 heads)",
     lambda: specontext.plan_memory(load_config("llama-3.1-8b"), "24GB", 4096, tensor_parallel=3), ValueError,
     r"tensor_parallel=3 does not divide the model's 32 attention heads"),
    ("model", "`compile(torch.nn.Linear(2, 2), budget)`", lambda: specontext.compile(torch.nn.Linear(2, 2), "1GB"), TypeError,
     r"needs a Hugging Face causal LM \(a transformers PreTrainedModel\), got Linear; supported families: Llama"),
    ("model", '`compile("llama", budget)`', lambda: specontext.compile("llama", "1GB"), TypeError, r"needs a Hugging Face causal LM .*got str; supported families"),
    ("model", "a GPT-2 `GPT2LMHeadModel` (a causal LM of another family)", gpt2, TypeError, r"unsupported model GPT2LMHeadModel .*Llama"),
    ("model", "a `BertModel` (not a causal LM)", bert, TypeError, r"unsupported model BertModel \(model_type='bert'\); supported causal LM families: Llama"),
    ("prompt", "65 tokens for a model of 64 positions", generate_with(ids(1, 65), max_new_tokens=1), ValueError,
     r"prompt of 65 tokens is longer than the model's max_position_embeddings \(64\); accepted: at most 64 tokens"),
    ("prompt", "token id -1", generate_with(with_token(-1), max_new_tokens=1), ValueError, r"token id -1 is outside the vocabulary; accepted ids are 0..95"),
    ("prompt", "token id 96 (vocabulary of 96)", generate_with(with_token(96), max_new_tokens=1), ValueError, r"token id 96 is outside the vocabulary; accepted ids are 0..95"),
    ("prompt", "an empty prompt, shape (1, 0)", generate_with(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1), ValueError,
     r"empty prompt: input_ids has shape \(1, 0\); give at least one token per row"),
    ("prompt", "a row that is all padding", generate_with(ids(1, 3), attention_mask=torch.zeros(1, 3, dtype=torch.long)), ValueError,
     r"empty prompt: a row of attention_mask has no token \(all padding\)"),
    ("prompt", "a list instead of a tensor", generate_with([[1, 2, 3]]), TypeError, r"input_ids must be a torch.LongTensor of shape \[batch, tokens\]; got list"),
    ("prompt", "float token ids", generate_with(torch.ones(1, 3)), TypeError, r"input_ids must hold integer token ids; got dtype torch.float32"),
    ("prompt", "a 1-D tensor", generate_with(torch.ones(3, dtype=torch.long)), ValueError, r"input_ids must have shape \[batch, tokens\]; got shape \(3,\)"),
    ("attention_mask", "shape (1, 4) for input_ids (1, 5)", generate_with(ids(1, 5), attention_mask=torch.ones(1, 4, dtype=torch.long)), ValueError,
     r"attention_mask shape \(1, 4\) does not match input_ids shape \(1, 5\)"),
    ("attention_mask", "a value 2", generate_with(ids(1, 3), attention_mask=torch.tensor([[1, 2, 1]])), ValueError,
     r"attention_mask holds 2; accepted values are 0 \(padding\) and 1 \(token\)"),
    ("generate", "`max_new_tokens=-1`", generate_with(ids(1, 3), max_new_tokens=-1), ValueError, r"`max_new_tokens` must be greater than 0, but is -1"),
    ("generate", "`num_beams=4`", generate_with(ids(1, 3), max_new_tokens=2, num_beams=4), ValueError, r"num_beams=4 is not supported"),
    ("generate", "an unknown keyword argument", generate_with(ids(1, 3), max_new_tokens=2, not_an_option=1), TypeError,
     r"unknown keyword argument\(s\) \['not_an_option'\]; accepted: GenerationConfig's fields and streamer"),
    ("generate", '`stop_strings="stop"` without `tokenizer=`', generate_with(ids(1, 3), max_new_tokens=2, stop_strings="stop"),
     ValueError, r"could not locate a tokenizer. When generating with stop strings, you must pass the model's tokenizer"),
    ("generate", "`stop_strings=5`", generate_with(ids(1, 3), max_new_tokens=2, stop_strings=5), TypeError,
     r"stop_strings must be a non-empty str or a non-empty list of non-empty str; got 5"),
    ("generate", '`logits_processor="ban"`', generate_with(ids(1, 3), max_new_tokens=2, logits_processor="ban"), TypeError,
     r"logits_processor must be a transformers LogitsProcessorList \(or a list of callables\); got str"),
    ("generate", "`stopping_criteria=[1]`", generate_with(ids(1, 3), max_new_tokens=2, stopping_criteria=[1]), TypeError,
     r"stopping_criteria must hold callables \(transformers StoppingCriteria objects\); got an item of type int"),
    ("device", '`specontext.load(path, device="cuda")` on a machine without CUDA', load_on_cuda, ValueError,
     r"device='cuda' but this machine has no CUDA device; accepted: 'cpu'"),
    ("artifact", "`step.pt2` holding the guard `L['input_ids'].size()[1] == 10**10**10`",
     load_edited("step.pt2", lambda p: p["guards_code"].append("L['input_ids'].size()[1] == 10**10**10")), ArtifactError,
     r"step.pt2: guard .*10\*\*10\*\*10.* is refused: powers are not accepted in a guard \(accepted: comparisons"),
    ("artifact", "`step.pt2` holding a guard with the integer 2**64 + 1",
     load_edited("step.pt2", lambda p: p["guards_code"].append(f"L['input_ids'].size()[1] != {2**64 + 1}")), ArtifactError,
     r"step.pt2: guard .* is refused: the integer 18446744073709551617 is beyond the accepted magnitude of 2\*\*63"),
    ("artifact", "`head.json` of a draft model whose config names code (`auto_map`)",
     load_edited("head.json", lambda h: h["config"].update(auto_map={"AutoModelForCausalLM": "evil.Model"})), ArtifactError,
     r"head.json: config holds \['auto_map'\], not fields of a qwen3 config .*accepted: the fields of transformers' qwen3 config"),
    ("artifact", "`head.json` of a draft model of `model_type` gpt2",
     load_edited("head.json", lambda h: h["config"].update(model_type="gpt2")), ArtifactError,
     r"head.json: config.model_type is 'gpt2'; accepted: llama, qwen2"),
    ("artifact", "`head.safetensors` of a draft model lacking a tensor",
     load_edited("head.safetensors", lambda t: t.pop("body.embed_tokens.weight")), ArtifactError,
     r"head.safetensors: the draft head's tensors do not match its description: missing \['body.embed_tokens.weight'\]"),
    ("artifact", "`memory_plan.json` holding a JSON string in a format-3 artifact, at `read_memory_plan`",
     memory_plan_as_a_string, ArtifactError, r"memory_plan.json: holds a JSON str; accepted: an object \(format 3\)"),
    ("kernels", "`kernels.use_kernels(True)` where Triton is not installed", kernels_without_triton, ImportError,
     r"use_kernels\(True\) needs Triton, which is not available .*; install it: pip install triton"),
]

# (what, the command's arguments after `specontext generate --model M --prompt-file F`, message regex)
CLI_CASES = [
    ("budget", "`--budget 24XB`", ["--budget", "24XB"], r"error: budget '24XB' has unknown unit 'XB'"),
    ("budget", "`--budget 0`", ["--budget", "0"], r"error: budget must be positive; got '0'"),
    ("token budget", "`--token-budget 0`", ["--token-budget", "0"], r"error: token_budget must be .*; got 0"),
    ("offload", "`--offload 1,x`", ["--offload", "1,x"], r"error: --offload '1,x': accepted are auto, none, all, or comma-separated layer indices"),
    ("max new tokens", "`--max-new-tokens 0`", ["--max-new-tokens", "0"], r"error: --max-new-tokens must be a positive number of tokens; got 0"),
    ("device", "`--device cuda` on a machine without CUDA", ["--device", "cuda"], r"error: --device 'cuda' but this machine has no CUDA device; accepted: cpu"),
    ("device", "`--device tpu`", ["--device", "tpu"], r"error: --device 'tpu': accepted are cpu, cuda, cuda:N"),
    ("prompt file", "a prompt file that does not exist", ["--prompt-file", "missing.txt"], r"error: prompt file '.*missing.txt' does not exist"),
    ("prompt file", "an empty prompt file", ["--prompt-file", "EMPTY"], r"error: prompt file '.*empty.txt' is empty"),
    ("model", "a model path that does not exist", ["--model", "no/such/model"], r"error: model path 'no/such/model' does not exist"),
    ("prompt", "`--prompt TEXT` beside `--prompt-file F`", ["--prompt", "hello"], r"error: argument --prompt: not allowed with argument --prompt-file"),
    ("sampling", "`--temperature 0.7` without `--do-sample`", ["--temperature", "0.7"], r"error: --temperature applies only to sampling; add --do-sample"),
    ("sampling", "`--do-sample --temperature 0`", ["--do-sample", None, "--temperature", "0"], r"error: --temperature must be a positive number; got 0.0"),
    ("sampling", "`--do-sample --top-p 1.5`", ["--do-sample", None, "--top-p", "1.5"], r"error: --top-p must be in \(0, 1\]; got 1.5"),
    ("sampling", "`--do-sample --seed -1`", ["--do-sample", None, "--seed", "-1"], r"error: --seed must be an int in 0..2\*\*64-1; got -1"),
    ("tensor parallel", "`--tensor-parallel 0`", ["--tensor-parallel", "0"], r"error: argument --tensor-parallel: must be a positive int; got 0"),
    ("tensor parallel", "`--tensor-parallel 2` without torchrun", ["--tensor-parallel", "2"],
     r"error: tensor_parallel=2 needs 2 processes, one per GPU, .*torchrun --nproc-per-node 2"),
    ("cuda graph", "`--cuda-graph --device cpu`", ["--cuda-graph", None, "--device", "cpu"], r"error: --cuda-graph needs a CUDA device; --device is cpu"),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`` {_cell(text)} ``" if "`" in text else f"`{_cell(text)}`"


def table() -> str:
    rows = ["| input | value | error | message (regex the test matches) |", "|---|---|---|---|"]
    rows += [f"| {what} | {_cell(shown)} | `{error.__name__}` | {_code(message)} |" for what, shown, _, error, message in CASES]
    rows += ["", "| `specontext generate` input | value | message on stderr, exit code 2 (regex) |", "|---|---|---|"]
    rows += [f"| {what} | {_cell(shown)} | {_code(message)} |" for what, shown, _, message in CLI_CASES]
    return "\n".join(rows)


@pytest.mark.parametrize("what, shown, call, error, message", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_refused_with_a_clear_error(what, shown, call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path) if inspect.signature(call).parameters else call()


@pytest.mark.parametrize("what, shown, arguments, message", CLI_CASES, ids=[f"{c[0]}: {c[1]}" for c in CLI_CASES])
def test_bad_command_line_is_one_line_before_the_model_loads(what, shown, arguments, message, tmp_path, monkeypatch, capsys):
    from specontext_compiler import models
    from specontext_compiler.cli import main

    if "cuda" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    (tmp_path / "empty.txt").write_text("  \n")
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(a) or pytest.fail("the model loaded"))
    arguments = [str(tmp_path / "missing.txt") if a == "missing.txt" else str(tmp_path / "empty.txt") if a == "EMPTY" else a
                 for a in arguments]
    command = ["generate", "--model", str(tmp_path), "--prompt-file", str(prompt)]
    for flag, value in zip(arguments[::2], arguments[1::2]):  # the case's flags replace the defaults'
        if value is None:  # a flag without a value
            command.append(flag)
        elif flag in command:
            command[command.index(flag) + 1] = value
        else:
            command += [flag, value]
    try:
        code = main(command)
    except SystemExit as exit_:  # argparse's own errors (a conflict of options) exit, one line on stderr too
        code = exit_.code
    message_out = capsys.readouterr().err
    assert code == 2 and not loaded
    assert re.search(message, message_out), message_out
    assert len(message_out.strip().splitlines()) == 1  # one line, no traceback


def test_the_docs_table_is_the_registry():
    text = DOCS.read_text()
    assert table() in text, "docs/bad_input.md is out of date: paste the output of `python tests/test_bad_input.py`"


if __name__ == "__main__":
    print(table())
