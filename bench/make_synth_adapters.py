#!/usr/bin/env python3
"""Write N random PEFT LoRA adapters for the default model (SmolLM2-135M-Instruct).

Each adapter is a folder `<out>/<prefix>NN/` with
  - adapter_config.json: peft_type LORA, r, lora_alpha, all seven projections
    (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), base_model_name_or_path;
  - adapter_model.safetensors: PEFT tensor names
    `base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight` ([r, in]) and
    `...lora_B.weight` ([out, r]), likewise for k/v/o_proj and mlp.gate/up/down_proj.

Values: A ~ N(0, 1) / sqrt(in), B ~ N(0, 1) * --b-std (default 0.01), from numpy's PCG64 seeded
with `--seed * 1000 + adapter index`, so the same arguments always give the same bytes. The B scale
keeps the model fluent while its greedy outputs differ from the base model's.

The model shape comes from an HF config.json (default `<cache>/smollm2-hf/config.json`, made by
tests/fixtures/make_fixtures.py); without one, SmolLM2-135M's shape is used (hidden 576,
intermediate 1536, 30 layers, 9 heads, 3 KV heads, head_dim 64).

Needs numpy and safetensors (e.g. the venv `<cache>/venv-ref`):

    ~/.cache/openlora/venv-ref/bin/python bench/make_synth_adapters.py \
        --out ~/.cache/openlora/bench-adapters/synth8 [--n 8] [--rank 8] [--alpha 16] [--seed 0] \
        [--dtype float32|float16] [--check-peft]

--check-peft loads the first adapter on the HF model with PEFT (needs torch, transformers, peft and
the HF folder) and checks that every LoRA weight arrived and that the logits change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
}


def cache_dir() -> Path:
    if os.environ.get("OPENLORA_CACHE"):
        return Path(os.environ["OPENLORA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "openlora"


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target projection."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * hd
    kv_out = cfg["num_key_value_heads"] * hd
    return {
        "q_proj": (h, q_out),
        "k_proj": (h, kv_out),
        "v_proj": (h, kv_out),
        "o_proj": (q_out, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def tensor_prefix(layer: int, module: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}"


def make_adapter(cfg: dict, rank: int, seed: int, b_std: float, dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = module_shapes(cfg)
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in MODULES:
            fin, fout = shapes[m]
            a = rng.standard_normal((rank, fin), dtype=np.float32) / np.float32(np.sqrt(fin))
            b = rng.standard_normal((fout, rank), dtype=np.float32) * np.float32(b_std)
            p = tensor_prefix(layer, m)
            out[f"{p}.lora_A.weight"] = a.astype(dtype)
            out[f"{p}.lora_B.weight"] = b.astype(dtype)
    return out


def adapter_config(rank: int, alpha: float, base: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def check_peft(hf_dir: Path, adapter_dir: Path) -> dict:
    """Load the adapter with PEFT; every lora_A/lora_B must be loaded and the logits must move."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2]])
    with torch.no_grad():
        ref = base(ids).logits.clone()
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    with torch.no_grad():
        got = model(ids).logits
    want = load_file(adapter_dir / "adapter_model.safetensors")
    state = model.state_dict()
    missing, mismatched = [], []
    for name, arr in want.items():
        key = name.replace(".weight", ".default.weight")
        if key not in state:
            missing.append(name)
        elif not np.allclose(state[key].float().numpy(), arr.astype(np.float32)):
            mismatched.append(name)
    return {
        "tensors": len(want),
        "missing": missing[:5],
        "mismatched": mismatched[:5],
        "max_logit_change": float((got - ref).abs().max()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=cache_dir() / "bench-adapters" / "synth8")
    ap.add_argument("--n", type=int, default=8, help="number of adapters")
    ap.add_argument("--prefix", default="synth", help="adapter folder names: PREFIX00, PREFIX01, ...")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--b-std", type=float, default=0.01, help="standard deviation of lora_B entries")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--config", type=Path, default=cache_dir() / "smollm2-hf" / "config.json",
                    help="HF config.json of the base model (SmolLM2-135M's shape if missing)")
    ap.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                    help="base_model_name_or_path written to adapter_config.json")
    ap.add_argument("--check-peft", action="store_true",
                    help="load the first adapter with PEFT on the HF folder next to --config")
    a = ap.parse_args()

    if a.config.exists():
        cfg = json.loads(a.config.read_text())
        src = str(a.config)
    else:
        cfg, src = dict(SMOLLM2_135M), "built-in SmolLM2-135M shape"
    a.out.mkdir(parents=True, exist_ok=True)
    alpha = int(a.alpha) if float(a.alpha).is_integer() else a.alpha
    names = []
    for i in range(a.n):
        name = f"{a.prefix}{i:02d}"
        d = a.out / name
        d.mkdir(exist_ok=True)
        tensors = make_adapter(cfg, a.rank, a.seed * 1000 + i, a.b_std, a.dtype)
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(
            json.dumps(adapter_config(a.rank, alpha, a.base_model), indent=2) + "\n")
        names.append(name)
    summary = {"out": str(a.out), "adapters": names, "rank": a.rank, "alpha": alpha, "seed": a.seed,
               "b_std": a.b_std, "dtype": a.dtype, "shape_from": src,
               "tensors_per_adapter": 2 * len(MODULES) * cfg["num_hidden_layers"]}
    if a.check_peft:
        summary["peft_check"] = check_peft(a.config.parent, a.out / names[0])
    print(json.dumps(summary))
    chk = summary.get("peft_check")
    if chk and (chk["missing"] or chk["mismatched"] or chk["max_logit_change"] == 0):
        print("PEFT check FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
