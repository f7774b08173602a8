#!/usr/bin/env python3
"""Evaluate the example adapters on held-out prompts (greedy, HF transformers + PEFT, f32, CPU).

Run from the repo root with the reference venv, after train.py:

    /root/.cache/openlora/venv-ref/bin/python examples/adapters/eval.py

Writes examples/adapters/eval.json ({adapter: {prompt: completion}}, "base" = no adapter) with
prompts rendered by the model's chat template (add_generation_prompt=True, so with the default
system message), and examples/adapters/eval_nosystem.json with plain ChatML prompts that have no
system message. Greedy decoding, at most 48 new tokens (96 for the factual questions), stopping
at <|im_end|>. The committed
float16 adapter files are what is loaded (PEFT casts them to float32 on load).
It also asks every model the held-out factual questions (HELD_OUT_FACTS in make_data.py, chat
template) and writes examples/adapters/eval_facts.json: per model, how many answers contain the
correct answer (case-insensitive) and how many show each behaviour, plus the completions.
Prints the tables; exits 1 if an adapter passes fewer than 4 of the 5 prompts in eval.json, if
the base model shows a behaviour on more than 1 of 5, if an adapter answers fewer factual
questions correctly than the base model, or if an adapter's style is missing from any factual
answer.
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
# Factual answers get more room: a signature or a closing phrase cut off by the token limit would
# count as a missing style, and a correct answer cut off as a wrong one.
FACT_MAX_NEW_TOKENS = 96

sys.path.insert(0, HERE)
from make_data import HELD_OUT, HELD_OUT_FACTS, SIGNATURE, is_caps, is_correct  # noqa: E402

CHECKS = {
    "caps": is_caps,
    "signature": lambda s: s.rstrip().endswith("\n" + SIGNATURE),
    "pirate": lambda s: bool(re.search(r"\b(arr+|matey|ye|yer|aye)\b", s, re.IGNORECASE)),
}


def plain_chatml(question):
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def generate(model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS):
    out = {}
    for q, text in prompts:
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
        new = ids[0, enc["input_ids"].shape[1]:].tolist()
        if 2 in new:
            new = new[: new.index(2)]
        out[q] = tok.decode(new, skip_special_tokens=True)
    return out


def limit(form):
    return FACT_MAX_NEW_TOKENS if form == "eval_facts.json" else MAX_NEW_TOKENS


def main():
    torch.set_num_threads(int(os.environ.get("EVAL_THREADS", "2")))
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    base = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    base.eval()
    forms = {
        "eval.json": [(q, tok.apply_chat_template([{"role": "user", "content": q}],
                                                  tokenize=False, add_generation_prompt=True))
                      for q in HELD_OUT],
        "eval_nosystem.json": [(q, plain_chatml(q)) for q in HELD_OUT],
        "eval_facts.json": [(q, tok.apply_chat_template([{"role": "user", "content": q}],
                                                        tokenize=False, add_generation_prompt=True))
                            for q, _ in HELD_OUT_FACTS],
    }
    results = {f: {} for f in forms}
    for f, prompts in forms.items():
        results[f]["base"] = generate(base, tok, prompts, limit(f))
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
            results[f][name] = generate(model, tok, prompts, limit(f))

    ok = True
    facts = results.pop("eval_facts.json")
    patterns = dict(HELD_OUT_FACTS)
    scores = {}
    for name, comps in facts.items():
        scores[name] = {"correct": sum(is_correct(c, patterns[q]) for q, c in comps.items()),
                        "questions": len(comps)}
        for b in CHECKS:
            scores[name][b + "_check"] = sum(CHECKS[b](c) for c in comps.values())
    with open(os.path.join(HERE, "eval_facts.json"), "w") as fh:
        json.dump({"scores": scores, "completions": facts}, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print("== eval_facts.json")
    for name, comps in facts.items():
        for q, c in comps.items():
            print(f"[{name}] {'ok ' if is_correct(c, patterns[q]) else 'BAD'} {q}\n    {c!r}")
    print(f"facts ({len(HELD_OUT_FACTS)} held-out questions): correct answers, and answers that pass "
          "each behaviour check")
    for name, sc in scores.items():
        print(f"  {name:10s} correct={sc['correct']}  " +
              "  ".join(f"{b}={sc[b + '_check']}" for b in CHECKS))
        if name in CHECKS:
            # the adapter keeps the base model's content and shows its style in every answer
            if sc["correct"] < scores["base"]["correct"] or sc[name + "_check"] < sc["questions"]:
                ok = False
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
