#!/usr/bin/env python3
"""inference-perf (the Gateway API Inference Extension's benchmark tool,
kubernetes-sigs/inference-perf) against `openlora serve`, with `lora_traffic_split` over two
adapters.

    python3 bench/inference_perf.py                 # 2 req/s for 30 s, 32 output tokens
    python3 bench/inference_perf.py --quick         # 1 req/s for 20 s, 16 output tokens
    python3 bench/inference_perf.py --rate 4 --duration 60 --keep-reports bench/results/inference_perf_reports

What it does (standard library only; inference-perf runs as a subprocess in its own venv):
- makes `$OPENLORA_CACHE/venv-inference-perf` when absent (python 3.12,
  `pip install inference-perf==0.7.0`);
- starts `openlora serve` through bench/harness.py (127.0.0.1, a free port, bare: no plugins, no
  receipts, unless --plugins) with the synthetic adapters `synth8` of the `concurrent` part;
- writes an inference-perf config (JSON, which its YAML loader reads): server type `vllm` at
  the server's base URL, API `completion` with streaming (TTFT / ITL), synthetic prompts (its
  Shakespeare corpus, lengths from a normal distribution), a fixed output length with
  `ignore_eos`, a `constant` load stage, `load.lora_traffic_split` 0.5 / 0.5 over two adapters,
  the tokenizer from the LOCAL folder `$OPENLORA_CACHE/smollm2-hf` (HF_HUB_OFFLINE=1,
  TRANSFORMERS_OFFLINE=1: nothing is downloaded), reports written to a temporary folder;
  no server metrics: inference-perf 0.7.0 only queries a Prometheus server
  (`metrics.type: prometheus` with `prometheus.url`), it cannot scrape /metrics itself, so the
  driver reads the server's /metrics before and after instead;
- runs `inference-perf --config_file CFG` under a time limit, stops the server in `finally`;
- reads inference-perf's JSON reports (summary_lifecycle_metrics.json, stage_0_..., and one
  adapter_<name>_lifecycle_metrics.json per adapter) into a few figures.

Exit status 1, with the reason, when inference-perf failed, timed out, reported failed requests
or no successful request. Prints one JSON line; --out writes it (default
bench/results/inference_perf.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness as H  # noqa: E402

PIP_SPEC = "inference-perf==0.7.0"
PYTHON312 = "/root/.pyenv/versions/3.12.1/bin/python"

# the two settings of the harness (run_all.py --quick uses QUICK)
FULL = dict(rate=2.0, duration=30, input_mean=96, output_tokens=32)
QUICK = dict(rate=1.0, duration=20, input_mean=64, output_tokens=16)


def venv_dir() -> Path:
    return H.cache_dir() / "venv-inference-perf"


def _python312() -> str:
    for c in (PYTHON312, shutil.which("python3.12")):
        if c and Path(c).exists():
            return c
    raise RuntimeError("inference-perf needs Python >= 3.12: neither /root/.pyenv/versions/3.12.1/bin/python "
                       "nor python3.12 on PATH was found")


def ensure_venv() -> Path:
    """<cache>/venv-inference-perf with inference-perf 0.7.0; returns its `inference-perf` script."""
    venv = venv_dir()
    exe, py = venv / "bin" / "inference-perf", venv / "bin" / "python"
    if exe.exists() and subprocess.run([str(py), "-c", "import inference_perf.main"], capture_output=True,
                                       env=offline_env()).returncode == 0:
        return exe
    if not py.exists():
        python = _python312()
        H.log(f"creating {venv} with {python}")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    H.log(f"installing {PIP_SPEC} into {venv}")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", PIP_SPEC], check=True)
    return exe


def version() -> str | None:
    r = subprocess.run([str(venv_dir() / "bin" / "python"), "-c",
                        "import importlib.metadata as m; print(m.version('inference-perf'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


def offline_env() -> dict:
    """No Hugging Face downloads, no telemetry, no proxy for the local server."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", OTEL_TRACES_ENABLED="false")
    for k in ("NO_PROXY", "no_proxy"):
        env[k] = ",".join(x for x in (os.environ.get(k), "127.0.0.1", "localhost") if x)
    return env


def tokenizer_dir(model: Path | None = None) -> Path:
    """The local HF tokenizer folder of the default model (<cache>/smollm2-hf), made when absent."""
    d = H.cache_dir() / "smollm2-hf"
    if (d / "tokenizer.json").exists() and (d / "tokenizer_config.json").exists():
        return d
    return H.ensure_hf_model(H.ensure_venv_ref(), model or H.default_model())


def make_config(base_url: str, model_name: str, adapters: list[str], splits: list[float], tokenizer: Path,
                reports: Path, rate: float, duration: int, input_mean: int, output_tokens: int,
                request_timeout: float, seed: int = 0) -> dict:
    """The inference-perf config (see inference_perf/config/ for the schema; unknown keys are errors)."""
    return {
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "base_url": base_url, "model_name": model_name, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer), "load_timeout": 120},
        "data": {"type": "synthetic",
                 "input_distribution": {"min": max(8, input_mean // 2), "max": input_mean * 2, "mean": input_mean,
                                        "std_dev": max(1, input_mean // 4)},
                 "output_distribution": {"type": "fixed", "min": output_tokens, "max": output_tokens,
                                         "mean": output_tokens, "std_dev": 0}},
        "load": {"type": "constant", "stages": [{"rate": rate, "duration": duration}],
                 "num_workers": 1, "worker_max_concurrency": 64, "request_timeout": request_timeout,
                 "stage_teardown_grace_seconds": 60, "base_seed": seed,
                 "lora_traffic_split": [{"name": a, "split": s} for a, s in zip(adapters, splits)]},
        "metrics": None,  # inference-perf can only query a Prometheus server, not scrape /metrics
        "report": {"request_lifecycle": {"summary": True, "per_stage": True, "per_adapter": True,
                                         "per_request": False, "percentiles": [50, 90, 99]},
                   "prometheus": None},
        "storage": {"local_storage": {"path": str(reports)}},
    }


def _ms(d: dict | None, *keys) -> dict:
    d = d or {}
    return {k: round(1000 * d[k], 1) for k in keys if isinstance(d.get(k), (int, float))}


def figures(rep: dict) -> dict:
    """The few figures of one inference-perf lifecycle report."""
    s, fl, ld = rep.get("successes") or {}, rep.get("failures") or {}, rep.get("load_summary") or {}
    lat, thr = s.get("latency") or {}, s.get("throughput") or {}
    pct = ("median", "p90", "p99")
    out = {"requests": ld.get("count"), "successes": s.get("count"), "failures": fl.get("count"),
           "benchmark_time_s": round(rep.get("benchmark_time_seconds") or 0, 2),
           "requests_per_s": round(thr.get("requests_per_sec") or 0, 3),
           "output_tok_s": round(thr.get("output_tokens_per_sec") or 0, 1),
           "input_tok_s": round(thr.get("input_tokens_per_sec") or 0, 1),
           "ttft_ms": _ms(lat.get("time_to_first_token"), *pct),
           "itl_ms": _ms(lat.get("inter_token_latency"), *pct),
           "tpot_ms": _ms(lat.get("time_per_output_token"), *pct),
           "latency_ms": _ms(lat.get("request_latency"), *pct),
           "output_len_mean": round((s.get("output_len") or {}).get("mean") or 0, 1),
           "token_count_mismatches": s.get("token_count_mismatches"),
           "client_fallback_requests": s.get("client_fallback_requests")}
    for k in ("requested_rate", "achieved_rate"):
        if k in ld:
            out[k] = round(ld[k], 3)
    if fl.get("count"):
        out["failures_by_label"] = {k: {"count": v.get("count"),
                                        "first_message": (v.get("messages") or [{}])[0].get("message", "")[:500]}
                                    for k, v in (fl.get("by_label") or {}).items()}
    return out


def read_reports(reports: Path, adapters: list[str]) -> dict:
    def load(name):
        p = reports / name
        return json.loads(p.read_text()) if p.exists() else None

    summary = load("summary_lifecycle_metrics.json")
    out = {"files": sorted(p.name for p in reports.iterdir()) if reports.exists() else [],
           "summary": figures(summary) if summary else None,
           "stages": {}, "per_adapter": {}}
    for p in sorted(reports.glob("stage_*_lifecycle_metrics.json")):
        out["stages"][p.name.split("_")[1]] = figures(json.loads(p.read_text()))
    for a in adapters:
        r = load(f"adapter_{a}_lifecycle_metrics.json")
        out["per_adapter"][a] = figures(r) if r else None
    return out


# server counters read around the run (summed over labels), to cross-check inference-perf's counts
SERVER_COUNTERS = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                   "vllm:num_preemptions_total", "openlora_adapter_disk_loads_total",
                   "openlora_adapter_tier_misses_total", "openlora_requests_refused_total")


def counter(m: dict, name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def run(binary: Path, adapter_dirs: list[Path], adapters: list[str], *, rate: float, duration: int,
        input_mean: int, output_tokens: int, timeout: float, threads: int = 2, bare: bool = True,
        splits: list[float] | None = None, keep_reports: Path | None = None, model: Path | None = None) -> dict:
    """Start the server, run inference-perf, stop the server; returns the figures (with "error"
    when something failed)."""
    if len(adapters) != 2:
        raise ValueError("lora_traffic_split here is over exactly two adapters")
    splits = splits or [0.5, 0.5]
    exe = ensure_venv()
    tok = tokenizer_dir(model)
    res: dict = {"tool": f"inference-perf {version()}", "adapters": adapters, "splits": splits,
                 "settings": dict(rate=rate, duration_s=duration, input_tokens_mean=input_mean,
                                  output_tokens=output_tokens, api="completion, streaming", threads=threads,
                                  server="bare" if bare else "plugins + receipts")}
    tmp = tempfile.TemporaryDirectory(prefix="openlora-inference-perf-")
    work = Path(tmp.name)
    reports = work / "reports"
    srv = H.OpenloraServer(binary, adapter_dirs, bare=bare, threads=threads)
    try:
        srv.start()
        H.log(f"{srv.label} on {srv.url} (started in {srv.startup_s} s)")
        base = f"http://127.0.0.1:{srv.port}"  # inference-perf appends /v1/models, /v1/completions
        cfg = make_config(base, H.BASE_MODEL_NAME, adapters, splits, tok, reports, rate, duration, input_mean,
                          output_tokens, request_timeout=min(120.0, timeout))
        cfg_path = work / "config.yaml"
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
        res["config"] = cfg
        cmd = [str(exe), "--config_file", str(cfg_path)]
        res["command"] = " ".join(cmd)
        H.log("running: " + res["command"] + f" (time limit {timeout:.0f} s)")
        m0 = srv.metrics()
        mon = H.CpuMonitor([srv.proc.pid])
        r = H.run_measured(cmd, timeout=timeout, env=offline_env(), cwd=work)
        res["machine_load"] = mon.report()
        m1 = srv.metrics()
        res["wall_s"], res["client_peak_rss_mib"] = r["wall_s"], r["peak_rss_mib"]
        res["server_peak_rss_mib"] = srv.peak_rss_mib()
        res["server_counters_delta"] = {k: counter(m1, k) - counter(m0, k) for k in SERVER_COUNTERS}
        (work / "stdout.txt").write_text(r["stdout"])
        (work / "stderr.txt").write_text(r["stderr"])
        if reports.exists():
            res.update(read_reports(reports, adapters))
        if keep_reports:
            keep_reports.mkdir(parents=True, exist_ok=True)
            for p in list(reports.glob("*")) + [cfg_path, work / "stdout.txt", work / "stderr.txt"]:
                if p.is_file():
                    shutil.copy2(p, keep_reports / p.name)
            res["reports_kept_in"] = str(keep_reports)
        tail = (r["stderr"].strip() or r["stdout"].strip())[-3000:]
        s = res.get("summary")
        if r["timed_out"]:
            res["error"] = f"inference-perf timed out after {timeout:.0f} s (killed): ...{tail}"
        elif r["rc"] != 0:
            res["error"] = f"inference-perf exited {r['rc']}: ...{tail}"
        elif not s:
            res["error"] = f"inference-perf wrote no summary report (no request finished?): ...{tail}"
        elif s.get("failures"):
            lab = s.get("failures_by_label") or {}
            first = next(iter(lab.items()), ("?", {}))
            res["error"] = (f"inference-perf reported {s['failures']} failed requests of {s['requests']} "
                            f"(first: {first[0]}: {first[1].get('first_message', '')})")
        elif not s.get("successes"):
            res["error"] = "inference-perf reported no successful request"
        else:
            missing = [a for a in adapters if not (res["per_adapter"].get(a) or {}).get("successes")]
            if missing:
                res["error"] = f"no successful request on adapter(s) {', '.join(missing)}"
        if "error" in res:
            res["server_log_tail"] = srv.log.read_text()[-2000:]
    finally:
        srv.stop()
        tmp.cleanup()
    return res


def report_lines(r: dict) -> list[str]:
    """Markdown lines for one run (used by run_all.py too)."""
    s = r.get("summary") or {}
    st = r.get("settings", {})
    L = [f"**inference-perf** (part `inference_perf`; {r.get('tool')}, `lora_traffic_split` "
         f"{' / '.join(f'{a} {x:g}' for a, x in zip(r.get('adapters', []), r.get('splits', [])))}; constant "
         f"{st.get('rate')} req/s for {st.get('duration_s')} s, synthetic prompts ~{st.get('input_tokens_mean')} "
         f"tokens, {st.get('output_tokens')} output tokens (ignore_eos), {st.get('api')}; openlora "
         f"{st.get('server')})"]
    ld = r.get("machine_load") or {}
    if ld.get("disturbed"):
        L[0] += (f"; other processes took {ld.get('other_processes_share', 0):.0%} of the machine during it, "
                 "so these figures are noisy")
    L.append("")
    L.append("| requests | ok / failed | achieved req/s | output tok/s | TTFT p50 / p90 / p99 ms | "
             "ITL p50 / p99 ms | latency p50 / p99 ms |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")

    def row(name, d):
        t, i, lt = d.get("ttft_ms", {}), d.get("itl_ms", {}), d.get("latency_ms", {})
        rate = d.get("achieved_rate", d.get("requests_per_s"))
        return (f"| {name} | {d.get('successes')} / {d.get('failures')} | {rate} | {d.get('output_tok_s')} | "
                f"{t.get('median')} / {t.get('p90')} / {t.get('p99')} | {i.get('median')} / {i.get('p99')} | "
                f"{lt.get('median')} / {lt.get('p99')} |")

    if s:
        stage = (r.get("stages") or {}).get("0") or {}
        L.append(row(f"all ({s.get('requests')})", dict(s, achieved_rate=stage.get("achieved_rate"))))
        for a, d in (r.get("per_adapter") or {}).items():
            if d:
                L.append(row(f"{a} ({d.get('requests')})", d))
    L.append("")
    c = r.get("server_counters_delta") or {}
    if c:
        L.append(f"Server side (openlora /metrics, before and after): "
                 f"{c.get('vllm:request_success_total', 0):.0f} requests finished, "
                 f"{c.get('vllm:prompt_tokens_total', 0):.0f} prompt and "
                 f"{c.get('vllm:generation_tokens_total', 0):.0f} generated tokens, "
                 f"{c.get('openlora_adapter_disk_loads_total', 0):.0f} adapter loads from disk, "
                 f"{c.get('openlora_requests_refused_total', 0):.0f} refused; inference-perf counted "
                 f"{s.get('successes')} successes.")
        L.append("")
    if r.get("error"):
        L.append(f"inference-perf run failed: {r['error'][:600]}")
        L.append("")
    return L


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 req/s for 20 s, 16 output tokens")
    ap.add_argument("--rate", type=float, default=None, help="requests/s of the constant stage (default 2)")
    ap.add_argument("--duration", type=int, default=None, help="seconds of the stage (default 30)")
    ap.add_argument("--output-tokens", type=int, default=None, help="output tokens per request (default 32)")
    ap.add_argument("--input-mean", type=int, default=None, help="mean prompt tokens (default 96)")
    ap.add_argument("--adapters", default="synth00,synth01", help="the two adapters of the split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plugins", action="store_true",
                    help="serve with the 4 example plugins + receipts (needs `cargo xtask plugins`); default bare")
    ap.add_argument("--timeout", type=float, default=300, help="time limit of the inference-perf process (s)")
    ap.add_argument("--binary", type=Path, default=H.REPO / "target" / "release" / "openlora")
    ap.add_argument("--keep-reports", type=Path, default=None, help="copy inference-perf's report files here")
    ap.add_argument("--out", type=Path, default=H.REPO / "bench" / "results" / "inference_perf.json")
    a = ap.parse_args()
    s = dict(QUICK if a.quick else FULL)
    for k in ("rate", "duration", "output_tokens", "input_mean"):
        if getattr(a, k) is not None:
            s[k] = getattr(a, k)
    H.sigterm_as_interrupt()
    model = H.ensure_model(a.binary)
    names = H.ensure_synth8(H.ensure_venv_ref(), H.cache_dir() / "bench-adapters" / "synth8")
    adapters = [x for x in a.adapters.split(",") if x]
    for x in adapters:
        if x not in names:
            ap.error(f"{x} is not one of the synth8 adapters ({', '.join(names)})")
    t0 = time.time()
    r = run(a.binary, [H.cache_dir() / "bench-adapters" / "synth8"], adapters, timeout=a.timeout,
            threads=a.threads, bare=not a.plugins, keep_reports=a.keep_reports, model=model, **s)
    r.update(commit=H.git_commit(), machine=H.machine_info(), total_wall_s=round(time.time() - t0, 1),
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             driver_command="python3 bench/inference_perf.py " + " ".join(sys.argv[1:]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=1) + "\n")
    print("\n".join(report_lines(r)), file=sys.stderr)
    print(json.dumps({k: r.get(k) for k in ("tool", "adapters", "summary", "per_adapter", "error")}))
    if r.get("error"):
        print(f"FAILED: {r['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
