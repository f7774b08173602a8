#!/usr/bin/env python3
"""Single-stream prefill and decode speed: openlora against llama.cpp, same GGUF, same threads.

    python3 bench/single_stream.py [--threads 2] [--prompt-tokens 512] [--gen-tokens 128]
        [--repeat 3] [--openlora target/release/openlora] [--model PATH] [--out FILE]

openlora side: `<openlora> bench ...` (prints one JSON line). llama.cpp side: llama-cpp-python,
run by bench/llamacpp_single.py under the venv at <cache>/venv-llamacpp (created and installed
here if missing). Also measures this machine's memory read bandwidth and prints the decode
roofline (GGUF tensor bytes read per decoded token / bandwidth). Prints a markdown table and
writes the raw figures as JSON (default bench/results/single_stream.json).

Runs under any python3 (standard library only); numpy work happens in the venv's python.
"""

import argparse
import datetime
import json
import os
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from harness import MODEL_FILE, CpuMonitor, cache_dir, git_commit, last_json_line, log, machine_info  # noqa: E402
from harness import ensure_venv_llamacpp as ensure_venv  # noqa: E402


def resolve_binary(p):
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p.resolve() if p.exists() else p
    q = REPO / p
    return q if q.exists() else p


def resolve_model(args, openlora):
    if args.model:
        return Path(args.model).resolve()
    path = cache_dir() / "models" / MODEL_FILE
    if path.exists():
        return path
    log(f"{path} missing: running `{openlora} fetch`")
    r = subprocess.run([str(openlora), "fetch"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"`{openlora} fetch` failed ({r.returncode}):\n{r.stderr}")
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    return Path(lines[-1]) if lines else path


# ---------------------------------------------------------------- GGUF tensor table (no deps)

# ggml type id -> (values per block, bytes per block)
GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
}
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_tensors(path):
    """[(name, dims, ggml_type, n_bytes)] from a GGUF file's header."""
    with open(path, "rb") as f:
        def rd(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def rd_str():
            return f.read(rd("Q")).decode("utf-8", errors="replace")

        def skip_value(t):
            if t in SCALARS:
                f.seek(struct.calcsize(SCALARS[t]), 1)
            elif t == 8:
                f.seek(rd("Q"), 1)
            elif t == 9:
                et, n = rd("I"), rd("Q")
                if et in SCALARS:
                    f.seek(n * struct.calcsize(SCALARS[et]), 1)
                else:
                    for _ in range(n):
                        skip_value(et)
            else:
                raise ValueError(f"unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = rd("I"), rd("Q"), rd("Q")
        if version < 2:
            raise ValueError(f"GGUF v{version} is not supported")
        alignment = 32
        for _ in range(n_kv):
            key, t = rd_str(), rd("I")
            if key == "general.alignment" and t in SCALARS:
                alignment = rd(SCALARS[t])
            else:
                skip_value(t)
        infos = []
        for _ in range(n_tensors):
            name = rd_str()
            dims = [rd("Q") for _ in range(rd("I"))]
            infos.append((name, dims, rd("I"), rd("Q")))
        data_start = -(-f.tell() // alignment) * alignment
        data_len = os.path.getsize(path) - data_start
    ends = sorted(off for *_, off in infos) + [data_len]
    out = []
    for name, dims, t, off in infos:
        n = 1
        for d in dims:
            n *= d
        if t in GGML_TYPES:
            bs, ts = GGML_TYPES[t]
            nbytes = n // bs * ts
        else:  # unknown type: the distance to the next tensor (includes alignment padding)
            nbytes = min(e for e in ends if e > off) - off
        out.append((name, dims, t, nbytes))
    return out


def bytes_per_decoded_token(path):
    """Weight bytes one decode step reads: every tensor once. With tied embeddings (no
    output.weight) token_embd is read in full as the LM head, so it counts once; with an
    untied output.weight only one embedding row is read."""
    tensors = gguf_tensors(path)
    total = sum(t[3] for t in tensors)
    names = {t[0]: t for t in tensors}
    tied = "output.weight" not in names
    if not tied and "token_embd.weight" in names:
        _, dims, _, nbytes = names["token_embd.weight"]
        total -= nbytes - nbytes // max(1, dims[1] if len(dims) > 1 else 1)
    return total, tied, len(tensors)


# ---------------------------------------------------------------- memory bandwidth

BANDWIDTH_SNIPPET = r"""
import json, sys, time, threading
import numpy as np
threads, gib, reps = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
a = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)  # touched, so every page is resident
out = {}
for t in sorted({1, threads}):
    chunks = np.array_split(a, t)
    best = float("inf")
    for _ in range(reps):
        res = [None] * t
        def work(i):
            res[i] = float(chunks[i].sum())  # numpy releases the GIL in the reduction
        ths = [threading.Thread(target=work, args=(i,)) for i in range(t)]
        t0 = time.perf_counter()
        for th in ths: th.start()
        for th in ths: th.join()
        best = min(best, time.perf_counter() - t0)
        assert abs(sum(res) - a.size) < 1e-3 * a.size
    out[str(t)] = a.nbytes / best / 1e9
print(json.dumps({"bytes": a.nbytes, "reps": reps, "gb_s_by_threads": out}))
"""


def measure_bandwidth(py, threads):
    r = subprocess.run([str(py), "-c", BANDWIDTH_SNIPPET, str(threads), "1", "5"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip()[-2000:])
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["method"] = "numpy float32 sum of a 1 GiB array, split over N Python threads, best of 5"
    d["gb_s"] = d["gb_s_by_threads"][str(threads)]
    return d


# ---------------------------------------------------------------- the two engines


def run_openlora(binary, model, a):
    cmd = [str(binary), "bench", "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
           "--repeat", str(a.repeat), "--threads", str(a.threads), "--model", str(model)]
    if not Path(binary).exists():
        return {"error": f"{binary} not found (cargo build --release -p openlora)", "command": shlex.join(cmd)}
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr.strip()[-2000:]}", "command": shlex.join(cmd)}
    d = last_json_line(r.stdout)
    d.update(command=shlex.join(cmd), wall_s=round(time.time() - t0, 2))
    return d


def run_llamacpp(py, model, a):
    cmd = [str(py), str(REPO / "bench" / "llamacpp_single.py"), "--model", str(model), "--threads", str(a.threads),
           "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--repeat", str(a.repeat)]
    if a.peer_flash_attn:
        cmd.append("--flash-attn")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr.strip()[-2000:]}", "command": shlex.join(cmd)}
    d = last_json_line(r.stdout)
    d.update(command=shlex.join(cmd), wall_s=round(time.time() - t0, 2))
    return d


# ---------------------------------------------------------------- report


def fmt(x, nd=1):
    return "n/a" if x is None else f"{x:,.{nd}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--openlora", default="target/release/openlora")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the cached SmolLM2-135M Q4_1)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "single_stream.json"))
    ap.add_argument("--peer-flash-attn", action="store_true",
                    help="enable flash attention in llama.cpp (llama-cpp-python's default is off)")
    a = ap.parse_args()
    if a.gen_tokens < 2 or a.prompt_tokens < 8:
        sys.exit("need --gen-tokens >= 2 and --prompt-tokens >= 8")
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)

    binary = resolve_binary(a.openlora)
    model = resolve_model(a, binary)
    if not model.exists():
        sys.exit(f"model {model} not found")
    py = ensure_venv()
    machine, commit = machine_info(), git_commit()

    mon = CpuMonitor()
    log(f"model {model}; threads {a.threads}; measuring memory bandwidth ...")
    try:
        bw = measure_bandwidth(py, a.threads)
    except Exception as e:  # noqa: BLE001 - report and go on
        bw = {"error": str(e)}
    wbytes, tied, n_tensors = bytes_per_decoded_token(model)
    roof = {"bytes_per_token": wbytes, "tied_embeddings": tied, "n_tensors": n_tensors,
            "bandwidth_gb_s": bw.get("gb_s"),
            "max_decode_tok_s": bw["gb_s"] * 1e9 / wbytes if bw.get("gb_s") else None}

    log("running llama.cpp (llama-cpp-python) ...")
    peer = run_llamacpp(py, model, a)
    log("running openlora ...")
    ours = run_openlora(binary, model, a)

    noise = mon.report()
    o_pre, o_dec = ours.get("prefill_tok_s"), ours.get("decode_tok_s")
    p_pre, p_dec = peer.get("prefill_tok_s"), peer.get("decode_tok_s")
    rows = [
        (f"prefill tok/s ({a.prompt_tokens}-token prompt)", o_pre, p_pre),
        (f"decode tok/s ({a.gen_tokens} tokens)", o_dec, p_dec),
    ]
    lines = ["| metric | openlora | llama.cpp | ratio (openlora / llama.cpp) |", "| --- | ---: | ---: | ---: |"]
    for name, o, p in rows:
        r = ratio(o, p)
        lines.append(f"| {name} | {fmt(o)} | {fmt(p)} | {'n/a' if r is None else f'{r:.2f}'} |")
    print("\n".join(lines))
    print()
    if roof["max_decode_tok_s"]:
        mx = roof["max_decode_tok_s"]
        share = ", ".join(f"{n} at {v / mx:.0%}" for n, v in (("openlora", o_dec), ("llama.cpp", p_dec)) if v)
        print(f"decode roofline: {wbytes / 1e6:.1f} MB of GGUF tensors read per token / {bw['gb_s']:.1f} GB/s "
              f"({a.threads}-thread read bandwidth; 1 thread: {bw['gb_s_by_threads']['1']:.1f} GB/s) "
              f"= {mx:,.0f} tok/s max ({share})")
    else:
        print(f"decode roofline: n/a (bandwidth: {bw.get('error')})")
    print(f"machine: {machine['nproc']} cores (nproc), {machine['cpu_model']}")
    print(f"llama.cpp: {peer.get('binding', 'n/a')}, threads {a.threads}, flash_attn {a.peer_flash_attn}, "
          f"timings from llama_perf_context")
    share = noise.get("other_processes_share")
    if share is not None:
        print(f"other load during the run: {noise['other_processes_cpu_s']:.1f} CPU-s by other processes "
              f"({share:.0%} of the machine), {noise['steal_cpu_s']:.1f} s stolen by the hypervisor")
        if share > 0.05 or noise["steal_cpu_s"] > 0.05 * noise["wall_s"]:
            print("WARNING: the machine was busy with other work during this run; the figures are not reliable "
                  "(llama.cpp's OpenMP threads suffer most when a core is taken). Run again on a quiet machine.")
    print(f"commit: {commit}")
    print(f"command: {command}")
    for name, d in (("openlora", ours), ("llama.cpp", peer)):
        if "error" in d:
            print(f"\n{name} FAILED: {d['error']}\n  ({d['command']})")

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "single_stream",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": commit,
        "machine": machine,
        "params": {"threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                   "repeat": a.repeat, "model": str(model), "peer_flash_attn": a.peer_flash_attn},
        "openlora": ours,
        "llama_cpp": peer,
        "ratios": {"prefill": ratio(o_pre, p_pre), "decode": ratio(o_dec, p_dec)},
        "bandwidth": bw,
        "other_load": noise,
        "roofline": roof,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return 1 if "error" in ours or "error" in peer else 0


if __name__ == "__main__":
    sys.exit(main())
