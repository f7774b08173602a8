#!/usr/bin/env python3
"""Check a converted GGUF LoRA (bench/peft_to_gguf_lora.py) against openlora on the PEFT original.

For each adapter and prompt, greedy (temperature 0) chat completions of up to --max-tokens tokens
from
  - openlora:  `openlora generate --chat --prompt P --adapter NAME --adapters-dir DIR --threads T`
               (the PEFT folder; the model's own chat template, i.e. with its default system message);
  - llama.cpp: llama-cpp-python `Llama(model_path=GGUF, lora_path=NAME.gguf)`, the same chat
               template rendered by openlora's rules (the GGUF's Jinja template, default system
               message) fed as a raw prompt to `create_completion(temperature=0)`;
  - and the base model on both sides, to show each adapter changes the output.
Reports, per pair, whether the texts are identical and else the first differing character. The
two engines do not compute identically (llama.cpp quantizes activations to 8 bits for Q4_1 dot
products; openlora keeps them in f32), so a late divergence after a near-tie is expected; an early
one on every prompt means the conversion is wrong (e.g. a missing Q/K permutation).

With --ref-python PY (a python with torch, transformers and peft, e.g. `<cache>/venv-ref`) it also
compares logits, teacher-forced on one chat prompt plus answer (71 tokens): llama.cpp's logits for
every position (`logits_all`) against HF transformers + PEFT in f32 on the dequantized HF folder
(`--hf-dir`, default `<cache>/smollm2-hf`). It reports the correlation of the LoRA's effect
(adapter logits minus base logits) between the two, which is what a wrong Q/K permutation spoils
(text alone cannot tell when the adapter's effect is smaller than the engines' own difference).

Run with the llama-cpp-python venv's python (it needs only llama_cpp):

    ~/.cache/openlora/venv-llamacpp/bin/python bench/check_gguf_lora.py \
        --adapter examples/adapters/pirate=/tmp/pirate.gguf \
        --adapter ~/.cache/openlora/bench-adapters/synth8/synth00=~/.cache/openlora/bench-adapters/synth8-gguf/synth00.gguf \
        [--openlora target/release/openlora] [--max-tokens 40] [--threads 2] [--out FILE] \
        [--ref-python ~/.cache/openlora/venv-ref/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "Give me three tips for staying healthy.",
    "Write a haiku about the ocean.",
    "Explain what a compiler does in two sentences.",
    "What is the boiling point of water?",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def cache_dir() -> Path:
    if os.environ.get("OPENLORA_CACHE"):
        return Path(os.environ["OPENLORA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "openlora"


def chatml(question: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def openlora_generate(binary: str, prompt: str, adapter: Path | None, max_tokens: int, threads: int,
                      model: Path) -> str:
    cmd = [binary, "generate", "--chat", "--prompt", prompt, "--max-tokens", str(max_tokens),
           "--threads", str(threads), "--model", str(model)]
    if adapter is not None:
        cmd += ["--adapter", adapter.name, "--adapters-dir", str(adapter.parent)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"openlora failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p.stdout.rstrip("\n")


def ref_logits_main(argv: list[str]) -> int:
    """Run under --ref-python: PEFT logits for the token ids in the npz, base and each adapter."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    npz, hf_dir, out = argv[0], argv[1], argv[2]
    adapters = argv[3:]
    torch.set_num_threads(2)
    ids = torch.tensor([np.load(npz)["tokens"].tolist()])
    res = {}
    with torch.no_grad():
        res["base"] = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(ids).logits[0].numpy()
        for i, d in enumerate(adapters):
            base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
            res[f"a{i}"] = PeftModel.from_pretrained(base, d).eval()(ids).logits[0].numpy()
    np.savez(out, **res)
    return 0


def logit_check(a, cases, llama_cpp) -> list[dict]:
    import tempfile

    import numpy as np

    text = chatml(PROMPTS[0]) + ("1. Stay hydrated: Drink plenty of water, especially during the heat. "
                                 "2. Eat a balanced diet: A balanced diet can help your body stay healthy.")
    ll = {}
    toks = None
    for i, (name, _peft, gguf) in enumerate(cases):
        llm = llama_cpp.Llama(model_path=str(a.model), lora_path=gguf, logits_all=True, n_ctx=256,
                              n_threads=a.threads, verbose=False)
        toks = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.eval(toks)
        ll["base" if gguf is None else f"a{i - 1}"] = np.array(llm.scores[: len(toks)])
        llm.close()
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/in.npz", tokens=np.array(toks))
        cmd = [a.ref_python, __file__, "--_ref-mode", f"{tmp}/in.npz", str(a.hf_dir), f"{tmp}/out.npz",
               *[str(p) for _n, p, g in cases if g is not None]]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"reference failed: {p.stderr[-1500:]}")
        ref = dict(np.load(f"{tmp}/out.npz"))

    def corr(x, y):
        return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])

    def rel(x, y):
        return float(np.sqrt(((x - y) ** 2).mean() / (y ** 2).mean()))

    rows = [{"adapter": "base", "tokens": len(toks), "logits_corr": corr(ll["base"], ref["base"]),
             "logits_rel_rms_err": rel(ll["base"], ref["base"]),
             "argmax_agree": float((ll["base"].argmax(-1) == ref["base"].argmax(-1)).mean())}]
    for i, (name, _p, g) in enumerate(c for c in cases if c[2] is not None):
        k = f"a{i}"
        d_ll, d_ref = ll[k] - ll["base"], ref[k] - ref["base"]
        rows.append({"adapter": name, "tokens": len(toks), "logits_corr": corr(ll[k], ref[k]),
                     "logits_rel_rms_err": rel(ll[k], ref[k]),
                     "argmax_agree": float((ll[k].argmax(-1) == ref[k].argmax(-1)).mean()),
                     "lora_effect_rms_vs_base_logits": float(np.sqrt((d_ref ** 2).mean() / (ref["base"] ** 2).mean())),
                     "lora_effect_corr": corr(d_ll, d_ref), "lora_effect_rel_rms_err": rel(d_ll, d_ref)})
    return rows


def first_diff(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", action="append", required=True, metavar="PEFT_DIR=GGUF",
                    help="a PEFT adapter folder and its converted GGUF (repeatable)")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--openlora", default=None, help="openlora binary (default target/release, else target/debug)")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", action="append", help="chat question (repeatable; default: 4 built-in)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ref-python", help="python with torch+transformers+peft: also compare logits with PEFT")
    ap.add_argument("--hf-dir", type=Path, default=cache_dir() / "smollm2-hf",
                    help="the dequantized HF folder of the base model (for --ref-python)")
    a = ap.parse_args()

    import llama_cpp

    repo = Path(__file__).resolve().parent.parent
    binary = a.openlora
    if binary is None:
        for cand in (repo / "target/release/openlora", repo / "target/debug/openlora"):
            if cand.exists():
                binary = str(cand)
                break
        else:
            sys.exit("no openlora binary under target/; pass --openlora")
    prompts = a.prompt or PROMPTS

    def llama_run(lora: str | None) -> list[str]:
        llm = llama_cpp.Llama(model_path=str(a.model), lora_path=lora, n_ctx=512, n_threads=a.threads,
                              n_threads_batch=a.threads, verbose=False, seed=0)
        outs = []
        for q in prompts:
            r = llm.create_completion(chatml(q), max_tokens=a.max_tokens, temperature=0.0)
            outs.append(r["choices"][0]["text"])
        llm.close()
        return outs

    cases = [("base", None, None)]
    for spec in a.adapter:
        peft_dir, gguf = spec.split("=", 1)
        cases.append((Path(peft_dir).name, Path(os.path.expanduser(peft_dir)).resolve(),
                      os.path.expanduser(gguf)))

    results = []
    base_texts = None
    for name, peft_dir, gguf in cases:
        ll = llama_run(gguf)
        for i, q in enumerate(prompts):
            ol = openlora_generate(binary, q, peft_dir, a.max_tokens, a.threads, a.model)
            d = first_diff(ol.strip(), ll[i].strip())
            row = {"adapter": name, "prompt": q, "identical": d is None, "first_diff_char": d,
                   "openlora": ol, "llamacpp": ll[i]}
            if base_texts is not None:
                row["llamacpp_differs_from_base"] = ll[i] != base_texts[i]
            results.append(row)
            tag = "SAME" if d is None else f"diverge@{d}"
            print(f"[{name}] {q!r}: {tag}\n  openlora : {ol!r}\n  llama.cpp: {ll[i]!r}")
        if name == "base":
            base_texts = ll
    logits = None
    if a.ref_python:
        logits = logit_check(a, cases, llama_cpp)
        for r in logits:
            print(json.dumps(r))
    summary = {"openlora": binary, "model": str(a.model), "max_tokens": a.max_tokens,
               "identical": sum(r["identical"] for r in results), "total": len(results), "results": results,
               "logits": logits}
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("results", "logits")}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_ref-mode":
        sys.exit(ref_logits_main(sys.argv[2:]))
    sys.exit(main())
