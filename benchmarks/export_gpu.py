"""Export / load on the GPU, and across torch versions:

    python -m benchmarks.export_gpu --make-cpu-artifact build/export_cpu   # here (CPU)
    python -m benchmarks.export_gpu --cpu-artifact build/export_cpu --out export_h100

1. ``--make-cpu-artifact DIR``: on this machine (CPU), compile a tiny random Llama (float32, token budget
   16, a 4-token local window, every layer offloaded), export it to DIR/artifact and write DIR/reference.json: the inputs and the
   tokens the CPU produced, with the torch version that exported it.
2. On the GPU machine: load that artifact on CUDA (exported by another torch: the cross-version case)
   and generate; against the same model compiled there from scratch on CUDA, and against the CPU's
   tokens. If loading fails, the error (the manifest check's or torch.export.load's) is recorded.
3. GPU round trips: tiny Llama / Qwen3 / Gemma 2 (float32) and Llama (bf16) compiled on CUDA with a
   16-token budget and every layer offloaded, exported, loaded, generated: tokens compared.

Writes JSON under benchmarks/results/ (and $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
from pathlib import Path

import torch

GENERATE = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)


def _inputs():
    from specontext.testing import padded_batch

    return padded_batch(96, [48, 31], seed=5)


def make_cpu_artifact(folder: Path) -> None:
    import specontext
    from specontext.testing import tiny_model

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, offload="all", local_window=4,
                                progress=False)
    ids, mask = _inputs()
    tokens = compiled.generate(ids, attention_mask=mask, **GENERATE)
    specontext.export(compiled, folder / "artifact")
    (folder / "reference.json").write_text(json.dumps({
        "torch": torch.__version__, "date": datetime.date.today().isoformat(), "tokens": tokens.tolist()}))
    print(f"exported with torch {torch.__version__} to {folder / 'artifact'}")


def cross_version(folder: Path) -> dict:
    import specontext
    from specontext.testing import tiny_model

    reference = json.loads((folder / "reference.json").read_text())
    ids, mask = (t.cuda() for t in _inputs())
    row = {"exported_with_torch": reference["torch"], "loaded_with_torch": torch.__version__}
    try:
        loaded = specontext.load(folder / "artifact", device="cuda")
    except ValueError as error:
        row.update(loaded=False, error=f"{type(error).__name__}: {error}")
        print(f"cross-version load failed: {row['error']}", flush=True)
        return row
    got = loaded.generate(ids, attention_mask=mask, **GENERATE).cpu()
    fresh = specontext.compile(tiny_model("llama").cuda(), "1GB", token_budget=16, offload="all", local_window=4,
                                progress=False)
    expected = fresh.generate(ids, attention_mask=mask, **GENERATE).cpu()
    row.update(loaded=True, identical_to_fresh_cuda_compile=bool(torch.equal(got, expected)),
               identical_to_cpu_tokens=got.tolist() == reference["tokens"], sparse_steps=loaded.stats["attended_tokens_per_step"] <= 17,
               h2d_bytes=loaded.stats["h2d_bytes"])
    print(f"cross-version: exported with torch {reference['torch']} (CPU), loaded with torch {torch.__version__} on CUDA: "
          f"tokens identical to a fresh CUDA compile {row['identical_to_fresh_cuda_compile']}, to the CPU's "
          f"{row['identical_to_cpu_tokens']}; h2d bytes {row['h2d_bytes']}", flush=True)
    return row


def gpu_round_trips() -> list[dict]:
    import specontext
    from specontext.testing import tiny_model

    rows = []
    ids, mask = (t.cuda() for t in _inputs())
    for family, dtype in [("llama", torch.float32), ("qwen3", torch.float32), ("gemma2", torch.float32),
                          ("llama", torch.bfloat16)]:
        compiled = specontext.compile(tiny_model(family).to("cuda", dtype), "1GB", token_budget=16, offload="all",
                                      local_window=4, progress=False)
        expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
        folder = Path(tempfile.mkdtemp()) / "artifact"
        specontext.export(compiled, folder)
        loaded = specontext.load(folder)
        got = loaded.generate(ids, attention_mask=mask, **GENERATE)
        rows.append({"family": family, "dtype": str(dtype), "identical_tokens": bool(torch.equal(got, expected)),
                     "device": str(loaded.device), "h2d_bytes": loaded.stats["h2d_bytes"],
                     "artifact_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())})
        print(f"round trip {family} {dtype} on {loaded.device}: identical tokens {rows[-1]['identical_tokens']} "
              f"(h2d bytes {rows[-1]['h2d_bytes']}, artifact {rows[-1]['artifact_bytes'] / 1e6:.2f} MB)", flush=True)
        shutil.rmtree(folder.parent)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-cpu-artifact", type=Path)
    parser.add_argument("--cpu-artifact", type=Path)
    parser.add_argument("--out", default="export_gpu")
    args = parser.parse_args()
    if args.make_cpu_artifact:
        make_cpu_artifact(args.make_cpu_artifact)
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/export_gpu.py needs a CUDA GPU (or --make-cpu-artifact)")
    from benchmarks.results_file import write_results

    payload = {"command": "python -m benchmarks.export_gpu --cpu-artifact build/export_cpu",
               "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.cpu_artifact:
        payload["cross_version"] = cross_version(args.cpu_artifact)
    payload["round_trips"] = gpu_round_trips()
    write_results(payload, args.out)


if __name__ == "__main__":
    main()
