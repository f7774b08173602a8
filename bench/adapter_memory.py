#!/usr/bin/env python3
"""What 1,000 loaded rank-8 adapters cost in resident memory, against the size of their files.

Starts `openlora serve` (bare: no plugins, no receipts) on 127.0.0.1 with the folder made by
`openlora adapters synth --count 1000` (rank 8 on q_proj and v_proj, f16, the harness's `synth1k`)
and a device tier big enough to hold them all, then sends one 1-token completion per adapter so
that every one is read from disk and kept. It reads the server's VmRSS from /proc before and after
(one second after the last request, once the pager's loaders have gone idle and trimmed the heap),
and the pager's own count (`openlora_adapter_tier_bytes{tier="device"}`), and prints one JSON line:
RSS growth per adapter against the file bytes per adapter.

    python3 bench/adapter_memory.py [--count 1000] [--binary target/release/openlora]

Standard library only (bench/harness.py). Memory figures do not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness as H


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    v = H.proc_status_mib(pid, key)
    if v is None:
        raise RuntimeError(f"/proc/{pid}/status has no {key}")
    return v


def complete(url: str, model: str) -> None:
    body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        json.load(r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--binary", type=Path, default=H.REPO / "target" / "release" / "openlora")
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    cache = H.cache_dir() / "bench-adapters"
    folder = cache / ("synth1k" if args.count == 1000 else f"synth{args.count}")
    names = H.ensure_openlora_synth(args.binary, folder, args.count, "z1k-" if args.count == 1000 else "zm-")
    file_bytes = sum((folder / n / "adapter_model.safetensors").stat().st_size for n in names)
    device_mib = int(file_bytes / 2**20 * 2) + 64
    with H.OpenloraServer(args.binary, [folder], bare=True, kv_cache_mib=64, device_mib=device_mib) as srv:
        pid = srv.proc.pid
        complete(srv.url, H.BASE_MODEL_NAME)  # the base model's first pass allocates its buffers
        before = rss_mib(pid)
        before_anon = rss_mib(pid, "RssAnon")
        t0 = time.time()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda n: complete(srv.url, n), names))
        load_s = time.time() - t0
        complete(srv.url, H.BASE_MODEL_NAME)
        # The pager trims the heap once its loaders have been idle for 200 ms (after a burst of
        # loads); read the settled figure.
        time.sleep(1.0)
        after = rss_mib(pid)
        after_anon = rss_mib(pid, "RssAnon")
        m = srv.metrics()
        def series(name):
            return next((v for k, v in m.items() if k.startswith(name + "{") and 'tier="device"' in k), None)
        tier = series("openlora_adapter_tier_bytes")
        resident = series("openlora_adapters_resident")
        peak = srv.peak_rss_mib()
    per_file = file_bytes / len(names)
    out = {
        "adapters": len(names), "rank": 8, "targets": "q_proj,v_proj", "file_dtype": "f16",
        "file_bytes_per_adapter": round(per_file), "files_mib": round(file_bytes / 2**20, 1),
        "rss_before_mib": round(before, 1), "rss_after_mib": round(after, 1), "peak_rss_mib": peak,
        "anon_growth_mib": round(after_anon - before_anon, 1),
        "rss_growth_per_adapter_bytes": round((after - before) * 2**20 / len(names)),
        "rss_growth_over_files": round((after - before) * 2**20 / file_bytes, 3),
        "device_tier_bytes": tier, "device_tier_resident": resident,
        "load_seconds": round(load_s, 1), "commit": H.git_commit(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
