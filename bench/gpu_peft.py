#!/usr/bin/env python3
"""HF transformers + PEFT on a GPU: mixed-adapter batch generation, the peer for the CUDA
backend's end-to-end figure (kernels/gpu-check.sh runs it).

Loads the base model from the same GGUF openlora serves (transformers dequantizes it; needs the
`gguf` package), loads N PEFT adapters from --adapters-dir (made by `openlora adapters synth`),
and generates --max-tokens greedy tokens for --batch prompts at once, row i using adapter
i % N through PEFT's mixed-batch `adapter_names` argument, --repeat times. Prints one JSON line:
generated tokens per second of the best repeat.

    python3 bench/gpu_peft.py --gguf MODEL.gguf --adapters-dir DIR [--adapters 100] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--adapters-dir", required=True)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--base-only", action="store_true", help="no adapters (the base model alone)")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.bfloat16).to("cuda").eval()
    names = sorted(os.listdir(a.adapters_dir))[: a.adapters]
    if not a.base_only:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.join(a.adapters_dir, names[0]), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(os.path.join(a.adapters_dir, n), adapter_name=n)
        model.eval()
    prompts = [f"Write one sentence about the number {i}." for i in range(a.batch)]
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(chats, return_tensors="pt", padding=True).to("cuda")
    kwargs = dict(max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if not a.base_only:
        kwargs["adapter_names"] = [names[i % len(names)] for i in range(a.batch)]
    best = None
    with torch.no_grad():
        model.generate(**enc, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        for _ in range(a.repeat):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(**enc, **kwargs)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            gen = (out.shape[1] - enc["input_ids"].shape[1]) * a.batch
            tps = gen / dt
            best = tps if best is None else max(best, tps)
    print(json.dumps({"engine": "hf+peft (cuda, bf16)", "adapters": 0 if a.base_only else len(names), "batch": a.batch,
                      "max_tokens": a.max_tokens, "tokens_per_s": best, "torch": torch.__version__,
                      "device": torch.cuda.get_device_name(0)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
