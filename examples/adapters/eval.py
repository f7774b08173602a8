#!/usr/bin/env python3
"""Evaluate the example adapters on held-out prompts (greedy, HF transformers + PEFT, f32, CPU).

Run from the repo root with the reference venv, after train.py:

    /root/.cache/openlora/venv-ref/bin/python examples/adapters/eval.py

Writes examples/adapters/eval.json ({adapter: {prompt: completion}}, "base" = no adapter) with
prompts rendered by the model's chat template (add_generation_prompt=True, so with the default
system message), and examples/adapters/eval_nosystem.json with plain ChatML prompts that have no
system message. Greedy decoding, at most 48 new tokens, stopping at <|im_end|>. The committed
float16 adapter files are what is loaded (PEFT casts them to float32 on load).
Prints a pass/fail table of the behaviour checks; exits 1 if an adapter passes fewer than 4 of
5 prompts or the base model shows a behaviour on more than 1 of 5.
"""

import json
import os
import re
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
HF_DIR = os.environ.get("OPENLORA_SMOLLM2_HF", "/root/.cache/openlora/smollm2-hf")
ADAPTERS = ["caps", "signature", "pirate"]
MAX_NEW_TOKENS = 48

sys.path.insert(0, HERE)
from make_data import HELD_OUT, SIGNATURE  # noqa: E402

CHECKS = {
    "caps": lambda s: bool(re.search(r"[A-Z]", s)) and not re.search(r"[a-z]", s),
    "signature": lambda s: s.rstrip().endswith("\n" + SIGNATURE),
    "pirate": lambda s: bool(re.search(r"\b(arr+|matey|ye|yer|aye)\b", s, re.IGNORECASE)),
}


def plain_chatml(question):
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def generate(model, tok, prompts):
    out = {}
    for q, text in prompts:
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
        new = ids[0, enc["input_ids"].shape[1]:].tolist()
        if 2 in new:
            new = new[: new.index(2)]
        out[q] = tok.decode(new, skip_special_tokens=True)
    return out


def main():
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    base = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    base.eval()
    forms = {
        "eval.json": [(q, tok.apply_chat_template([{"role": "user", "content": q}],
                                                  tokenize=False, add_generation_prompt=True))
                      for q in HELD_OUT],
        "eval_nosystem.json": [(q, plain_chatml(q)) for q in HELD_OUT],
    }
    results = {f: {} for f in forms}
    for f, prompts in forms.items():
        results[f]["base"] = generate(base, tok, prompts)
    model = None
    for name in ADAPTERS:
        path = os.path.join(HERE, name)
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
        model.set_adapter(name)
        model.eval()
        for f, prompts in forms.items():
            results[f][name] = generate(model, tok, prompts)

    ok = True
    for f, res in results.items():
        with open(os.path.join(HERE, f), "w") as fh:
            json.dump(res, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
        print(f"== {f}")
        for name, comps in res.items():
            for q, c in comps.items():
                print(f"[{name}] {q}\n    {c!r}")
        print(f"checks ({f}): rows = model, columns = behaviour check, passes out of {len(HELD_OUT)}")
        for name in res:
            row = {b: sum(CHECKS[b](c) for c in res[name].values()) for b in CHECKS}
            print(f"  {name:10s} " + "  ".join(f"{b}={n}" for b, n in row.items()))
            if f == "eval.json":
                if name in CHECKS and row[name] < len(HELD_OUT) - 1:
                    ok = False
                if name == "base" and max(row.values()) > 1:
                    ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
