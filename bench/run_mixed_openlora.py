#!/usr/bin/env python3
"""openlora's half of the mixed-adapter server workload (bench/run_mixed_llamacpp.py is the
llama.cpp half; bench/engine_mixed.sh runs both and prints the ratio).

  (a) uses the same N synthetic rank-8 PEFT adapters as the llama.cpp run
      (<cache>/bench-adapters/synth8, made by bench/make_synth_adapters.py if absent);
  (b) writes a deployment TOML (default model, those adapters, no API keys) with attribution and
      plugins on (the quickstart's four example plugins; receipts in a temp folder) or off
      (--bare), and starts `target/release/openlora serve` on 127.0.0.1 with --threads threads
      (bench/harness.py's OpenloraServer, shared with bench/run_all.py);
  (c) runs bench/mixed_adapters.py with the same settings as the llama.cpp run: --requests (32)
      streaming chat requests, --concurrency (32) in flight, request i on adapter i % N,
      --max-tokens (64), greedy, one untimed warm-up request per adapter;
  (d) stops the server and writes the client's JSON plus the settings, commit and command to --out.

    cargo build --release && cargo xtask plugins
    python3 bench/run_mixed_openlora.py [--bare] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from harness import OpenloraServer, cache_dir  # noqa: E402


def main() -> int:
    c = cache_dir()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters-dir", type=Path, default=c / "bench-adapters" / "synth8")
    ap.add_argument("--n-adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8091)
    ap.add_argument("--bare", action="store_true", help="attribution and plugins off")
    ap.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "openlora")
    ap.add_argument("--ref-python", default=str(c / "venv-ref" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or REPO / "bench" / "results" / ("openlora_mixed32_bare.json" if a.bare else "openlora_mixed32.json")
    if not a.binary.exists():
        sys.exit(f"{a.binary} is missing: run `cargo build --release` first")
    names = [f"synth{i:02d}" for i in range(a.n_adapters)]
    if not all((a.adapters_dir / n / "adapter_config.json").exists() for n in names):
        subprocess.run([a.ref_python, str(HERE / "make_synth_adapters.py"), "--out", str(a.adapters_dir),
                        "--n", str(a.n_adapters)], check=True)
    with OpenloraServer(a.binary, [a.adapters_dir], bare=a.bare, threads=a.threads, port=a.port) as srv, \
            tempfile.TemporaryDirectory() as tmp:
        client = [sys.executable, str(HERE / "mixed_adapters.py"), "--url", srv.url,
                  "--adapters", ",".join(names), "--requests", str(a.requests), "--concurrency",
                  str(a.concurrency), "--max-tokens", str(a.max_tokens), "--out", str(Path(tmp) / "client.json")]
        subprocess.run(client, check=True, stdout=subprocess.DEVNULL)
        result = json.loads((Path(tmp) / "client.json").read_text())
        result["server_peak_rss_mib"] = srv.peak_rss_mib()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result.pop("request_details", None)
    result.update({
        "engine": "openlora serve (" + ("bare: no plugins, no receipts" if a.bare else "4 example plugins + signed receipts") + ")",
        "threads": a.threads, "commit": commit, "command": "python3 bench/run_mixed_openlora.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
    })
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("engine", "tokens_per_s", "ttft_ms", "itl_ms", "completion_tokens", "wall_s") if k in result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
