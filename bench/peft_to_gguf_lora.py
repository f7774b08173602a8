#!/usr/bin/env python3
"""Convert a PEFT LoRA adapter folder to a llama.cpp GGUF LoRA adapter (Llama architecture).

Writes the same file as llama.cpp's convert_lora_to_gguf.py does for a Llama-family base, without
torch, transformers or the base model's HF folder: only the `gguf`, `numpy` and `safetensors`
packages (e.g. the venv `<cache>/venv-ref`). The head counts come from the base GGUF.

    ~/.cache/openlora/venv-ref/bin/python bench/peft_to_gguf_lora.py ADAPTER_DIR \
        [--out FILE.gguf] [--model BASE.gguf] [--outtype f32|f16]

Format (as llama.cpp's src/llama-adapter.cpp reads it):
  - KV: general.architecture = the base's ("llama"), general.type = "adapter",
    adapter.type = "lora", adapter.lora.alpha = lora_alpha (f32); llama.cpp scales each
    product by alpha / rank, like PEFT's lora_alpha / r.
  - tensors `blk.{l}.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight.lora_a`
    (numpy [r, in], i.e. GGML ne = [in, r]) and `.lora_b` (numpy [out, r]), one pair per PEFT
    `...{q,k,v,o,gate,up,down}_proj.lora_A/lora_B.weight`.
  - llama.cpp's converter permutes the rows of the base `attn_q`/`attn_k` weights for its
    pairwise RoPE; the output rows of the LoRA product B·A must be permuted the same way, i.e.
    the rows of lora_B (per head group: n_head for q, n_head_kv for k). lora_A is unchanged.

PEFT options llama.cpp's adapter format cannot express (use_rslora, use_dora, rank_pattern,
alpha_pattern, bias, modules_to_save, embedding LoRA) are rejected.

Defaults: --model is the default model GGUF in the openlora cache; --out is ADAPTER_DIR/../NAME.gguf
unless given. f32 is convert_lora_to_gguf.py's default outtype too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

MODULE_TO_GGUF = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
NAME_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def cache_dir() -> Path:
    if os.environ.get("OPENLORA_CACHE"):
        return Path(os.environ["OPENLORA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "openlora"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute on the row axis: per head, rows [0..d/2) and [d/2..d)
    interleave (HF rotate-half layout -> GGML pairwise layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_base(model: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(model))

    def field(key):
        f = r.fields.get(key)
        if f is None:
            return None
        return f.contents()

    arch = field("general.architecture")
    return {
        "arch": arch,
        "n_head": int(field(f"{arch}.attention.head_count")),
        "n_head_kv": int(field(f"{arch}.attention.head_count_kv") or field(f"{arch}.attention.head_count")),
        "n_layer": int(field(f"{arch}.block_count")),
        "shapes": {t.name: tuple(int(x) for x in t.shape) for t in r.tensors},  # GGML ne order
    }


def convert(adapter_dir: Path, out: Path, model: Path, outtype: str = "f32") -> dict:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type {cfg.get('peft_type')}")
    for key in ("use_rslora", "use_dora"):
        if cfg.get(key):
            raise ValueError(f"{key} is not supported by llama.cpp's LoRA format")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(key):
            raise ValueError(f"{key} is not supported by this converter")
    if cfg.get("bias", "none") != "none":
        raise ValueError("LoRA bias is not supported")
    alpha = float(cfg["lora_alpha"])
    rank = int(cfg["r"])

    base = read_base(model)
    if base["arch"] != "llama":
        raise ValueError(f"only the llama architecture is handled (base is {base['arch']})")

    st = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, arr in st.items():
        m = NAME_RE.match(name)
        if not m or m.group(2) not in MODULE_TO_GGUF:
            raise ValueError(f"unexpected tensor in the adapter: {name}")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = arr

    dtype = np.float32 if outtype == "f32" else np.float16
    writer = gguf.GGUFWriter(str(out), base["arch"])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter_dir.name)

    n = 0
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {layer} {module}: lora_A or lora_B missing")
        a = ab["A"].astype(np.float32)
        b = ab["B"].astype(np.float32)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"layer {layer} {module}: rank {a.shape[0]}/{b.shape[1]} != r {rank}")
        if module == "q_proj":
            b = llama_permute(b, base["n_head"])
        elif module == "k_proj":
            b = llama_permute(b, base["n_head_kv"])
        tname = f"blk.{layer}.{MODULE_TO_GGUF[module]}.weight"
        ne = base["shapes"].get(tname)
        if ne is None:
            raise ValueError(f"{tname} is not in the base model")
        # base ne = [in, out]; lora_a ne = [in, r]; lora_b ne = [r, out]
        if ne[0] != a.shape[1] or ne[1] != b.shape[0]:
            raise ValueError(f"{tname}: base ne {ne} vs A {a.shape} B {b.shape}")
        writer.add_tensor(tname + ".lora_a", np.ascontiguousarray(a.astype(dtype)))
        writer.add_tensor(tname + ".lora_b", np.ascontiguousarray(b.astype(dtype)))
        n += 2

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"adapter": str(adapter_dir), "out": str(out), "tensors": n, "rank": rank, "alpha": alpha,
            "outtype": outtype, "n_head": base["n_head"], "n_head_kv": base["n_head_kv"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", type=Path, help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    ap.add_argument("--out", type=Path, help="output GGUF (default: next to the folder, NAME.gguf)")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="the base GGUF the adapter will be applied to")
    ap.add_argument("--outtype", choices=["f32", "f16"], default="f32")
    a = ap.parse_args()
    adapter = a.adapter.resolve()
    out = a.out or adapter.parent / f"{adapter.name}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(convert(adapter, out, a.model, a.outtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
