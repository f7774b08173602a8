#!/usr/bin/env python3
"""Start llama-cpp-python's OpenAI-compatible server with one base model entry plus one entry
per GGUF LoRA adapter, on 127.0.0.1, and wait until it answers.

The config file (JSON, `python -m llama_cpp.server --config_file CFG`) has
  - host 127.0.0.1, the port, interrupt_requests = false (the default, true, makes a streaming
    request stop early whenever another request is waiting, so concurrent streams would be cut
    short), optional api_key;
  - models: first {"model": GGUF, "model_alias": "base"}, then for each adapter FILE.gguf
    {"model": GGUF, "lora_path": FILE.gguf, "model_alias": FILE's stem}; each with n_threads =
    n_threads_batch = --threads, n_ctx = --n-ctx, logits_all = false (the server's default, true,
    keeps logits for every prompt token and allocates n_ctx x vocab floats at every load; no
    endpoint we use needs them), verbose = false. Prompt cache off (the default).

What llama-cpp-python 0.3.x's server does with these (llama_cpp/server/app.py and model.py):
  - One `Llama` object exists at a time (LlamaProxy). A request whose `model` differs from the
    loaded alias closes it and builds a new `Llama` from that entry's settings: the whole GGUF is
    read again (llama-cpp-python turns mmap off when lora_path is set), a new context and KV cache
    are created and the adapter is loaded. An unknown `model` silently gets the first entry.
  - Every completion holds a global lock for its whole generation, so requests run one at a time
    (no batching); the others wait in arrival order.
So N requests over k adapters arriving interleaved cost one model reload per request.

By default the server runs under a thin wrapper (this file, `_serve` mode) that times every model
load and appends one JSON line per load ({"t", "alias", "load_s"}) to --load-log, then calls
llama_cpp.server's own main(); --no-instrument runs `python -m llama_cpp.server` unchanged.

    ~/.cache/openlora/venv-llamacpp/bin/python bench/serve_llamacpp.py \
        --adapters-dir ~/.cache/openlora/bench-adapters/synth8-gguf [--port 8090] [--threads 2] \
        [--n-ctx 1024] [--api-key KEY] [--model BASE.gguf]
runs until interrupted. From python: `with LlamaCppServer(...) as srv: srv.url`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("OPENLORA_CACHE"):
        return Path(os.environ["OPENLORA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "openlora"


def default_python() -> str:
    p = cache_dir() / "venv-llamacpp" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def make_config(model: Path, adapters: list[Path], port: int, threads: int, n_ctx: int,
                api_key: str | None = None) -> dict:
    common = {"model": str(model), "n_threads": threads, "n_threads_batch": threads, "n_ctx": n_ctx,
              "logits_all": False, "verbose": False}
    models = [dict(common, model_alias="base")]
    for f in adapters:
        models.append(dict(common, model_alias=f.stem, lora_path=str(f)))
    cfg = {"host": "127.0.0.1", "port": port, "interrupt_requests": False, "models": models}
    if api_key:
        cfg["api_key"] = api_key
    return cfg


class LlamaCppServer:
    """Context manager: writes the config, starts the server, waits for /v1/models, stops it."""

    def __init__(self, model: Path, adapters: list[Path], port: int = 8090, threads: int = 2, n_ctx: int = 1024,
                 api_key: str | None = None, python: str | None = None, log: Path | None = None,
                 load_log: Path | None = None, instrument: bool = True, ready_timeout: float = 120):
        self.cfg = make_config(model, adapters, port, threads, n_ctx, api_key)
        self.python = python or default_python()
        self.port, self.api_key = port, api_key
        self.url = f"http://127.0.0.1:{port}/v1"
        self.tmp = tempfile.TemporaryDirectory(prefix="llamacpp-srv-")
        self.log = log or Path(self.tmp.name) / "server.log"
        self.load_log = load_log or Path(self.tmp.name) / "loads.jsonl"
        self.instrument, self.ready_timeout = instrument, ready_timeout
        self.proc: subprocess.Popen | None = None
        self.adapter_names = [m["model_alias"] for m in self.cfg["models"][1:]]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        cfg_path = Path(self.tmp.name) / "config.json"
        cfg_path.write_text(json.dumps(self.cfg, indent=1))
        self.load_log.write_text("")
        env = dict(os.environ, HOST="127.0.0.1", PORT=str(self.port))  # the server reads these over the file
        if self.instrument:
            cmd = [self.python, str(Path(__file__).resolve()), "_serve", str(cfg_path), str(self.load_log)]
        else:
            cmd = [self.python, "-m", "llama_cpp.server", "--config_file", str(cfg_path)]
        self.logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + self.ready_timeout
        req = urllib.request.Request(f"{self.url}/models")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited ({self.proc.returncode}); log:\n"
                                   + self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"llama.cpp server not ready after {self.ready_timeout} s; log:\n"
                                   + self.log.read_text()[-3000:])
            time.sleep(0.25)

    def loads(self) -> list[dict]:
        try:
            return [json.loads(x) for x in self.load_log.read_text().splitlines() if x.strip()]
        except OSError:
            return []

    def cpu_seconds(self) -> float | None:
        """user+system CPU time of the server process so far (from /proc)."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "logf", None):
            self.logf.close()


def _serve(cfg_path: str, load_log: str):
    """Inside the server's python: time every LlamaProxy model load, then run the stock server."""
    import llama_cpp.server.model as m

    orig = m.LlamaProxy.load_llama_from_model_settings

    def timed(settings):
        t = time.time()
        llm = orig(settings)
        with open(load_log, "a") as f:
            f.write(json.dumps({"t": round(t, 4), "alias": settings.model_alias,
                                "load_s": round(time.time() - t, 4)}) + "\n")
        return llm

    m.LlamaProxy.load_llama_from_model_settings = staticmethod(timed)
    from llama_cpp.server.__main__ import main

    sys.argv = ["llama_cpp.server", "--config_file", cfg_path]
    main()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        _serve(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters-dir", type=Path, required=True, help="folder of NAME.gguf LoRA adapters")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--api-key")
    ap.add_argument("--python", help="python with llama_cpp[server] (default: <cache>/venv-llamacpp)")
    ap.add_argument("--no-instrument", action="store_true", help="run `python -m llama_cpp.server` unchanged")
    a = ap.parse_args()
    adapters = sorted(a.adapters_dir.glob("*.gguf"))
    srv = LlamaCppServer(a.model, adapters, a.port, a.threads, a.n_ctx, a.api_key, a.python,
                         instrument=not a.no_instrument)
    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # stop the server on SIGTERM too
    with srv:
        print(json.dumps({"url": srv.url, "models": ["base"] + srv.adapter_names, "log": str(srv.log),
                          "load_log": str(srv.load_log)}), flush=True)
        try:
            while srv.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
