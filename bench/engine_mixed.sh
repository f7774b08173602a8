#!/usr/bin/env bash
# The engine benchmark in one command: 32 concurrent streaming chat requests spread over 8
# synthetic rank-8 adapters, through openlora's server (with its plugins and receipts on, then
# off) and through llama-cpp-python's server (same GGUF, same threads, same client), then the
# ratio. Results: bench/results/{openlora_mixed32,openlora_mixed32_bare,llamacpp_mixed32}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
cargo xtask plugins
python3 bench/run_mixed_openlora.py "$@"
python3 bench/run_mixed_openlora.py --bare "$@"
python3 bench/run_mixed_llamacpp.py "$@"
python3 - <<'PY'
import json
r = {n: json.load(open(f"bench/results/{n}.json")) for n in ("openlora_mixed32", "openlora_mixed32_bare", "llamacpp_mixed32")}
base = r["llamacpp_mixed32"]["tokens_per_s"]
print(f"{'server':<28}{'tok/s':>8}{'x llama.cpp':>13}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'ITL p50 ms':>12}")
for n, v in r.items():
    print(f"{n:<28}{v['tokens_per_s']:>8.1f}{v['tokens_per_s'] / base:>13.2f}{v['ttft_ms']['p50']:>13.0f}{v['ttft_ms']['p99']:>13.0f}{v['itl_ms']['p50']:>12.1f}")
PY
