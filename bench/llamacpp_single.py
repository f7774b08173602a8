"""The llama.cpp half of bench/single_stream.py (run with the llama-cpp-python venv's python).

Measures what `openlora bench` measures, on the same GGUF with the same thread count:

* prefill: the synthetic prompt `100 + (i * 7919) % 40000`, i < N, evaluated in ONE batch
  (n_batch = n_ubatch >= N) into an empty KV cache; prefill tok/s = N / time of that eval.
* decode: the first 8 ids of that prompt, then M greedy tokens one at a time (argmax of the
  last logits, EOS ignored); decode tok/s = (M - 1) / time after the first token.

Best of R runs for each. Two timings are taken for every measurement and both are printed:
llama.cpp's own (`llama_perf_context`: t_p_eval_ms / n_p_eval for the prompt batch,
t_eval_ms / n_eval for the single-token evals; llama-cpp-python's `Llama.eval` is a thin loop
over `llama_decode`, so these time only llama.cpp's work) and Python wall-clock around the
same calls (which for decode also includes the argmax over the logits, like openlora's
figure). The harness reports llama.cpp's own timings as the headline figures.

Prints one JSON line on stdout.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


def bench_prompt(n):
    return [100 + (i * 7919) % 40000 for i in range(n)]


def perf(ctx):
    p = llama_cpp.llama_perf_context(ctx)
    return {"t_p_eval_ms": p.t_p_eval_ms, "n_p_eval": p.n_p_eval, "t_eval_ms": p.t_eval_ms, "n_eval": p.n_eval}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--flash-attn", action="store_true")
    a = ap.parse_args()
    n, m, t = a.prompt_tokens, a.gen_tokens, a.threads
    if m < 2:
        sys.exit("--gen-tokens must be at least 2")

    llm = Llama(
        model_path=a.model,
        n_ctx=n + m + 16,
        n_batch=max(n, 512),
        n_ubatch=max(n, 512),
        n_threads=t,
        n_threads_batch=t,
        n_gpu_layers=0,
        flash_attn=a.flash_attn,
        logits_all=False,
        verbose=False,
    )
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    # Warm-up (page in the weights, build the graphs); not measured.
    llm.reset()
    llm.eval(bench_prompt(min(n, 64)))
    for _ in range(16):
        llm.eval([int(np.argmax(last_logits()))])
    # llama.cpp books an eval into the perf counters at the next synchronize, so settle
    # everything before every perf reset (an unsynced eval would be counted into the next one).
    llama_cpp.llama_synchronize(ctx)

    prompt = bench_prompt(n)
    prefill_perf, prefill_wall = [], []
    decode_perf, decode_wall = [], []
    first_tokens = None
    for _ in range(max(1, a.repeat)):
        # Prefill: one batch of N tokens into an empty cache.
        llm.reset()  # n_tokens = 0; eval() then removes every cached position (kv seq_rm from 0)
        llama_cpp.llama_synchronize(ctx)
        llama_cpp.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        llm.eval(prompt)
        llama_cpp.llama_synchronize(ctx)
        wall = time.perf_counter() - t0
        p = perf(ctx)
        if p["n_p_eval"] != n:
            raise RuntimeError(f"expected one prompt eval of {n} tokens, llama.cpp counted {p}")
        prefill_perf.append(n / (p["t_p_eval_ms"] / 1e3))
        prefill_wall.append(n / wall)

        # Decode: 8-token prompt, then M greedy tokens one at a time, EOS ignored.
        llm.reset()
        llm.eval(prompt[:8])
        tok = int(np.argmax(last_logits()))  # token 1 of M, from the prompt's logits
        toks = [tok]
        llama_cpp.llama_synchronize(ctx)
        llama_cpp.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        for _ in range(m - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
            toks.append(tok)
        wall = time.perf_counter() - t0
        p = perf(ctx)
        if p["n_eval"] != m - 1:
            raise RuntimeError(f"expected {m - 1} single-token evals, llama.cpp counted {p}")
        decode_perf.append((m - 1) / (p["t_eval_ms"] / 1e3))
        decode_wall.append((m - 1) / wall)
        first_tokens = first_tokens or toks[:16]

    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "binding": f"llama-cpp-python {llama_cpp.__version__}",
                "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
                "threads": t,
                "flash_attn": a.flash_attn,
                "model": os.path.abspath(a.model),
                "prompt_tokens": n,
                "gen_tokens": m,
                "repeat": max(1, a.repeat),
                "timing": "llama_perf_context",
                "prefill_tok_s": max(prefill_perf),
                "decode_tok_s": max(decode_perf),
                "prefill_tok_s_wall": max(prefill_wall),
                "decode_tok_s_wall": max(decode_wall),
                "runs": {
                    "prefill_tok_s": prefill_perf,
                    "decode_tok_s": decode_perf,
                    "prefill_tok_s_wall": prefill_wall,
                    "decode_tok_s_wall": decode_wall,
                },
                "decode_first_tokens": first_tokens,
            }
        )
    )


if __name__ == "__main__":
    main()
