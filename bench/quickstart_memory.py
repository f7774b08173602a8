#!/usr/bin/env python3
"""Peak RSS serving the quickstart, openlora against llama.cpp's llama-server with the same KV room.

openlora serves `examples/quickstart.toml` as it is (the default model, the example adapters, the
four example plugins, signed receipts), except that it listens on a free port and keeps its
state in a scratch folder. llama-server serves the same GGUF with the same three example
adapters (converted to GGUF LoRA by `peft_to_gguf_lora.py`, picked per request with `lora`) and a
context of as many tokens as openlora's KV pool holds (`kv_cache_mib` / the model's KV bytes per
token, whole blocks), split over `--slots` slots. Both get the same workload: `--requests` chat
requests, `--slots` in flight, greedy, `max_tokens` 64, over base/caps/signature/pirate in turn
(openlora is called with the quickstart's `sk-demo-partner` key, the tenant that may see
`pirate`). Prints one JSON line: each server's VmHWM (peak
resident set) after the workload and the ratio.

    python3 bench/quickstart_memory.py [--requests 32] [--slots 8]

Needs `cargo build --release`, `cargo xtask plugins`, the llama.cpp binaries
(`harness.ensure_llamacpp_bin`, built once) and venv-ref for the conversion. Standard library
otherwise. Memory does not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness as H

ADAPTERS = ["caps", "signature", "pirate"]
QUESTIONS = ["What is the capital of France?", "Give me a tip for staying healthy.", "How do I boil an egg?",
             "Name three colors.", "What is photosynthesis?", "Write a haiku about the sea."]
# SmolLM2-135M: 30 layers x (K + V) x 3 KV heads x 64 dims x 4 bytes (f32 on the CPU).
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4


PARTNER_KEY = "sk-demo-partner"


def chat(url: str, body: dict) -> int:
    headers = {"Content-Type": "application/json"}
    key = body.pop("_key", None)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["usage"]["completion_tokens"]


def workload(url: str, requests: int, slots: int, body_of) -> dict:
    bodies = [body_of(i) for i in range(requests)]
    t0 = time.time()
    with ThreadPoolExecutor(slots) as pool:
        tokens = sum(pool.map(lambda b: chat(url, b), bodies))
    return {"requests": requests, "completion_tokens": tokens, "seconds": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", type=Path, default=H.REPO / "target" / "release" / "openlora")
    args = ap.parse_args()
    model = H.ensure_model(args.binary)
    bins = H.ensure_llamacpp_bin()
    examples = H.REPO / "examples"
    loras = H.ensure_gguf_loras(H.ensure_venv_ref(), examples / "adapters", ADAPTERS,
                                H.cache_dir() / "bench-adapters" / "examples-gguf", model)

    toml = (examples / "quickstart.toml").read_text()
    kv_mib = int(re.search(r"^kv_cache_mib\s*=\s*(\d+)", toml, re.M).group(1))
    block = int(re.search(r"^block_size\s*=\s*(\d+)", toml, re.M).group(1))
    kv_tokens = kv_mib * 2**20 // (KV_BYTES_PER_TOKEN * block) * block
    port = H.free_port()
    state = tempfile.TemporaryDirectory(prefix="quickstart-memory-")
    toml = re.sub(r'^listen = "[^"]*"', f'listen = "127.0.0.1:{port}"', toml, flags=re.M)
    toml = re.sub(r'^state_dir = "[^"]*"', f"state_dir = {json.dumps(state.name + '/state')}", toml, flags=re.M)
    toml = re.sub(r'^threads = \d+', f"threads = {args.threads}", toml, flags=re.M)
    if not re.search(r"^threads =", toml, re.M):
        toml = toml.replace("[model]\n", f"[model]\nthreads = {args.threads}\n", 1)
    # The copy lives beside the original so that its relative paths (adapters, plugins) hold.
    config = examples / f".quickstart-memory-{port}.toml"
    config.write_text(toml)
    result = {"kv_cache_mib": kv_mib, "kv_tokens": kv_tokens, "slots": args.slots, "threads": args.threads,
              "workload": f"{args.requests} chat requests, {args.slots} in flight, greedy, max_tokens 64, "
                          "base/caps/signature/pirate in turn", "commit": H.git_commit()}
    try:
        srv = H.OpenloraServer(args.binary, [], bare=True, port=port)
        srv.config = config
        srv.label = "openlora serve examples/quickstart.toml"
        with srv:
            names = ["SmolLM2-135M-Instruct"] + ADAPTERS

            def body(i):
                return {"model": names[i % 4], "temperature": 0, "max_tokens": 64, "_key": PARTNER_KEY,
                        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
            result["openlora"] = workload(srv.url, args.requests, args.slots, body)
            result["openlora"]["peak_rss_mib"] = srv.peak_rss_mib()
    finally:
        config.unlink(missing_ok=True)
    with H.LlamaServer(bins["llama-server"], model, loras, threads=args.threads, slots=args.slots,
                       ctx_per_slot=kv_tokens // args.slots) as ls:
        def body(i):
            b = {"model": "base", "temperature": 0, "max_tokens": 64,
                 "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
            if i % 4:
                b["lora"] = [{"id": i % 4 - 1, "scale": 1.0}]
            return b
        result["llama_server"] = workload(ls.url, args.requests, args.slots, body)
        result["llama_server"]["peak_rss_mib"] = ls.peak_rss_mib()
        result["llama_server"]["argv"] = " ".join(ls.argv)
    a, b = result["openlora"]["peak_rss_mib"], result["llama_server"]["peak_rss_mib"]
    result["openlora_over_llama_server"] = round(a / b, 2) if a and b else None
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
