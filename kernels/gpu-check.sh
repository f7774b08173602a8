#!/usr/bin/env bash
# The CUDA backend's GPU check, in one script:
#   1. every kernel against the CPU reference on fresh random inputs (kernels/tests/cuda_vs_cpu.rs,
#      thresholds stated there: 1e-5 elementwise, 2e-4 f32 reductions, 2e-2 bf16 operands);
#   2. end-to-end greedy outputs of the default model on the GPU equal to the CPU's (f32 weights
#      must match exactly; bf16 is reported);
#   3. benchmarks: kernel bandwidth (BGMV/SGMV, paged-attention decode) against the copy
#      bandwidth, end-to-end throughput with 100 adapters against the base model alone (LoRA
#      overhead) and against HF transformers + PEFT on the same GPU;
#   then a short table (also written to $OUT/gpu-check.md when $OUT is set).
#
# The GPU machines lent to sessions have no Rust toolchain and reach no network, and what one
# call can carry is 64 MiB, less than the model. So:
#   here (no GPU):  bash kernels/gpu-check.sh pack      -> .gpu/a, .gpu/b, .gpu/c (git-ignored)
#   device tool:    run carry [".gpu/a"]  command "bash kernels/gpu-check.sh stage"
#                   run carry [".gpu/b"]  command "bash kernels/gpu-check.sh stage"
#                   run carry [".gpu/c"]  command "bash kernels/gpu-check.sh stage && bash kernels/gpu-check.sh run"
# (the machine stays warm between back-to-back calls; `stage` keeps parts in /tmp/openlora-gpu).
# On a GPU machine with cargo and the model cached, `bash kernels/gpu-check.sh run` alone works.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/openlora-gpu
PART_MB=30

pack() {
  cargo build --release -q -p openlora
  cargo test --release -q -p openlora-kernels --test cuda_vs_cpu --no-run
  local test_bin
  test_bin=$(ls -t target/release/deps/cuda_vs_cpu-* | grep -v '\.d$' | head -1)
  local model="${OPENLORA_CACHE:-$HOME/.cache/openlora}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$model" ] || cargo run -q --release -p openlora -- fetch
  rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/c /tmp/openlora-pack
  # Precompiled kernels for Hopper and Ampere (the backend's cubin cache layout).
  target/release/openlora cuda compile --arch sm_90,sm_80 --cache /tmp/openlora-pack/kernels >/dev/null
  cp -r /tmp/openlora-pack/kernels .gpu/a/kernels
  strip -o .gpu/a/openlora target/release/openlora
  strip -o .gpu/a/cuda_vs_cpu "$test_bin"
  gzip -9 -f .gpu/a/openlora .gpu/a/cuda_vs_cpu
  # The gguf reader for transformers (HF + PEFT peer), a pure-python wheel.
  python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/a gguf==0.19.0
  split -b "${PART_MB}m" -d "$model" /tmp/openlora-pack/model.part
  mv /tmp/openlora-pack/model.part00 .gpu/a/
  mv /tmp/openlora-pack/model.part01 .gpu/b/
  mv /tmp/openlora-pack/model.part0* .gpu/c/
  sha256sum "$model" | cut -d' ' -f1 > .gpu/c/model.sha256
  du -sh .gpu/*
  echo "packed; now run the three device calls listed at the top of kernels/gpu-check.sh"
}

stage() {
  mkdir -p "$STAGE"
  for d in .gpu/a .gpu/b .gpu/c; do
    [ -d "$d" ] && cp -r "$d"/. "$STAGE"/
  done
  ls -la "$STAGE"
}

run() {
  # Every step runs even when an earlier one failed; the exit status says whether all passed.
  set +e
  local out="${OUT:-/tmp/openlora-gpu-out}"
  mkdir -p "$out"
  local bin test_bin model
  if [ -f "$STAGE/openlora.gz" ]; then
    gzip -d -c "$STAGE/openlora.gz" > "$STAGE/openlora" && chmod +x "$STAGE/openlora"
    gzip -d -c "$STAGE/cuda_vs_cpu.gz" > "$STAGE/cuda_vs_cpu" && chmod +x "$STAGE/cuda_vs_cpu"
    cat "$STAGE"/model.part* > "$STAGE/model.gguf"
    if [ "$(sha256sum "$STAGE/model.gguf" | cut -d' ' -f1)" != "$(cat "$STAGE/model.sha256")" ]; then
      echo "the staged model is incomplete: run the three stage calls back to back" >&2
      exit 1
    fi
    bin="$STAGE/openlora"; test_bin="$STAGE/cuda_vs_cpu"; model="$STAGE/model.gguf"
    export OPENLORA_CACHE="$STAGE"
  else
    cargo build --release -q -p openlora
    cargo test --release -q -p openlora-kernels --test cuda_vs_cpu --no-run
    bin=target/release/openlora
    test_bin=$(ls -t target/release/deps/cuda_vs_cpu-* | grep -v '\.d$' | head -1)
    model="${OPENLORA_CACHE:-$HOME/.cache/openlora}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  fi
  # NVRTC/cuBLAS of the machine's toolkit, if any, on the loader path.
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  done
  nvidia-smi -L | tee "$out/device.txt"
  local status=0 summary="$out/gpu-check.md"
  echo "# openlora CUDA check ($(date -u +%F), $(head -1 "$out/device.txt"))" > "$summary"

  echo "== 1. kernels vs CPU"
  if "$test_bin" --ignored --test-threads=1 --nocapture 2>&1 | tee "$out/kernels.log"; then
    echo "- kernels vs CPU: PASS" >> "$summary"
  else
    echo "- kernels vs CPU: FAIL (see kernels.log)" >> "$summary"; status=1
  fi
  grep -E "rel err" "$out/kernels.log" | sed 's/^/    /' >> "$summary" || true
  echo "- kernel bandwidth:" >> "$summary"
  grep -E "^\|" "$out/kernels.log" >> "$summary" || true

  echo "== 2. greedy outputs, GPU vs CPU"
  gen() { "$bin" generate --model "$model" "$@" 2>>"$out/generate.err" || echo "<generate failed: see generate.err>"; }
  local prompts=("What is the capital of France?" "Write a haiku about the sea." "List three prime numbers.")
  for p in "${prompts[@]}"; do
    local cpu gpu32 gpu16
    cpu=$(gen --device cpu --chat --prompt "$p" --max-tokens 48)
    gpu32=$(gen --device cuda:0 --gpu-precision f32 --chat --prompt "$p" --max-tokens 48)
    gpu16=$(gen --device cuda:0 --gpu-precision bf16 --chat --prompt "$p" --max-tokens 48)
    if [ "$cpu" == "$gpu32" ]; then echo "- greedy f32 \"$p\": identical" >> "$summary"
    else echo "- greedy f32 \"$p\": DIFFERENT: cpu=[$cpu] gpu=[$gpu32]" >> "$summary"; status=1; fi
    if [ "$cpu" == "$gpu16" ]; then echo "- greedy bf16 \"$p\": identical" >> "$summary"
    elif [[ "$gpu16" == "<generate failed"* ]]; then echo "- greedy bf16 \"$p\": FAILED to run" >> "$summary"; status=1
    else echo "- greedy bf16 \"$p\": differs (bf16 GEMM operands): gpu=[$gpu16]" >> "$summary"; fi
    local kv16
    kv16=$(gen --device cuda:0 --gpu-precision f32 --gpu-kv-dtype bf16 --chat --prompt "$p" --max-tokens 48)
    if [ "$cpu" == "$kv16" ]; then echo "- greedy f32 weights, bf16 KV \"$p\": identical" >> "$summary"
    elif [[ "$kv16" == "<generate failed"* ]]; then echo "- greedy bf16 KV \"$p\": FAILED to run" >> "$summary"; status=1
    else echo "- greedy f32 weights, bf16 KV \"$p\": differs (bf16 keys/values): gpu=[$kv16]" >> "$summary"; fi
  done
  echo "- device memory plan (openlora cuda plan; compare with nvidia-smi while serving):" >> "$summary"
  "$bin" cuda plan "$model" 2>&1 | sed 's/^/    /' >> "$summary" || true
  local ad="examples/adapters"
  for a in pirate caps; do
    local cpu gpu
    cpu=$(gen --device cpu --chat --adapter "$a" --adapters-dir "$ad" --prompt "Tell me about ships." --max-tokens 32)
    gpu=$(gen --device cuda:0 --gpu-precision f32 --chat --adapter "$a" --adapters-dir "$ad" --prompt "Tell me about ships." --max-tokens 32)
    if [ "$cpu" == "$gpu" ]; then echo "- greedy f32 with adapter $a: identical" >> "$summary"
    else echo "- greedy f32 with adapter $a: DIFFERENT: cpu=[$cpu] gpu=[$gpu]" >> "$summary"; status=1; fi
  done

  echo "== 3. end-to-end throughput: 100 adapters vs base vs HF+PEFT"
  local work=/tmp/openlora-gpu-bench
  mkdir -p "$work"
  if [ ! -f "$work/ad100.done" ]; then
    "$bin" adapters synth --model "$model" --count 100 --rank 8 --out "$work/ad100" >/dev/null && touch "$work/ad100.done"
  fi
  local names
  names=$(ls "$work/ad100" | head -100 | paste -sd, -)
  cat > "$work/deploy.toml" <<EOF
[model]
path = "$model"
name = "base"
[server]
listen = "127.0.0.1:8093"
[engine]
device = "cuda:0"
kv_cache_mib = 8192
max_running = 256
max_batch_tokens = 4096
[adapters]
dirs = ["$work/ad100"]
device_mib = 4096
EOF
  "$bin" serve "$work/deploy.toml" > "$out/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do curl -sf http://127.0.0.1:8093/health >/dev/null && break; sleep 1; done
  local extra='{"ignore_eos": true}'
  python3 bench/mixed_adapters.py --url http://127.0.0.1:8093/v1 --adapters "$names" --concurrency 128 \
    --requests 512 --max-tokens 64 --extra-body "$extra" --out "$out/openlora_gpu_100.json" --label "openlora cuda 100 adapters" \
    | tee "$out/openlora_gpu_100.line" || status=1
  python3 bench/mixed_adapters.py --url http://127.0.0.1:8093/v1 --adapters base --concurrency 128 \
    --requests 512 --max-tokens 64 --extra-body "$extra" --out "$out/openlora_gpu_base.json" --label "openlora cuda base" \
    | tee "$out/openlora_gpu_base.line" || status=1
  # What the device holds while serving, beside the plan the server printed at start.
  echo "- device memory while serving (nvidia-smi) vs the plan printed at start:" >> "$summary"
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>&1 | sed 's/^/    /' >> "$summary" || true
  sed -n '/device memory plan/,/^total/p' "$out/server.log" | sed 's/^/    /' >> "$summary" || true
  kill "$pid"; wait "$pid" || true
  if [ -f "$STAGE/gguf-0.19.0-py3-none-any.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/openlora-site "$STAGE"/gguf-*.whl && export PYTHONPATH=/tmp/openlora-site
  fi
  python3 bench/gpu_peft.py --gguf "$model" --adapters-dir "$work/ad100" --adapters 100 --batch 128 --max-tokens 64 \
    | tee "$out/peft_gpu_100.line" || echo '{"tokens_per_s": null}' > "$out/peft_gpu_100.line"
  python3 - "$out" >> "$summary" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def tps(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1]).get("tokens_per_s")
    except Exception:
        return None
o100, base, peft = tps("openlora_gpu_100.line"), tps("openlora_gpu_base.line"), tps("peft_gpu_100.line")
print("- end-to-end, 128 concurrent streams x 64 tokens (512 requests):")
print(f"    openlora, 100 adapters: {o100} tok/s; base model alone: {base} tok/s", end="")
if o100 and base:
    print(f"; LoRA overhead {100 * (1 - o100 / base):.1f}% (goal < 10%)")
else:
    print()
print(f"    HF transformers + PEFT, 100 adapters, batch 128: {peft} tok/s", end="")
if o100 and peft:
    print(f"; openlora / HF+PEFT = {o100 / peft:.1f}x (goal >= 10x)")
else:
    print()
PY
  echo
  cat "$summary"
  return $status
}

case "${1:-}" in
  pack) pack ;;
  stage) stage ;;
  run) run ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
