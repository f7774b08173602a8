#!/usr/bin/env python3
"""llama.cpp peer for the mixed-adapter server workload, in one command.

  (a) makes N synthetic rank-8 PEFT adapters (bench/make_synth_adapters.py, default 8, seed 0) in
      <cache>/bench-adapters/synth8, or reuses them if they are there with the same parameters;
  (b) converts each to a GGUF LoRA (bench/peft_to_gguf_lora.py) in <cache>/bench-adapters/synth8-gguf,
      unless the GGUF is newer than its PEFT folder;
  (c) starts llama-cpp-python's OpenAI server on 127.0.0.1 with the base model plus one entry per
      adapter (bench/serve_llamacpp.py; it times every model load);
  (d) runs bench/mixed_adapters.py: --requests (32) streaming chat requests, --concurrency (32) in
      flight, request i on adapter i % N, --max-tokens (64), greedy, after one untimed request per
      adapter;
  (e) stops the server;
  (f) writes the client's JSON plus the server settings, the model loads it made during the timed
      run, the machine, the commit and the command to --out (default
      bench/results/llamacpp_mixed32.json), and prints a short table.

    python3 bench/run_mixed_llamacpp.py [--threads 2] [--requests 32] [--concurrency 32] \
        [--max-tokens 64] [--n-adapters 8] [--port 8090] [--out FILE]

Pythons: (a) and (b) run with --ref-python (default <cache>/venv-ref: numpy, safetensors, gguf);
the server and the client with --llama-python (default <cache>/venv-llamacpp). This script itself
needs only the standard library.

Like bench/single_stream.py, it counts the CPU time that processes other than the server, the
client and itself used during the timed run (/proc/stat) and prints a WARNING above 5% of the
machine: a compile nearby distorts these figures badly on a 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from harness import git_commit, machine_info, wait_quiet  # noqa: E402
from serve_llamacpp import LlamaCppServer, cache_dir  # noqa: E402


def proc_stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    return v[0] + v[1] + v[2] + v[5] + v[6], v[7]  # busy, steal (clock ticks)


def own_cpu() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def ensure_adapters(a) -> list[str]:
    names = [f"synth{i:02d}" for i in range(a.n_adapters)]
    params = {"n": a.n_adapters, "rank": a.rank, "alpha": 2 * a.rank, "seed": a.seed, "b_std": 0.01}
    stamp = a.adapters_dir / ".params.json"
    have = all((a.adapters_dir / n / "adapter_model.safetensors").exists() for n in names)
    if have and stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"(a) reusing {a.n_adapters} adapters in {a.adapters_dir}", flush=True)
    else:
        cmd = [a.ref_python, str(HERE / "make_synth_adapters.py"), "--out", str(a.adapters_dir),
               "--n", str(a.n_adapters), "--rank", str(a.rank), "--alpha", str(2 * a.rank), "--seed", str(a.seed)]
        print("(a) " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        stamp.write_text(json.dumps(params))
    a.gguf_dir.mkdir(parents=True, exist_ok=True)
    for n in names:
        src = a.adapters_dir / n / "adapter_model.safetensors"
        dst = a.gguf_dir / f"{n}.gguf"
        if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
            continue
        cmd = [a.ref_python, str(HERE / "peft_to_gguf_lora.py"), str(a.adapters_dir / n), "--out", str(dst),
               "--model", str(a.model)]
        print("(b) " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return names


def disturbed(load: dict) -> bool:
    return load["other_processes_share"] > 0.05 or load["steal_cpu_s"] > 0.05 * load["wall_s"]


def attempt_run(a, names, ggufs, version, command) -> dict:
    """(c)-(e): start the server, run the client, stop the server; the merged result."""
    client_out = a.out.with_suffix(".client.tmp.json")
    srv = LlamaCppServer(a.model, ggufs, port=a.port, threads=a.threads, n_ctx=a.n_ctx, python=a.llama_python)
    print(f"(c) llama-cpp-python {version} server on {srv.url}: base + {len(names)} adapters, "
          f"n_threads {a.threads}", flush=True)
    client_cmd = [a.llama_python, str(HERE / "mixed_adapters.py"), "--url", srv.url, "--adapters", ",".join(names),
                  "--requests", str(a.requests), "--concurrency", str(a.concurrency),
                  "--max-tokens", str(a.max_tokens), "--warmup", str(a.warmup), "--timeout", str(a.timeout),
                  "--out", str(client_out), "--label", f"llama-cpp-python {version} server"]
    with srv:
        print("(d) " + shlex.join(client_cmd), flush=True)
        busy0, steal0 = proc_stat()
        own0, srv0, t0 = own_cpu(), srv.cpu_seconds(), time.time()
        p = subprocess.run(client_cmd, capture_output=True, text=True, timeout=a.timeout + 300)
        busy1, steal1 = proc_stat()
        own1, srv1, wall = own_cpu(), srv.cpu_seconds(), time.time() - t0
        loads = srv.loads()
        server_log_tail = srv.log.read_text()[-2000:]
    print("(e) server stopped", flush=True)
    if p.returncode not in (0, 1) or not client_out.exists():
        print(p.stdout, p.stderr, server_log_tail, sep="\n", file=sys.stderr)
        sys.exit("client failed")
    result = json.loads(client_out.read_text())
    client_out.unlink()

    hz = os.sysconf("SC_CLK_TCK")
    ncpu = machine_info()["nproc"]
    ours = (own1 - own0) + ((srv1 or 0) - (srv0 or 0))
    others = max(0.0, (busy1 - busy0) / hz - ours)
    load = {"wall_s": round(wall, 2), "server_cpu_s": round((srv1 or 0) - (srv0 or 0), 2),
            "client_and_driver_cpu_s": round(own1 - own0, 2), "other_processes_cpu_s": round(others, 2),
            "other_processes_share": round(others / (wall * ncpu), 3), "steal_cpu_s": round((steal1 - steal0) / hz, 2)}
    timed_loads = [x for x in loads if x["t"] >= result.get("started_unix", 0)]
    result = {
        "engine": f"llama-cpp-python {version} server (llama_cpp.server, OpenAI API)",
        **{k: v for k, v in result.items() if k != "request_details"},
        "server": {"n_threads": a.threads, "n_threads_batch": a.threads, "n_ctx": a.n_ctx, "logits_all": False,
                   "interrupt_requests": False, "cache": False, "model": str(a.model),
                   "adapters": {n: str(g) for n, g in zip(names, ggufs)},
                   "model_loads_timed": len(timed_loads),
                   "model_load_s_timed": round(sum(x["load_s"] for x in timed_loads), 3),
                   "model_loads_total": len(loads)},
        "adapters_made_by": f"bench/make_synth_adapters.py --n {a.n_adapters} --rank {a.rank} "
                            f"--alpha {2 * a.rank} --seed {a.seed}",
        "machine": machine_info(), "machine_load": load, "commit": git_commit(), "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "request_details": result.get("request_details"),
    }
    return result


def main() -> int:
    c = cache_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=c / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--adapters-dir", type=Path, default=c / "bench-adapters" / "synth8")
    ap.add_argument("--gguf-dir", type=Path, default=c / "bench-adapters" / "synth8-gguf")
    ap.add_argument("--n-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="n_threads = n_threads_batch of the server")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the client's timed run")
    ap.add_argument("--ref-python", default=str(c / "venv-ref" / "bin" / "python"))
    ap.add_argument("--llama-python", default=str(c / "venv-llamacpp" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "llamacpp_mixed32.json")
    ap.add_argument("--wait-quiet", type=float, default=300,
                    help="before each attempt, wait up to this many seconds for an idle machine (0: don't)")
    ap.add_argument("--quiet-seconds", type=float, default=6, help="how long the machine must be idle first")
    ap.add_argument("--retries", type=int, default=2,
                    help="run again (after waiting for quiet) when other processes took > 5%% of the machine")
    a = ap.parse_args()
    command = shlex.join([sys.argv[0], *sys.argv[1:]])

    if not a.model.exists():
        sys.exit(f"model not found: {a.model} (run `openlora fetch`)")
    names = ensure_adapters(a)
    ggufs = [a.gguf_dir / f"{n}.gguf" for n in names]

    version = subprocess.run([a.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(a.retries + 1):
        quiet = wait_quiet(a.wait_quiet, a.quiet_seconds) if a.wait_quiet > 0 else {"quiet": None}
        if quiet["quiet"] is False:
            print(f"note: the machine did not become idle within {a.wait_quiet} s ({quiet})", flush=True)
        r = attempt_run(a, names, ggufs, version, command)
        r["quiet_wait"] = quiet
        r["attempt"] = attempt + 1
        share = r["machine_load"]["other_processes_share"]
        if attempt == 0 or share < result["machine_load"]["other_processes_share"]:
            result = r  # keep the least disturbed attempt
        if not disturbed(r["machine_load"]):
            break
        print(f"attempt {attempt + 1}: other processes took {share:.0%} "
              "of the machine" + ("; running again" if attempt < a.retries else ""), flush=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"(f) {a.out}")
    print(f"| workload | {a.requests} requests, {a.concurrency} concurrent, {len(names)} adapters, "
          f"{a.max_tokens} max new tokens |")
    print("| --- | ---: |")
    print(f"| generated tok/s | {result['tokens_per_s']} ({result['completion_tokens']} tokens / {result['wall_s']} s) |")
    print(f"| TTFT p50 / p99 ms | {result['ttft_ms'].get('p50')} / {result['ttft_ms'].get('p99')} |")
    print(f"| ITL p50 / p99 ms | {result['itl_ms'].get('p50')} / {result['itl_ms'].get('p99')} |")
    print(f"| e2e p50 / p99 s | {result['e2e_s'].get('p50')} / {result['e2e_s'].get('p99')} |")
    srv_info, load = result["server"], result["machine_load"]
    print(f"| model reloads in the timed run | {srv_info['model_loads_timed']} ({srv_info['model_load_s_timed']} s) |")
    print(f"| errors | {result['errors']} |")
    print(f"other load during the run: {load['other_processes_cpu_s']:.1f} CPU-s by other processes "
          f"({load['other_processes_share']:.0%} of the machine), {load['steal_cpu_s']:.1f} s stolen")
    if disturbed(load):
        print("WARNING: the machine was busy with other work during this run; the figures are not reliable.")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
