#!/usr/bin/env python3
"""The whole benchmark matrix in one command: openlora against llama.cpp and HF transformers + PEFT,
plus openlora with its plugins and receipts on against off, on this machine, in one run.

    python3 bench/run_all.py            # full matrix, ~20 min on a 2-core VM (+ ~15 min to build llama.cpp once)
    python3 bench/run_all.py --quick    # smoke version, ~5 min
    python3 bench/run_all.py --only single,concurrent --no-peft ...

Parts (--only / --skip take these names):
  bandwidth   memory read bandwidth (bench/bandwidth.rs, compiled here with rustc -O) and the decode
              roofline: GGUF tensor bytes read per decoded token / bandwidth = max single-stream tok/s
  single      single-stream prefill and decode: `openlora bench` vs llama.cpp's own `llama-bench`
              (pp512 / tg128: -p 512 -n 128 -r 3; --quick: -p 128 -n 32 -r 1), same GGUF, same
              threads; with --llamacpp-python also llama.cpp in process through llama-cpp-python
              (bench/llamacpp_single.py), the weaker peer
  concurrent  (a) against llama.cpp's C++ `llama-server` (32 slots, continuous batching, the 8
              synthetic adapters as GGUF LoRAs picked per request with its `lora` field, prompt
              cache off): 1, 8 and 32 requests in flight on the base model, 8 and 32 in flight
              over the 8 adapters mixed (request i on adapter i mod 8), unique ~35-token chat
              prompts, greedy, ignore_eos, 64 new tokens (--quick: 16), each workload on
              openlora (plugins + receipts on, and bare) and llama-server in one sitting;
              (b) openlora alone: 32 concurrent requests over 1, 8 and 100 adapters;
              (c) with --llamacpp-python, llama-cpp-python's Python server (serves one request at
              a time under a lock: the weaker peer) on 1 and 8 adapters (--quick: 8 only).
              Same client for all (bench/mixed_adapters.py)
  zipf        requests whose adapter is drawn from Zipf(1.1) over 1,000 adapters (openlora on / bare)
  prefix      a ~1,100-token shared system prompt on every request vs a unique one per request
              (openlora, plugins on): TTFT, and the prefix-cache hits from /metrics
  peft        mixed-adapter batched decode, batch 8 over 8 adapters: transformers + PEFT
              (bench/peft_mixed_batch.py) vs `openlora bench --batch 8`
  inference_perf  the Gateway API Inference Extension's benchmark tool, inference-perf 0.7.0
              (bench/inference_perf.py, its own venv), against `openlora serve` (bare): a constant
              2 req/s for 30 s (--quick: 1 req/s for 20 s) of streaming completions with
              `lora_traffic_split` 0.5 / 0.5 over synth00 and synth01; fails on any failed request

Every server listens on 127.0.0.1 only and is stopped on exit (also on Ctrl-C / SIGTERM); every
request loop is bounded in count and in time (--timeout per workload, --max-minutes over the
measurements, counted after the build and the setup of missing environments: parts that would start
later are skipped and listed as such). Peak RSS: VmHWM of each server process
just before it stops (covering every workload it served), ru_maxrss of the in-process peers.

Output: a markdown report on stdout and in bench/results/run_all.md (tables of figures and ratios,
the machine, the commit, the date, the exact command), the raw figures in
bench/results/run_all.json; --write-benchmarks also replaces the "Full comparison (one command)"
section of BENCHMARKS.md with the report. Environments are made when absent, in
$OPENLORA_CACHE (default ~/.cache/openlora): the model (`openlora fetch`), llamacpp-bin
(llama.cpp's llama-server and llama-bench, built with CMake from the llama.cpp tree vendored in
the llama-cpp-python 0.3.36 sdist, ~15 min on 2 cores; harness.ensure_llamacpp_bin), venv-llamacpp
(only with --llamacpp-python: pip install llama-cpp-python[server], compiles ~10 min), venv-ref (torch transformers peft gguf
numpy safetensors tokenizers), venv-inference-perf (pip install inference-perf==0.7.0, python 3.12),
smollm2-hf, and the synthetic adapters under bench-adapters/.

Only the standard library; the peers run in their venvs' pythons.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness as H  # noqa: E402
import inference_perf  # noqa: E402
import mixed_adapters  # noqa: E402
import single_stream  # noqa: E402
from serve_llamacpp import LlamaCppServer  # noqa: E402

REPO = H.REPO
PARTS = ["bandwidth", "single", "concurrent", "zipf", "prefix", "peft", "inference_perf"]

FULL = dict(prompt_tokens=512, gen_tokens=128, repeat=3,
            conc_requests=32, conc_max_tokens=64, conc_sets=[1, 8, 100], llama_sets=[1, 8],
            llama_requests=32, zipf_requests=256, zipf_max_tokens=32,
            prefix_requests=32, prefix_concurrency=8, prefix_max_tokens=16, system_words=800,
            peft_steps=32, peft_repeat=2, peft_check=True, iperf=inference_perf.FULL,
            peer_base_inflight=[1, 8, 32], peer_mixed_inflight=[8, 32], peer_max_tokens=64, peer_waves=2,
            peer_min_requests=8)
QUICK = dict(prompt_tokens=128, gen_tokens=32, repeat=1,
             conc_requests=32, conc_max_tokens=16, conc_sets=[1, 8, 100], llama_sets=[8],
             llama_requests=8, zipf_requests=64, zipf_max_tokens=16,
             prefix_requests=8, prefix_concurrency=4, prefix_max_tokens=8, system_words=800,
             peft_steps=8, peft_repeat=1, peft_check=False, iperf=inference_perf.QUICK,
             peer_base_inflight=[1, 8, 32], peer_mixed_inflight=[8, 32], peer_max_tokens=16, peer_waves=1,
             peer_min_requests=2)


class Budget:
    def __init__(self, minutes: float):
        self.t0, self.limit = time.time(), minutes * 60

    def left(self) -> float:
        return self.limit - (time.time() - self.t0)

    def ok(self, what: str, skipped: list) -> bool:
        if self.left() > 0:
            return True
        skipped.append(f"{what}: --max-minutes reached")
        H.log(f"skipping {what}: the time budget (--max-minutes) is spent")
        return False


# ---------------------------------------------------------------- parts


def part_bandwidth(a, model: Path, res: dict) -> None:
    tools = REPO / "target" / "bench-tools"
    tools.mkdir(parents=True, exist_ok=True)
    exe = tools / "bandwidth"
    src = HERE / "bandwidth.rs"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        cmd = ["rustc", "-O", "-C", "target-cpu=native", "--edition", "2021", str(src), "-o", str(exe)]
        H.log("compiling: " + shlex.join(cmd))
        subprocess.run(cmd, check=True, cwd=REPO)
    r = H.run_measured([str(exe), "--mib", "1024", "--threads", str(a.threads), "--reps", "7"], timeout=120)
    if r["rc"] != 0:
        res["bandwidth"] = {"error": r["stderr"][-2000:], "command": r["command"]}
        return
    bw = H.last_json_line(r["stdout"])
    bw["method"] = (f"bench/bandwidth.rs (rustc -O -C target-cpu=native): {a.threads} threads each sum their "
                    "share of a 1 GiB u64 buffer (vectorised), best of 7 passes")
    bw["command"] = r["command"]
    res["bandwidth"] = bw
    wbytes, tied, n_tensors = single_stream.bytes_per_decoded_token(model)
    roof = {"bytes_per_token": wbytes, "tied_embeddings": tied, "n_tensors": n_tensors,
            "bytes_source": "GGUF tensor table read by the built-in parser in bench/single_stream.py "
                            "(every tensor's size from its type and shape; a tied token_embd counts once, "
                            "it is read in full as the LM head); KV cache and activations not counted",
            "bandwidth_gb_s": bw["gb_s"], "max_decode_tok_s": round(bw["gb_s"] * 1e9 / wbytes, 1)}
    ref_py = H.cache_dir() / "venv-ref" / "bin" / "python"
    if ref_py.exists():  # cross-check with the gguf package, when the reference venv has it
        chk = subprocess.run([str(ref_py), "-c", "import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); "
                              "print(sum(int(t.n_bytes) for t in r.tensors))", str(model)],
                             capture_output=True, text=True)
        if chk.returncode == 0 and chk.stdout.strip().isdigit():
            roof["gguf_package_tensor_bytes"] = int(chk.stdout.strip())
    roof["gguf_file_bytes"] = model.stat().st_size
    res["roofline"] = roof


def part_single(a, s, binary: Path, model: Path, res: dict) -> None:
    out = {}
    cmd = [str(binary), "bench", "--prompt-tokens", str(s["prompt_tokens"]), "--gen-tokens", str(s["gen_tokens"]),
           "--repeat", str(s["repeat"]), "--threads", str(a.threads), "--model", str(model),
           "--cpu-activations", a.cpu_activations]
    out["openlora"] = _measured_json(cmd, a.timeout)
    if a.peers:
        out["llama_bench"] = llama_bench(a, s, model)
    if a.peers and a.llamacpp_python:
        py = H.ensure_venv_llamacpp()
        cmd = [str(py), str(HERE / "llamacpp_single.py"), "--model", str(model), "--threads", str(a.threads),
               "--prompt-tokens", str(s["prompt_tokens"]), "--gen-tokens", str(s["gen_tokens"]),
               "--repeat", str(s["repeat"])]
        out["llama_cpp"] = _measured_json(cmd, a.timeout)
    res["single_stream"] = out


def llama_bench(a, s, model: Path) -> dict:
    """llama.cpp's own benchmark: `llama-bench -m MODEL -p N -n M -t T -r R -o json` (pp N: one
    N-token batch into an empty KV cache; tg M: M single-token decodes from an empty cache; its
    defaults otherwise: n_batch 2048, n_ubatch 512, flash attention auto). Headline: the best of
    the R repetitions (like `openlora bench`'s best of --repeat); the mean and stddev stay beside."""
    exe = H.ensure_llamacpp_bin()["llama-bench"]
    pt, gt = s["prompt_tokens"], s["gen_tokens"]
    cmd = [str(exe), "-m", str(model), "-p", str(pt), "-n", str(gt), "-t", str(a.threads), "-r", str(s["repeat"]),
           "-o", "json"]

    def once():
        mon = H.CpuMonitor()
        r = H.run_measured(cmd, timeout=a.timeout)
        load = mon.report()
        base = {"command": r["command"], "machine_load": load}
        if r["timed_out"]:
            return dict(base, error=f"timed out after {a.timeout:.0f} s (killed; --timeout)")
        if r["rc"] != 0:
            return dict(base, error=f"exit {r['rc']}: {r['stderr'][-2000:]}")
        try:
            rows = json.loads(r["stdout"])
            pp = next(x for x in rows if x["n_prompt"] == pt and x["n_gen"] == 0)
            tg = next(x for x in rows if x["n_gen"] == gt and x["n_prompt"] == 0)
        except (ValueError, StopIteration, KeyError, TypeError) as e:
            return dict(base, error=f"unexpected llama-bench output ({type(e).__name__}: {e}): {r['stdout'][-1000:]}")
        return dict(base, engine="llama.cpp llama-bench", build_commit=pp.get("build_commit"),
                    cpu_info=pp.get("cpu_info"), threads=pp.get("n_threads"), flash_attn=pp.get("flash_attn"),
                    n_batch=pp.get("n_batch"), n_ubatch=pp.get("n_ubatch"), type_k=pp.get("type_k"),
                    prompt_tokens=pt, gen_tokens=gt, repeat=s["repeat"],
                    prefill_tok_s=round(max(pp["samples_ts"]), 2), decode_tok_s=round(max(tg["samples_ts"]), 2),
                    prefill_tok_s_mean=round(pp["avg_ts"], 2), prefill_tok_s_stddev=round(pp["stddev_ts"], 2),
                    decode_tok_s_mean=round(tg["avg_ts"], 2), decode_tok_s_stddev=round(tg["stddev_ts"], 2),
                    wall_s=r["wall_s"], peak_rss_mib=r["peak_rss_mib"])

    return measured(once, "llama-bench")


QUIET = {"max_wait": 0.0, "retries": 0}


def settle(rec: dict | None = None) -> dict | None:
    """With --wait-quiet S: wait up to S seconds for the machine to be idle before a measurement."""
    if QUIET["max_wait"] <= 0:
        return None
    q = H.wait_quiet(QUIET["max_wait"])
    if not q["quiet"]:
        H.log(f"  (the machine did not become idle within {QUIET['max_wait']:.0f} s; measuring anyway)")
    return q


def measured(fn, what: str) -> dict:
    """fn() -> a result with "machine_load". With --wait-quiet, waits for an idle machine first and
    runs again (up to --retries times) when other processes took more than 5% of the machine during
    the measurement, keeping the least disturbed attempt."""
    best = None
    for attempt in range(1 + (QUIET["retries"] if QUIET["max_wait"] > 0 else 0)):
        quiet = settle()
        r = fn()
        r["quiet_wait"], r["attempt"] = quiet, attempt + 1
        ld = r.get("machine_load", {})
        if best is None or ld.get("other_processes_share", 1) < best["machine_load"].get("other_processes_share", 1):
            best = r
        if not ld.get("disturbed"):
            break
        H.log(f"  {what}: other processes took {ld.get('other_processes_share', 0):.0%} of the machine, "
              f"{ld.get('steal_cpu_s', 0)} CPU-s stolen by the hypervisor"
              + ("; running again" if QUIET["max_wait"] > 0 and attempt < QUIET["retries"] else ""))
    return best


def _measured_json(cmd: list[str], timeout: float) -> dict:
    def once():
        mon = H.CpuMonitor()
        r = H.run_measured(cmd, timeout=timeout)
        load = mon.report()
        if r["timed_out"]:
            return {"error": f"timed out after {timeout:.0f} s (killed; --timeout)", "command": r["command"],
                    "machine_load": load}
        if r["rc"] != 0:
            return {"error": f"exit {r['rc']}: {r['stderr'][-2000:]}", "command": r["command"], "machine_load": load}
        d = H.last_json_line(r["stdout"])
        d.pop("runs", None)
        d.update(command=r["command"], wall_s=r["wall_s"], peak_rss_mib=r["peak_rss_mib"], machine_load=load)
        return d

    return measured(once, Path(cmd[1] if "python" in cmd[0] else cmd[0]).name)


def client(url: str, names: list[str], label: str, timeout: float, **kw) -> dict:
    argv = ["--url", url, "--adapters", ",".join(names), "--timeout", str(timeout), "--label", label]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not False and v is not None:
            argv += [flag, str(v)]
    cmd = "python3 bench/mixed_adapters.py " + shlex.join(argv)
    try:
        summary, _ = mixed_adapters.run_client(argv)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - one failed workload should not end the run
        H.log(f"  client failed: {e}")
        return {"error": f"{type(e).__name__}: {e}", "client_command": cmd, "ttft_ms": {}, "itl_ms": {},
                "tokens_per_s": None}
    summary["client_command"] = cmd
    return summary


def metric(m: dict, name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


PEER_KEYS = ("peer_base_c1", "peer_base_c8", "peer_base_c32", "peer_mix8_c8", "peer_mix8_c32")


def peer_workloads(s) -> list[tuple[str, int, bool]]:
    """(key, requests in flight, over the 8 adapters mixed) of the llama-server comparison."""
    return ([(f"peer_base_c{n}", n, False) for n in s["peer_base_inflight"]]
            + [(f"peer_mix8_c{n}", n, True) for n in s["peer_mixed_inflight"]])


def workload_specs(a, s, names: dict) -> list[tuple[str, dict, str]]:
    """(key, client arguments, which servers: "all" incl. llama-server, "openlora" both openlora
    servers, "on" the plugins-on one only) for each HTTP workload selected."""
    specs = []
    if "concurrent" in a.parts:
        for key, n, mixed in peer_workloads(s):
            # every request (and warm-up request) unique from its first tokens; EOS ignored so
            # that every request makes max_tokens tokens on both engines
            specs.append((key, dict(adapters=names["synth8"] if mixed else [H.BASE_MODEL_NAME],
                                    requests=max(s["peer_min_requests"], s["peer_waves"] * n), concurrency=n,
                                    max_tokens=s["peer_max_tokens"], unique_prompts=True,
                                    extra_body=json.dumps({"ignore_eos": True})), "all"))
        for n in s["conc_sets"]:
            ads = names["synth8"][:n] if n <= 8 else names["synth100"][:n]
            specs.append((f"c32_a{n}", dict(adapters=ads, requests=s["conc_requests"], concurrency=32,
                                            max_tokens=s["conc_max_tokens"]), "openlora"))
    if "zipf" in a.parts:
        specs.append(("zipf1000", dict(adapters=names["synth1k"], requests=s["zipf_requests"], concurrency=32,
                                       max_tokens=s["zipf_max_tokens"], warmup=0, adapter_dist="zipf",
                                       zipf_s=a.zipf_s, seed=0), "openlora"))
    if "prefix" in a.parts:
        for case, unique in (("prefix_shared", False), ("prefix_unique", True)):
            # the client's warm-up (one request, with the shared system prompt when shared) is
            # inside the counter window
            specs.append((case, dict(adapters=[H.BASE_MODEL_NAME], requests=s["prefix_requests"],
                                     concurrency=s["prefix_concurrency"], max_tokens=s["prefix_max_tokens"],
                                     system_prompt_words=s["system_words"], unique_system=unique, seed=1), "on"))
    return specs


# Prometheus counters (their samples carry a _total suffix and labels; summed over labels)
COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "openlora_prefill_tokens_computed_total",
            "openlora_adapter_tier_hits_total", "openlora_adapter_tier_misses_total",
            "openlora_adapter_evictions_total")


def run_workload(a, srv, key: str, spec: dict) -> dict:
    spec = dict(spec)
    ads = spec.pop("adapters")
    if isinstance(srv, H.LlamaServer):
        # llama-server: one model ("base"); an adapter is its LoRA id in the per-request `lora` field
        ads = ["base" if x == H.BASE_MODEL_NAME else x for x in ads]
        missing = [x for x in ads if x != "base" and x not in srv.lora_ids]
        if missing:
            raise RuntimeError(f"llama-server has no LoRA for {missing}")
        spec.update(lora_ids=",".join(f"{k}={v}" for k, v in srv.lora_ids.items()), served_model=srv.served_model)
    counters = getattr(srv, "counters", COUNTERS)

    def once():
        m0 = srv.metrics()
        mon = H.CpuMonitor([srv.proc.pid])
        r = client(srv.url, ads, srv.label, a.timeout, **spec)
        m1 = srv.metrics()
        r["machine_load"] = mon.report()
        r["metrics_delta"] = {k: metric(m1, k) - metric(m0, k) for k in counters}
        return r

    r = measured(once, f"{srv.label} {key}")
    r["server_peak_rss_mib_so_far"] = srv.peak_rss_mib()
    H.log(f"  {srv.label}: {key}: {r['tokens_per_s']} tok/s, TTFT p50 {r['ttft_ms'].get('p50')} ms"
          + (f" (other processes took {r['machine_load']['other_processes_share']:.0%})"
             if r["machine_load"].get("disturbed") else ""))
    return r


def part_servers(a, s, budget, skipped, binary: Path, model: Path, names: dict, dirs: list[Path],
                 loras: list[Path], res: dict) -> None:
    """Both openlora servers (plugins + receipts on, and bare) and, for the `concurrent` part,
    llama.cpp's llama-server (`loras`: the GGUF LoRAs of synth8) run side by side, idle but for the
    one under load; every workload runs on one and at once on the others (the order reverses from
    one workload to the next), so that they see the same conditions (page cache, other load)."""
    modes = [("openlora_on", False)] + ([("openlora_off", True)] if a.bare else [])
    with contextlib.ExitStack() as stack:
        srvs = {}
        for key, bare in modes:
            srv = stack.enter_context(H.OpenloraServer(binary, dirs, bare=bare, threads=a.threads, kv_cache_mib=1024,
                                                          cpu_activations=a.cpu_activations))
            H.log(f"{srv.label} on {srv.url} (started in {srv.startup_s} s)")
            srvs[key] = srv
            res["servers"][key] = {"engine": srv.label, "threads": a.threads, "startup_s": srv.startup_s,
                                   "deployment_toml": srv.config.read_text(), "workloads": {}}
        if loras:
            srv = stack.enter_context(H.LlamaServer(H.ensure_llamacpp_bin()["llama-server"], model, loras,
                                                    threads=a.threads, slots=32, ctx_per_slot=512))
            H.log(f"{srv.label} on {srv.url} (started in {srv.startup_s} s)")
            srvs["llama_server"] = srv
            res["servers"]["llama_server"] = {"engine": srv.label, "threads": a.threads, "startup_s": srv.startup_s,
                                              "command": shlex.join(srv.argv), "settings": srv.settings,
                                              "build": H.llamacpp_build_info(), "workloads": {}}
        for j, (wkey, spec, targets) in enumerate(workload_specs(a, s, names)):
            order = list(srvs.items())
            if j % 2:  # alternate which goes first
                order.reverse()
            for key, srv in order:
                if key == "llama_server" and targets != "all":
                    continue
                if targets == "on" and key != "openlora_on":
                    continue
                if not budget.ok(f"{srv.label} {wkey}", skipped):
                    break
                res["servers"][key]["workloads"][wkey] = run_workload(a, srv, wkey, spec)
        for key, srv in srvs.items():
            res["servers"][key]["peak_rss_mib"] = srv.peak_rss_mib()
            res["servers"][key]["cpu_s"] = H.proc_cpu_seconds(srv.proc.pid)


def part_llamacpp_python_server(a, s, budget, skipped, model: Path, names: dict, adapters_dir: Path, res: dict) -> None:
    py = H.ensure_venv_llamacpp()
    ref_py = H.ensure_venv_ref()
    n_max = max(s["llama_sets"])
    ggufs = H.ensure_gguf_loras(ref_py, adapters_dir, names["synth8"][:n_max],
                                H.cache_dir() / "bench-adapters" / "synth8-gguf", model)
    version = subprocess.run([str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    label = f"llama-cpp-python {version} server (weaker peer)"
    w = {}
    with LlamaCppServer(model, ggufs, port=H.free_port(), threads=a.threads, n_ctx=1024, python=str(py)) as srv:
        H.log(f"{label} on {srv.url}")
        for n in s["llama_sets"]:
            if not budget.ok(f"llama.cpp c32/{n} adapters", skipped):
                break
            def once():
                mon = H.CpuMonitor([srv.proc.pid])
                t_start = time.time()
                r = client(srv.url, names["synth8"][:n], label, a.timeout, requests=s["llama_requests"],
                           concurrency=32, max_tokens=s["conc_max_tokens"])
                r["machine_load"] = mon.report()
                loads = [x for x in srv.loads() if x["t"] >= r.get("started_unix", t_start)]
                r["model_reloads_timed"] = len(loads)
                r["model_reload_s_timed"] = round(sum(x["load_s"] for x in loads), 3)
                return r

            r = measured(once, f"{label} c32_a{n}")
            r["server_peak_rss_mib_so_far"] = H.peak_rss_mib(srv.proc.pid)
            w[f"c32_a{n}"] = r
            H.log(f"  {label}: {s['llama_requests']} requests (32 max in flight) over {n} adapters: "
                  f"{r['tokens_per_s']} tok/s")
        rss = H.peak_rss_mib(srv.proc.pid)
    res["servers"]["llama_cpp"] = {"engine": label, "threads": a.threads,
                                   "settings": {"n_ctx": 1024, "logits_all": False, "interrupt_requests": False,
                                                "cache": False, "adapters": "GGUF LoRA per model entry "
                                                "(bench/peft_to_gguf_lora.py)"},
                                   "workloads": w, "peak_rss_mib": rss}


def part_peft(a, s, binary: Path, model: Path, res: dict) -> None:
    out = {}
    cmd = [str(binary), "bench", "--threads", str(a.threads), "--batch", "8", "--lora-rank", "8",
           "--steps", str(s["peft_steps"]), "--repeat", str(max(1, s["peft_repeat"])), "--model", str(model)]
    out["openlora"] = _measured_json(cmd, a.timeout)
    if a.peers:
        ref_py = H.ensure_venv_ref()
        hf = H.ensure_hf_model(ref_py, model)
        cmd = [str(ref_py), str(HERE / "peft_mixed_batch.py"), "--batch", "8", "--lora-rank", "8",
               "--steps", str(s["peft_steps"]), "--repeat", str(s["peft_repeat"]), "--threads", str(a.threads),
               "--model", str(hf)] + ([] if s["peft_check"] else ["--no-check"])
        out["peft"] = _measured_json(cmd, 2 * a.timeout)  # torch suffers most from other load
    res["peft_batch"] = out


def part_inference_perf(a, s, binary: Path, model: Path, res: dict) -> None:
    """inference-perf (bench/inference_perf.py) on its own bare openlora server, synth8's first two
    adapters split 0.5 / 0.5."""
    ads_dir = H.cache_dir() / "bench-adapters" / "synth8"
    names = H.ensure_synth8(H.ensure_venv_ref(), ads_dir)
    try:
        r = inference_perf.run(binary, [ads_dir], names[:2], timeout=a.timeout, threads=a.threads, bare=True,
                               model=model, **s["iperf"])
    except Exception as e:  # noqa: BLE001 - one failed part should not end the run
        r = {"error": f"{type(e).__name__}: {e}"}
    r["driver_command"] = "python3 bench/inference_perf.py" + (" --quick" if a.quick else "")
    res["inference_perf"] = r
    sm = r.get("summary") or {}
    H.log(f"  inference-perf: {sm.get('successes')} ok / {sm.get('failures')} failed, "
          f"{sm.get('output_tok_s')} output tok/s, TTFT p50 {g(sm, 'ttft_ms', 'median')} ms"
          + (f"; ERROR {r['error'][:300]}" if r.get("error") else ""))


# ---------------------------------------------------------------- report


def f(x, nd=1, unit=""):
    if x is None:
        return "n/a"
    return f"{x:,.{nd}f}{unit}"


def rat(x, y):
    return f"{x / y:.2f}x" if x and y else "n/a"


def g(d: dict, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def mark(d) -> str:
    return "\\*" if isinstance(d, dict) and g(d, "machine_load", "disturbed") else ""


def report(res: dict) -> str:
    cmd = res["command"]
    L = []
    m, load = res["machine"], res["other_load"]
    L.append(f"Machine: {m['cpu_model']}, {m['nproc']} cores, {m['mem_total_gib']} GiB; commit `{res['commit']}`; "
             f"{res['date']}; mode `{res['mode']}`; total {res['wall_s']:.0f} s; openlora's CPU activations: "
             f"{res['settings'].get('cpu_activations', 'f32')} (the PEFT part always f32, as its peer).")
    L.append(f"Command: `{cmd}` (every figure below comes from this one run; raw figures: "
             f"`{res.get('json', 'bench/results/run_all.json')}`).")
    share = load.get("other_processes_share")
    loads = [(p, d["machine_load"]) for p, d in _walk(res) if isinstance(d, dict) and "machine_load" in d
             and isinstance(d["machine_load"], dict) and "disturbed" in d["machine_load"]]
    noisy = [p for p, ld in loads if ld["disturbed"]]
    if share is not None:
        L.append(f"Other processes took {share:.0%} of the machine over the whole run "
                 f"({load['other_processes_cpu_s']:.0f} CPU-s, {load['steal_cpu_s']:.0f} s stolen; waits for a quiet "
                 f"machine included); during {len(noisy)} of the {len(loads)} measurements they took more than 5%"
                 + (" (marked \\* below): **the machine was shared, those figures are noisy**; run again on a quiet "
                    "machine (`--wait-quiet 300` waits for one before each measurement)." if noisy else "."))
    L.append("")

    bw, roof, ss = res.get("bandwidth"), res.get("roofline"), res.get("single_stream")
    if ss or roof:
        o, lb, p = (ss or {}).get("openlora", {}), (ss or {}).get("llama_bench", {}), (ss or {}).get("llama_cpp", {})
        pt, gt = res["settings"]["prompt_tokens"], res["settings"]["gen_tokens"]
        if ss:
            peers = ([("llama.cpp `llama-bench`", "llama-bench", lb)] if lb else []) + \
                    ([("llama-cpp-python in process (weaker peer)", "llama-cpp-python", p)] if p else [])
            L.append(f"**Single stream** ({res['settings']['threads']} threads, same GGUF; part `single`"
                     + (f"; llama.cpp's own `llama-bench -p {pt} -n {gt}` (pp{pt}: one {pt}-token batch into an empty "
                        f"KV cache; tg{gt}: {gt} single-token decodes; best of its repetitions, like openlora's best "
                        "of --repeat)" if lb else "")
                     + ("; llama-cpp-python in process, the weaker peer: its `llama_perf_context` timings" if p else "")
                     + ")")
            L.append("")
            L.append("| metric | openlora | " + "".join(f"{n} | openlora / {short} | " for n, short, _ in peers)
                     + "roofline (max) |")
            L.append("| --- | ---: | " + "---: | ---: | " * len(peers) + "---: |")
            mx = g(roof or {}, "max_decode_tok_s")

            def row(name, key, last=""):
                cells = [f"{f(o.get(key))}{mark(o)}"]
                for _, _, d in peers:
                    cells += [f"{f(d.get(key))}{mark(d)}", rat(o.get(key), d.get(key))]
                return f"| {name} | " + " | ".join(cells) + f" | {last} |"

            L.append(row(f"prefill tok/s ({pt}-token prompt" + (f"; llama-bench pp{pt})" if lb else ")"),
                         "prefill_tok_s"))
            L.append(row(f"decode tok/s ({gt} tokens" + (f"; llama-bench tg{gt})" if lb else ")"), "decode_tok_s",
                         f(mx, 0) if mx else ""))
            if mx:
                def share(d):
                    return f"{100 * d['decode_tok_s'] / mx:.0f}%" if d.get("decode_tok_s") else "n/a"
                L.append(f"| decode, share of the roofline | {share(o)} | "
                         + "".join(f"{share(d)} | | " for _, _, d in peers) + "100% |")
            L.append(f"| peak RSS MiB | {f(o.get('peak_rss_mib'), 0)} | "
                     + "".join(f"{f(d.get('peak_rss_mib'), 0)} | | " for _, _, d in peers) + " |")
            L.append("")
            if lb.get("prefill_tok_s_mean"):
                L.append(f"llama-bench means ± stddev over its {lb.get('repeat')} repetitions: pp{pt} "
                         f"{f(lb['prefill_tok_s_mean'])} ± {f(lb.get('prefill_tok_s_stddev'))}, tg{gt} "
                         f"{f(lb.get('decode_tok_s_mean'))} ± {f(lb.get('decode_tok_s_stddev'))} tok/s (build "
                         f"{lb.get('build_commit')}, flash_attn {lb.get('flash_attn')} = auto, n_ubatch "
                         f"{lb.get('n_ubatch')}, KV {lb.get('type_k')}); command `{lb.get('command')}`.")
                L.append("")
        if roof and bw and "gb_s" in bw:
            L.append(f"Roofline (part `bandwidth`): {roof['bytes_per_token'] / 1e6:.1f} MB of weights read per decode "
                     f"step (GGUF tensor bytes, tied embedding counted once"
                     + (f"; the `gguf` package sums {roof['gguf_package_tensor_bytes'] / 1e6:.1f} MB"
                        if roof.get("gguf_package_tensor_bytes") else "")
                     + f") / {bw['gb_s']:.1f} GB/s measured read bandwidth (best of {bw['threads']}-thread passes "
                     f"{min(bw['passes_gb_s']):.1f}-{max(bw['passes_gb_s']):.1f} GB/s; 1 thread "
                     f"{bw['gb_s_1_thread']:.1f} GB/s; bench/bandwidth.rs) = {roof['max_decode_tok_s']:,.0f} tok/s.")
            L.append("")

    srv = res.get("servers", {})
    on, off, ll = srv.get("openlora_on", {}), srv.get("openlora_off", {}), srv.get("llama_cpp", {})
    ls = srv.get("llama_server", {})

    def lat(d):
        if not d:
            return "n/a"
        t, i = d.get("ttft_ms", {}), d.get("itl_ms", {})
        return f"{f(t.get('p50'), 0)} / {f(t.get('p99'), 0)}, {f(i.get('p50'))} / {f(i.get('p99'))}"

    pk = [k for k in PEER_KEYS if any(k in d.get("workloads", {}) for d in (on, off, ls))]
    if pk:
        st = res["settings"]
        lw = g(ls, "settings") or {}
        wl0 = next((g(d, "workloads", pk[0]) for d in (off, on, ls) if g(d, "workloads", pk[0])), {})
        L.append(f"**Against llama.cpp's `llama-server`**, generated tok/s (part `concurrent`; streaming chat, "
                 f"greedy, ignore_eos, max_tokens {st['peer_max_tokens']}, unique prompts "
                 f"(~{f(wl0.get('prompt_tokens_mean'), 0)} tokens, a per-request tag first); "
                 f"{st['peer_waves']} wave(s) of requests per workload, at least {st['peer_min_requests']}; "
                 f"mixed: request i on adapter i mod 8 (synth00-07, rank 8, all 7 projections; GGUF LoRAs for "
                 f"llama-server, loaded at start and picked per request with its `lora` field); llama-server: "
                 f"{lw.get('slots', 'n/a')} slots x {lw.get('ctx_per_slot', 'n/a')} tokens of KV, continuous "
                 f"batching, prompt cache off; same threads ({st['threads']}); all servers up side by side)")
        L.append("")
        L.append("| workload | requests | openlora bare | openlora (plugins + receipts) | llama-server | "
                 "bare / llama-server | plugins on / llama-server |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        def peer_name(k):
            return f"{'8 adapters mixed' if '_mix8_' in k else 'base model'}, {k.rsplit('_c', 1)[1]} in flight"

        for k in pk:
            a_, b_, c_ = (g(d, "workloads", k, "tokens_per_s") for d in (off, on, ls))
            nreq = next((g(d, "workloads", k, "requests") for d in (off, on, ls) if g(d, "workloads", k)), None)
            L.append(f"| {peer_name(k)} | {nreq} | {f(a_)}{mark(g(off, 'workloads', k))} | {f(b_)}{mark(g(on, 'workloads', k))} | "
                     f"{f(c_)}{mark(g(ls, 'workloads', k))} | {rat(a_, c_)} | {rat(b_, c_)} |")
        L.append("")
        L.append("Latency (ms): TTFT p50 / p99, inter-token p50 / p99")
        L.append("")
        L.append("| workload | openlora bare | openlora (plugins + receipts) | llama-server |")
        L.append("| --- | --- | --- | --- |")
        for k in pk:
            L.append(f"| {peer_name(k)} | {lat(g(off, 'workloads', k))} | {lat(g(on, 'workloads', k))} | "
                     f"{lat(g(ls, 'workloads', k))} |")
        L.append("")
        if ls:
            L.append("llama-server batches only slots whose LoRA scales are equal into one decode step, so with the 8 "
                     "adapters mixed each step serves one adapter's requests while the others wait; openlora's steps "
                     "mix adapters. Command: `" + str(ls.get("command", "")).replace(H.cache_dir().as_posix(), "<cache>")
                     + "`" + (f" ({ls['build'].get('version', '').splitlines()[0]}, built from the llama.cpp vendored "
                              f"in llama-cpp-python 0.3.36)" if ls.get("build", {}).get("version") else "") + ".")
            L.append("")

    wl = [k for k in ("c32_a1", "c32_a8", "c32_a100", "zipf1000")
          if k in on.get("workloads", {}) or k in off.get("workloads", {}) or k in ll.get("workloads", {})]
    if wl:
        st = res["settings"]
        L.append(f"**openlora over many adapters**, generated tok/s (parts `concurrent`, `zipf`; streaming chat, greedy; "
                 f"c32 = {st['conc_requests']} requests all in flight, max_tokens {st['conc_max_tokens']}, "
                 f"request i on adapter i mod n"
                 + (f"; llama-cpp-python's Python server, the weaker peer: {st['llama_requests']} requests" if ll else "")
                 + f"; Zipf: {st['zipf_requests']} requests, 32 in flight, max_tokens {st['zipf_max_tokens']})")
        L.append("")
        L.append("| workload | openlora (plugins + receipts) | openlora bare | on / bare |"
                 + (" llama-cpp-python server (weaker peer) | openlora / llama-cpp-python |" if ll else ""))
        L.append("| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if ll else ""))
        names = {"c32_a1": "c32, 1 adapter", "c32_a8": "c32, 8 adapters", "c32_a100": "c32, 100 adapters",
                 "zipf1000": f"Zipf({res['settings']['zipf_s']}), 1,000 adapters"}
        for k in wl:
            a_ = g(on, "workloads", k, "tokens_per_s")
            b_ = g(off, "workloads", k, "tokens_per_s")
            c_ = g(ll, "workloads", k, "tokens_per_s")
            L.append(f"| {names[k]} | {f(a_)}{mark(g(on, 'workloads', k))} | {f(b_)}{mark(g(off, 'workloads', k))} | "
                     f"{rat(a_, b_)} |" + (f" {f(c_)}{mark(g(ll, 'workloads', k))} | {rat(a_, c_)} |" if ll else ""))
        L.append("")
        L.append("Latency (ms): TTFT p50 / p99, inter-token p50 / p99")
        L.append("")
        L.append("| workload | openlora (plugins + receipts) | openlora bare |" + (" llama-cpp-python server |" if ll else ""))
        L.append("| --- | --- | --- |" + (" --- |" if ll else ""))
        for k in wl:
            L.append(f"| {names[k]} | {lat(g(on, 'workloads', k))} | {lat(g(off, 'workloads', k))} |"
                     + (f" {lat(g(ll, 'workloads', k))} |" if ll else ""))
        L.append("")
        z = g(on, "workloads", "zipf1000", "metrics_delta")
        if z:
            L.append(f"Zipf run, openlora adapter tiers (device + host, from /metrics): "
                     f"{z.get('openlora_adapter_tier_hits_total', 0):.0f} hits, "
                     f"{z.get('openlora_adapter_tier_misses_total', 0):.0f} misses, "
                     f"{z.get('openlora_adapter_evictions_total', 0):.0f} evictions; "
                     f"{g(on, 'workloads', 'zipf1000', 'distinct_adapters_used')} distinct adapters requested.")
            L.append("")
        c8 = g(ll, "workloads", "c32_a8")
        if c8:
            L.append(f"llama-cpp-python's Python server (the weaker peer, not what llama.cpp users run for serving) "
                     f"runs one request at a time and rebuilds its model whenever the adapter "
                     f"changes ({c8.get('model_reloads_timed')} reloads, {c8.get('model_reload_s_timed')} s, in the "
                     "8-adapter run); openlora batches all requests, every step mixing adapters.")
            L.append("")
    if any(mark(g(d, "workloads", k)) for d in (on, off, ll, ls) for k in (*wl, *pk)):
        L.append("\\* other processes took more than 5% of the machine during this measurement.")
        L.append("")

    pre = [(k, g(on, "workloads", k)) for k in ("prefix_shared", "prefix_unique")]
    if any(v for _, v in pre):
        st = res["settings"]
        L.append(f"**Long shared system prompt** (part `prefix`; openlora, plugins + receipts; "
                 f"{st['prefix_requests']} requests, {st['prefix_concurrency']} in flight, max_tokens "
                 f"{st['prefix_max_tokens']}, base model; counters from /metrics over the run incl. one warm-up)")
        L.append("")
        L.append("| system prompt | prompt tokens / request | TTFT p50 / p99 ms | tok/s | prefix-cache hit tokens | prompt tokens computed |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for k, v in pre:
            if not v:
                continue
            md = v.get("metrics_delta", {})
            hits = md.get("vllm:prefix_cache_hits_total")
            comp = md.get("openlora_prefill_tokens_computed_total")
            L.append(f"| {'shared by all' if k == 'prefix_shared' else 'unique per request'} | "
                     f"{f(v.get('prompt_tokens_mean'), 0)} | {f(v['ttft_ms'].get('p50'), 0)} / "
                     f"{f(v['ttft_ms'].get('p99'), 0)} | {f(v.get('tokens_per_s'))} | {f(hits, 0)} | {f(comp, 0)} |")
        a_, b_ = g(on, "workloads", "prefix_shared", "ttft_ms", "p50"), g(on, "workloads", "prefix_unique", "ttft_ms", "p50")
        if a_ and b_:
            L.append("")
            L.append(f"TTFT p50 with the shared prefix: {b_ / a_:.1f}x lower than with unique prompts.")
        L.append("")

    pb = res.get("peft_batch")
    if pb:
        o, p = pb.get("openlora", {}), pb.get("peft", {})
        L.append(f"**Mixed-adapter batched decode**, batch 8, 8 rank-8 adapters on all 7 projections, "
                 f"{res['settings']['peft_steps']} steps (part `peft`; in process, no HTTP)")
        L.append("")
        L.append("| tok/s | base only | all rows one adapter | every row a different adapter | peak RSS MiB |")
        L.append("| --- | ---: | ---: | ---: | ---: |")
        for name, d in (("openlora (`openlora bench --batch 8`, Q4_1)", o),
                        ("transformers + PEFT (`adapter_names=`, f32)", p)):
            if d:
                L.append(f"| {name}{mark(d)} | {f(d.get('base_tok_s'))} | {f(d.get('one_adapter_tok_s'))} | "
                         f"{f(d.get('distinct_adapters_tok_s'))} | {f(d.get('peak_rss_mib'), 0)} |")
        L.append(f"| openlora / PEFT | {rat(o.get('base_tok_s'), p.get('base_tok_s'))} | "
                 f"{rat(o.get('one_adapter_tok_s'), p.get('one_adapter_tok_s'))} | "
                 f"{rat(o.get('distinct_adapters_tok_s'), p.get('distinct_adapters_tok_s'))} | |")
        L.append("")

    ip = res.get("inference_perf")
    if ip:
        L += inference_perf.report_lines({k: v for k, v in ip.items() if k != "error"})
        L.append(f"Config: `{ip.get('driver_command')}` writes it (JSON, read as YAML); server type `vllm`, "
                 "tokenizer from the local `smollm2-hf` folder (offline), reports in a temporary folder; "
                 "no server metrics (inference-perf only queries a Prometheus server).")
        L.append("")

    if srv:
        L.append("**Peak RSS of the servers**, MiB (VmHWM of the server process after each workload; one process "
                 "per server serves all its workloads, in this order)")
        L.append("")
        order = [k for k in (*PEER_KEYS, "c32_a1", "c32_a8", "c32_a100", "zipf1000", "prefix_shared", "prefix_unique")
                 if any(k in d.get("workloads", {}) for d in srv.values())]
        L.append("| server | " + " | ".join(f"after {k}" for k in order) + " | at the end |")
        L.append("| --- | " + "---: | " * len(order) + "---: |")
        for k, d in srv.items():
            cells = [f(g(d, "workloads", w, "server_peak_rss_mib_so_far"), 0) if w in d.get("workloads", {}) else ""
                     for w in order]
            L.append(f"| {d['engine']} | " + " | ".join(cells) + f" | {f(d.get('peak_rss_mib'), 0)} |")
        L.append("")
        L.append("openlora registers 1,108 adapters (synth8, synth100-all7, synth1k) with the default tiers "
                 "(host 2,048 MiB, device 1,024 MiB of f32 adapter weights) and a 1,024 MiB KV cache; "
                 "llama-server holds the model, the 8 GGUF LoRAs and 32 slots x 512 tokens of KV; "
                 "llama-cpp-python's server one model + one LoRA at a time.")
        L.append("")

    bad = []
    for path, d in _walk(res):
        if isinstance(d, dict) and d.get("error"):
            e = str(d["error"])
            head, tail = e.split(":", 1)[0], e.strip().splitlines()[-1] if e.strip() else ""
            bad.append(f"- {path}: {head}: ...{tail[-300:]}" if tail != e else f"- {path}: {e[:300]}")
        if isinstance(d, dict) and d.get("errors"):
            bad.append(f"- {path}: {d['errors']} failed requests (first: {str(d.get('first_error'))[:200]})")
    if res.get("skipped"):
        bad += [f"- skipped {x}" for x in res["skipped"]]
    if bad:
        L.append("Problems in this run:")
        L += bad
        L.append("")
    return "\n".join(L)


def _walk(d, path=""):
    if isinstance(d, dict):
        yield path, d
        for k, v in d.items():
            yield from _walk(v, f"{path}.{k}" if path else k)


SECTION = "## Full comparison (one command)"


def write_benchmarks(md: str) -> None:
    p = REPO / "BENCHMARKS.md"
    text = p.read_text()
    body = (f"{SECTION}\n\n<!-- generated by `python3 bench/run_all.py --write-benchmarks`; "
            f"edit bench/run_all.py, not this section -->\n\n{md}\n")
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    p.write_text(text)


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke version: fewer and shorter requests (~5 min)")
    ap.add_argument("--only", default="", help=f"comma-separated parts to run ({','.join(PARTS)})")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out")
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="openlora only: no llama.cpp, no transformers + PEFT")
    ap.add_argument("--no-llama-server", dest="llama_server", action="store_false",
                    help="leave out llama.cpp's llama-server (the peer of `concurrent`)")
    ap.add_argument("--llamacpp-python", action="store_true",
                    help="also run the weaker llama-cpp-python peers: in process in `single`, its Python "
                         "server (one request at a time) in `concurrent` (makes venv-llamacpp, ~10 min)")
    ap.add_argument("--no-bare", dest="bare", action="store_false",
                    help="leave out the openlora run with plugins and receipts off")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of every engine (default 2)")
    ap.add_argument("--cpu-activations", choices=["f32", "int8"], default="f32",
                    help="openlora's engine.cpu_activations for every openlora figure (default f32, the reference; "
                         "int8 is llama.cpp's choice)")
    ap.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for any one workload (default 300)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop starting new parts this many minutes after the first measurement (default 25, --quick 8)")
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="before each measurement wait up to this many seconds for 6 s of idle machine "
                         "(for shared machines; default 0: don't wait)")
    ap.add_argument("--retries", type=int, default=1,
                    help="with --wait-quiet: measure again (up to N times) when other processes took more "
                         "than 5%% of the machine, keeping the least disturbed attempt (default 1)")
    ap.add_argument("--no-build", dest="build", action="store_false",
                    help="don't run `cargo build --release` and `cargo xtask plugins` first")
    ap.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "openlora")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "run_all.json")
    ap.add_argument("--md", type=Path, default=None, help="markdown report (default: --out with .md)")
    ap.add_argument("--write-benchmarks", action="store_true",
                    help=f"replace the '{SECTION[3:]}' section of BENCHMARKS.md with the report")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="run nothing: render the report of an earlier run's JSON (with --md / --write-benchmarks)")
    a = ap.parse_args()
    if a.from_json:
        md = report(json.loads(a.from_json.read_text()))
        print(md)
        if a.md:
            a.md.write_text(md + "\n")
        if a.write_benchmarks:
            write_benchmarks(md)
        return 0
    only = [x for x in a.only.split(",") if x]
    skip = [x for x in a.skip.split(",") if x]
    for x in only + skip:
        if x not in PARTS:
            ap.error(f"unknown part {x!r}; parts: {', '.join(PARTS)}")
    a.parts = [p for p in (only or PARTS) if p not in skip]
    s = dict(QUICK if a.quick else FULL)
    budget = Budget(a.max_minutes if a.max_minutes is not None else (8 if a.quick else 25))
    command = "python3 bench/run_all.py" + ("" if len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:]))
    QUIET["max_wait"], QUIET["retries"] = a.wait_quiet, max(0, a.retries)
    H.sigterm_as_interrupt()
    t0 = time.time()
    res: dict = {"benchmark": "run_all", "command": command, "mode": "quick" if a.quick else "full",
                 "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "commit": H.git_commit(), "machine": H.machine_info(), "parts": a.parts,
                 "settings": dict(s, threads=a.threads, zipf_s=a.zipf_s, peers=a.peers, bare=a.bare,
                                  llama_server=a.llama_server, llamacpp_python=a.llamacpp_python,
                                  cpu_activations=a.cpu_activations),
                 "servers": {}, "skipped": []}
    skipped = res["skipped"]

    if a.build:
        # the whole workspace, like `cargo build --release` by hand: building `-p openlora` alone
        # resolves other features and relinks the binary every time the two alternate
        H.log("building: cargo build --release && cargo xtask plugins")
        subprocess.run(["cargo", "build", "--release", "-q"], check=True, cwd=REPO)
        subprocess.run(["cargo", "xtask", "plugins"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    binary = a.binary
    if not binary.exists():
        sys.exit(f"{binary} is missing: run `cargo build --release` (or drop --no-build)")
    model = H.ensure_model(binary)

    # adapters (made once, cached)
    cache = H.cache_dir() / "bench-adapters"
    names, dirs = {}, []
    needs_http = any(p in a.parts for p in ("concurrent", "zipf", "prefix"))
    if needs_http:
        ref_py = H.ensure_venv_ref()
        names["synth8"] = H.ensure_synth8(ref_py, cache / "synth8")
        names["synth100"] = H.ensure_openlora_synth(binary, cache / "synth100-all7", 100, "a100-",
                                                    targets=H.ALL_PROJECTIONS)
        names["synth1k"] = H.ensure_openlora_synth(binary, cache / "synth1k", 1000, "z1k-")
        dirs = [cache / "synth8", cache / "synth100-all7", cache / "synth1k"]

    # The peers' environments are made before the clock starts (on a fresh machine llama.cpp's
    # compile alone takes ~15 min): --max-minutes bounds the measurements, not the setup.
    loras = []
    if a.peers and ("single" in a.parts or ("concurrent" in a.parts and a.llama_server)):
        H.ensure_llamacpp_bin()
        res["llamacpp_build"] = H.llamacpp_build_info()
    if a.peers and "concurrent" in a.parts and a.llama_server:
        loras = H.ensure_gguf_loras(H.ensure_venv_ref(), cache / "synth8", names["synth8"],
                                    cache / "synth8-gguf", model)
    if a.peers and a.llamacpp_python and any(p in a.parts for p in ("single", "concurrent")):
        H.ensure_venv_llamacpp()
    if a.peers and "peft" in a.parts:
        H.ensure_hf_model(H.ensure_venv_ref(), model)
    if "inference_perf" in a.parts:
        inference_perf.ensure_venv()
        inference_perf.tokenizer_dir(model)
    budget.t0 = time.time()
    whole = H.CpuMonitor()
    try:
        if "bandwidth" in a.parts and budget.ok("bandwidth", skipped):
            H.log("== bandwidth and roofline")
            part_bandwidth(a, model, res)
        if "single" in a.parts and budget.ok("single", skipped):
            H.log("== single stream")
            part_single(a, s, binary, model, res)
        if "peft" in a.parts and budget.ok("peft", skipped):
            H.log("== mixed-adapter batch: openlora bench --batch 8" + (" and transformers + PEFT" if a.peers else ""))
            part_peft(a, s, binary, model, res)
        if needs_http:
            H.log("== server workloads: openlora" + (" and llama.cpp's llama-server" if loras else ""))
            part_servers(a, s, budget, skipped, binary, model, names, dirs, loras, res)
        if "inference_perf" in a.parts and budget.ok("inference_perf", skipped):
            H.log("== inference-perf (lora_traffic_split over two adapters)")
            part_inference_perf(a, s, binary, model, res)
        if ("concurrent" in a.parts and a.peers and a.llamacpp_python
                and budget.ok("llama-cpp-python server", skipped)):
            H.log("== llama-cpp-python server (the weaker peer)")
            part_llamacpp_python_server(a, s, budget, skipped, model, names, cache / "synth8", res)
    except KeyboardInterrupt:
        skipped.append("the rest: interrupted")
        H.log("interrupted: servers stopped; writing what was measured")
    finally:
        res["other_load"] = whole.report()
        res["wall_s"] = round(time.time() - t0, 1)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            res["json"] = str(a.out.resolve().relative_to(REPO))
        except ValueError:
            res["json"] = str(a.out)
        md = report(res)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        md_path = a.md or a.out.with_suffix(".md")
        md_path.write_text(md + "\n")
        print(md)
        H.log(f"wrote {a.out} and {md_path}")
        if a.write_benchmarks:
            write_benchmarks(md)
            H.log("updated BENCHMARKS.md")
    return 1 if ("error" in json.dumps(res.get("single_stream", {})) or skipped
                 or (res.get("inference_perf") or {}).get("error")) else 0


if __name__ == "__main__":
    sys.exit(main())
