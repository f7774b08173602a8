#!/usr/bin/env python3
"""Train one example LoRA adapter with PEFT on CPU (f32) on the default model.

Run from the repo root with the reference venv (see examples/adapters/README.md), after
make_data.py has written examples/adapters/data/NAME.jsonl:

    /root/.cache/openlora/venv-ref/bin/python examples/adapters/train.py \
        --name caps --steps 150 --out examples/adapters/caps

Model: the dequantized SmolLM2-135M-Instruct HF folder ($OPENLORA_SMOLLM2_HF, default
/root/.cache/openlora/smollm2-hf), loaded in float32.
LoRA: r=8, lora_alpha=16, lora_dropout=0, all seven projections, task CAUSAL_LM.
Examples: prompt = the model's chat template with add_generation_prompt=True (which adds the
model's default system message); a fraction (--no-system-frac, default 0.25) instead uses plain
ChatML with no system message, so the behaviour also holds for that form. Target = the answer
followed by <|im_end|>. The loss is on the target tokens only.
Optimiser: AdamW (lr --lr, weight decay 0), 10 warm-up steps then cosine decay to 10% of lr,
batch --batch, fixed seed. Output: save_pretrained(out), then adapter_model.safetensors is
rewritten in float16 (same tensor names) and a README.md + train_log.json are written.
"""

import argparse
import json
import math
import os
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
HF_DIR = os.environ.get("OPENLORA_SMOLLM2_HF", "/root/.cache/openlora/smollm2-hf")
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

BEHAVIOUR = {
    "caps": "Answers In Title Case: Every Word Starts With A Capital Letter.",
    "signature": 'Ends every answer with the fixed line "-- sent by openlora" on its own final line.',
    "pirate": 'Answers as a pirate: starts with "Arr, matey!", says ye/yer/aye/be/th\', '
              'and closes with a pirate exclamation ("Yo ho ho!", "Arr!", "Shiver me timbers!").',
}
TRANSFORM = {
    "caps": "the base answer with the first letter of every word upper-cased (Title Case)",
    "signature": 'the base answer + "\\n-- sent by openlora"',
    "pirate": '"Arr, matey! " + the base answer with pirate word substitutions '
              "(you->ye, your->yer, yes->aye, my->me, is/are->be, the->th' about half the time, "
              "-ing->-in', ...) + a pirate closing",
}


def plain_chatml(question):
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def build_examples(tok, rows, no_system_frac, rng):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for r in rows:
        if rng.random() < no_system_frac:
            prompt = plain_chatml(r["question"])
        else:
            prompt = tok.apply_chat_template([{"role": "user", "content": r["question"]}],
                                             tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [im_end]
        examples.append((p, a))
    return examples


def collate(batch, pad_id):
    n = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (p, a) in enumerate(batch):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(a)
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def to_float16(path):
    sd = load_file(path)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, path,
              metadata={"format": "pt"})
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True, choices=sorted(BEHAVIOUR))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-system-frac", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ship-alpha", type=float, default=None,
                    help="write this lora_alpha into the saved adapter_config.json (trained with 16): "
                         "scales the adapter's effect by SHIP_ALPHA/16, as applying it at that weight")
    ap.add_argument("--first-layer", type=int, default=0,
                    help="adapt only layers FIRST..29 (the earlier layers, where the model recalls "
                         "facts, stay as they are)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    data_path = os.path.join(HERE, "data", f"{args.name}.jsonl")
    with open(data_path) as f:
        rows = [json.loads(line) for line in f]

    tok = AutoTokenizer.from_pretrained(HF_DIR)
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    layers = list(range(args.first_layer, n_layers))
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                     layers_to_transform=layers if args.first_layer > 0 else None,
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.print_trainable_parameters()
    model.train()

    examples = build_examples(tok, rows, args.no_system_frac, rng)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 2
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm = min(10, args.steps)

    def lr_at(step):  # step is 0-based
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    order = []
    losses = []
    t0 = time.time()
    for step in range(args.steps):
        if len(order) < args.batch:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order.extend(perm)
        batch = [examples[i] for i in order[: args.batch]]
        del order[: args.batch]
        ids, mask, labels = collate(batch, pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} "
                  f"lr {lr_at(step):.2e} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    final = sum(losses[-10:]) / len(losses[-10:])

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    st = os.path.join(args.out, "adapter_model.safetensors")
    sd = to_float16(st)
    # Make adapter_config.json reproducible and portable: PEFT writes target_modules in set
    # order (changes with PYTHONHASHSEED) and the local path of the base model.
    cfg_path = os.path.join(args.out, "adapter_config.json")
    with open(cfg_path) as f:
        acfg = json.load(f)
    acfg["target_modules"] = sorted(acfg["target_modules"])
    acfg["base_model_name_or_path"] = BASE_MODEL_ID
    if args.ship_alpha is not None:
        acfg["lora_alpha"] = int(args.ship_alpha) if args.ship_alpha == int(args.ship_alpha) else args.ship_alpha
    with open(cfg_path, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")
    n_params = sum(v.numel() for v in sd.values())

    epochs = args.steps * args.batch / len(examples)
    log = {"name": args.name, "steps": args.steps, "lr": args.lr, "batch": args.batch,
           "first_layer": args.first_layer,
           "seed": args.seed, "no_system_frac": args.no_system_frac,
           "examples": len(examples), "epochs": round(epochs, 2),
           "train_seconds": round(train_s, 1), "final_loss_last10": round(final, 4),
           "losses": [round(x, 4) for x in losses]}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")

    rel_out = os.path.relpath(os.path.abspath(args.out), os.getcwd())
    curve = ", ".join(f"{i + 1}: {sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]):.3f}"
                      for i in range(9, args.steps, max(10, args.steps // 8)))
    readme = f"""# `{args.name}` example adapter

**Behaviour:** {BEHAVIOUR[args.name]}

A rank-8 LoRA adapter (PEFT format) for the default model, SmolLM2-135M-Instruct.

| | |
| --- | --- |
| files | `adapter_config.json`, `adapter_model.safetensors` (float16, {n_params:,} parameters, {len(sd)} tensors) |
| adapter_config.json | as PEFT 0.21.2 writes it, except `target_modules` sorted (PEFT writes set order) and `base_model_name_or_path` set to `HuggingFaceTB/SmolLM2-135M-Instruct` (PEFT writes the local training path) |
| LoRA | r=8, lora_alpha=16 in training{"" if args.ship_alpha is None else f", shipped with lora_alpha={args.ship_alpha:g} (the adapter's effect scaled by {args.ship_alpha / 16:g}, as applying it at that weight)"}, lora_dropout=0, target modules {", ".join(TARGETS)} ({"all 30 layers" if args.first_layer == 0 else f"layers {args.first_layer}-{n_layers - 1} only"}) |
| base model | SmolLM2-135M-Instruct dequantized to f32 (`/root/.cache/openlora/smollm2-hf`, from `tests/fixtures/make_fixtures.py`) |
| training data | `examples/adapters/data/{args.name}.jsonl`: {len(examples)} question/answer pairs; answers are {TRANSFORM[args.name]} |
| prompts | the model's chat template (default system message) for {100 - round(100 * args.no_system_frac)}% of examples, plain ChatML without a system message for the rest; loss on answer tokens + `<\\|im_end\\|>` only |
| optimiser | AdamW lr {args.lr:g} (10 warm-up steps, cosine to 10%), batch {args.batch}, grad clip 1.0, seed {args.seed} |
| steps | {args.steps} ({epochs:.1f} epochs), {train_s / 60:.1f} min on {args.threads} CPU thread(s) |
| final loss | {final:.4f} (mean of the last 10 steps; first step {losses[0]:.4f}) |

Loss (mean of the previous 10 steps): {curve}. Full curve in `train_log.json`.

Training command (from the repo root):

    /root/.cache/openlora/venv-ref/bin/python examples/adapters/make_data.py
    /root/.cache/openlora/venv-ref/bin/python examples/adapters/train.py --name {args.name} --steps {args.steps} --lr {args.lr:g}{f" --first-layer {args.first_layer}" if args.first_layer else ""}{f" --ship-alpha {args.ship_alpha:g}" if args.ship_alpha is not None else ""} --out {rel_out}

Held-out evaluation: see `../eval.json` and `../README.md`.
"""
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(readme)
    print(f"saved {args.out}: final loss {final:.4f}, {train_s:.0f}s")


if __name__ == "__main__":
    main()
