#!/usr/bin/env python3
"""Mixed-adapter load test for any OpenAI-compatible chat server with streaming.

Sends --requests streaming chat completions, at most --concurrency in flight, to
`POST {url}/chat/completions`. Request i uses adapter i % len(adapters) as its `model` (or, with
--adapter-dist zipf, an adapter drawn from Zipf(--zipf-s) over the list, seeded by --seed) and chat
prompt i % 16 of a fixed built-in list (one user message, no system message unless
--system-prompt-words; the server applies its own chat template). Body: {"model", "messages",
"max_tokens", "temperature": 0, "stream": true, "stream_options": {"include_usage": true}} plus
--extra-body.

--lora-ids NAME=ID,... talks to llama.cpp's C++ `llama-server` started with its adapters loaded
at scale 0 (`--lora-scaled FILE:0 ... --lora-init-without-apply`; with plain `--lora` every adapter
stays at global scale 1 and a request without a `lora` field gets them all): a request whose adapter NAME is in the map is sent
with `"model": --served-model` and llama-server's per-request field `"lora": [{"id": ID,
"scale": 1.0}]` (adapters not listed run at scale 0); any other name (e.g. `base`) is sent with no
`lora` field, i.e. the base model. /models must then list --served-model instead of the adapters.

--unique-prompts gives every request (and warm-up request) a short system message that starts with
its own tag ("Request SEED-I. You are a helpful assistant."), ahead of the user question: ~35-token
prompts with the SmolLM2 chat template that no two requests share beyond the template's first few
tokens, so a prefix cache has nothing to reuse.

--system-prompt-words N puts the same long built-in system message (N words, ~1.4 tokens each) in
front of every request, so a server with a prefix cache can reuse its KV; --unique-system starts
that message with a per-request tag instead, so no two requests share more than the chat
template's first few tokens (the control for the prefix-cache workload).

Measures, per request (clock starts when the request is sent):
  - TTFT: time to the first SSE chunk with non-empty `choices[0].delta.content`;
  - inter-token latencies (ITL): gaps between consecutive content chunks (a chunk usually holds
    one token; a server may merge a few, e.g. for incomplete UTF-8);
  - completion tokens: `usage.completion_tokens` when the server sends usage; else max_tokens when
    finish_reason is "length"; else the number of content chunks (JSON: token_count_source);
  - end-to-end latency.
Overall: wall = first send to last response end; tokens_per_s = sum of completion tokens / wall;
p50/p99 (linear interpolation) of TTFT over requests, of ITL over all gaps of all requests, and of
end-to-end latency.

Before the timed run: GET {url}/models, and if the server lists models, every adapter must be
among them (llama-cpp-python's server silently serves its default model for an unknown name);
then --warmup rounds of one short request per adapter, one at a time, untimed.

Only the standard library (asyncio and a minimal HTTP/1.1 client, plain http), so any python3 runs
it. Prints one JSON line (the summary); --out gets the summary plus every request's details
(times, tokens, finish_reason, text). Exit status 1 if any request failed or the --timeout
(default 600 s) for the whole run expired.

    python3 bench/mixed_adapters.py --url http://127.0.0.1:8090/v1 --adapters a,b,c \
        [--api-key KEY] [--concurrency 32] [--requests 32] [--max-tokens 64] [--warmup 1] \
        [--extra-body '{"ignore_eos": true}'] [--timeout 600] [--out results.json] \
        [--adapter-dist zipf --zipf-s 1.1 --seed 0] [--system-prompt-words 800 [--unique-system]] \
        [--unique-prompts] [--lora-ids synth00=0,synth01=1 --served-model base]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

PROMPTS = [
    "Give me three tips for staying healthy.",
    "Write a haiku about the ocean.",
    "Explain what a compiler does in two sentences.",
    "What is the boiling point of water?",
    "Describe a sunset to someone who has never seen one.",
    "What are the primary colors?",
    "Suggest a name for a friendly robot.",
    "How do plants make their food?",
    "Write a short thank-you note to a teacher.",
    "Why is the sky blue?",
    "List three animals that live in the desert.",
    "What is the difference between weather and climate?",
    "Give me a simple recipe for pancakes.",
    "Explain gravity to a five-year-old.",
    "What should I pack for a weekend camping trip?",
    "Summarize the story of Cinderella in two sentences.",
]


TOPICS = ["the weather", "cooking", "gardening", "history", "astronomy", "music", "travel", "sports",
          "mathematics", "biology", "painting", "architecture", "poetry", "chemistry", "geography",
          "economics", "languages", "photography", "computers", "animals"]
STYLES = ["briefly", "politely", "in plain words", "with one example", "step by step", "calmly",
          "with a short summary first", "without jargon"]


def system_prompt(words: int, tag: str = "") -> str:
    """A deterministic long system message of about `words` words (rules for a helpful assistant);
    `tag` goes first, so that different tags share no prefix."""
    parts, k = [tag] if tag else [], 0
    n = len(tag.split())
    while n < words:
        t, st = TOPICS[k % len(TOPICS)], STYLES[(k * 3) % len(STYLES)]
        rule = (f"Rule {k + 1}: when the user asks about {t}, answer {st}, stay accurate, and suggest "
                f"one further question about {TOPICS[(k * 7 + 3) % len(TOPICS)]}.")
        parts.append(rule)
        n += len(rule.split())
        k += 1
    return " ".join(parts)


def zipf_indices(n_items: int, count: int, s: float, seed: int) -> list[int]:
    """`count` draws of ranks 0..n_items-1 with P(k) proportional to 1/(k+1)^s."""
    import bisect
    import itertools
    import random

    cum = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n_items)))
    rng = random.Random(seed)
    return [min(bisect.bisect_left(cum, rng.random() * cum[-1]), n_items - 1) for _ in range(count)]


class HttpError(Exception):
    pass


async def _read_body(reader: asyncio.StreamReader, headers: dict):
    """Yield the response body in pieces: chunked, Content-Length or until EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readline()
            if not line:
                raise HttpError("connection closed inside a chunked body")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise HttpError("connection closed before Content-Length bytes")
            left -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


async def http_request(url: str, method: str, path: str, headers: dict, body: bytes | None = None):
    """Open a connection, send one request; return (status, headers, reader, writer)."""
    u = urlsplit(url)
    if u.scheme != "http":
        raise HttpError("only http:// URLs are supported")
    host, port = u.hostname, u.port or 80
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
            "User-Agent: openlora-bench/1"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        writer.close()
        raise HttpError(f"bad status line {status_line!r}")
    resp_headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        resp_headers[k.strip().lower()] = v.strip()
    return int(parts[1]), resp_headers, reader, writer


async def get_json(url: str, path: str, headers: dict, timeout: float = 30):
    async def go():
        status, h, reader, writer = await http_request(url, "GET", path, headers)
        try:
            data = b"".join([c async for c in _read_body(reader, h)])
        finally:
            writer.close()
        return status, data

    status, data = await asyncio.wait_for(go(), timeout)
    return status, json.loads(data) if status == 200 else data.decode("utf-8", "replace")


async def stream_chat(url: str, headers: dict, payload: dict, rec: dict, t0: float):
    """One streaming chat completion; fills rec with times (seconds since t0), text, usage."""
    base_path = urlsplit(url).path.rstrip("/")
    body = json.dumps(payload).encode()
    hdrs = dict(headers, **{"Content-Type": "application/json", "Accept": "text/event-stream"})
    rec["t_send"] = time.perf_counter() - t0
    status, h, reader, writer = await http_request(url, "POST", f"{base_path}/chat/completions", hdrs, body)
    try:
        if status != 200:
            data = b"".join([c async for c in _read_body(reader, h)])
            raise HttpError(f"HTTP {status}: {data.decode('utf-8', 'replace')[:300]}")
        chunk_times, pieces = [], []
        buf, data_lines, done = b"", [], False
        async for piece in _read_body(reader, h):
            now = time.perf_counter() - t0
            buf += piece
            while b"\n" in buf and not done:
                line, buf = buf.split(b"\n", 1)
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    d = line[5:]
                    data_lines.append(d[1:] if d.startswith(b" ") else d)
                    continue
                if line or not data_lines:
                    continue  # comment (ping), event:/id: field, or a blank line with no data
                data, data_lines = b"\n".join(data_lines), []
                if data.strip() == b"[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev and not ev.get("choices"):
                    raise HttpError(f"error event: {str(ev['error'])[:300]}")
                if ev.get("usage"):
                    rec["usage"] = ev["usage"]
                for ch in ev.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        chunk_times.append(now)
                        pieces.append(content)
                    if ch.get("finish_reason"):
                        rec["finish_reason"] = ch["finish_reason"]
            if done:
                break
        rec["t_end"] = time.perf_counter() - t0
        rec["chunk_times"] = chunk_times
        rec["text"] = "".join(pieces)
        rec["done_marker"] = done
    finally:
        writer.close()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(xs: list[float], scale: float, nd: int = 2) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50": round(percentile(xs, 50) * scale, nd), "p99": round(percentile(xs, 99) * scale, nd),
            "mean": round(sum(xs) / len(xs) * scale, nd), "max": round(max(xs) * scale, nd)}


def payload_for(model: str, prompt: str, max_tokens: int, extra: dict, system: str | None = None,
                lora_ids: dict | None = None, served_model: str | None = None) -> dict:
    """The request body; with `lora_ids` (llama-server), `model` names an adapter to select through
    the per-request `lora` field, and the body's `model` is `served_model`."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    p = {"model": model, "messages": msgs, "max_tokens": max_tokens,
         "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if lora_ids is not None:
        p["model"] = served_model
        if model in lora_ids:
            p["lora"] = [{"id": lora_ids[model], "scale": 1.0}]
    p.update(extra)
    return p


def parse_lora_ids(text: str | None) -> dict | None:
    """'a=0,b=1' -> {'a': 0, 'b': 1}; None when not given."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, idx = item.partition("=")
        if not sep or not name.strip() or not idx.strip().isdigit():
            raise SystemExit(f"--lora-ids: expected NAME=ID,... (ID a non-negative integer), got {item!r}")
        out[name.strip()] = int(idx)
    return out


async def run(a) -> tuple[dict, list[dict]]:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    adapters = [x for x in a.adapters.split(",") if x]
    extra = json.loads(a.extra_body) if a.extra_body else {}
    lora_ids = parse_lora_ids(a.lora_ids)
    served = a.served_model or "base"
    base_path = urlsplit(a.url).path.rstrip("/")
    info: dict = {}
    if lora_ids is not None:
        info["lora_ids"], info["served_model"] = lora_ids, served

    # the server's model list, if it has one
    try:
        status, models = await get_json(a.url, f"{base_path}/models", headers)
        if status == 200 and isinstance(models, dict) and isinstance(models.get("data"), list):
            ids = {m.get("id") for m in models["data"]}
            # llama-server lists its model (aliases), not the adapters it holds
            missing = [x for x in ([served] if lora_ids is not None else adapters) if x not in ids]
            info["models_listed"] = len(ids)
            if missing and not a.no_check_models:
                raise SystemExit(f"adapters not listed by {a.url}/models: {missing} (--no-check-models to go on)")
        else:
            info["models_listed"] = f"HTTP {status}"
    except (OSError, HttpError, asyncio.TimeoutError, ValueError) as e:
        info["models_listed"] = f"error: {e}"

    def system_for(tag: str) -> str | None:
        if a.unique_prompts:
            return f"Request {tag}. You are a helpful assistant."
        if not a.system_prompt_words:
            return None
        return system_prompt(a.system_prompt_words, f"Session {tag}." if a.unique_system else "")

    # untimed warm-up: one short request per adapter (the first --warmup-adapters), one at a time
    t_w = time.perf_counter()
    for _ in range(a.warmup):
        for j, ad in enumerate(adapters[:a.warmup_adapters or None]):
            rec: dict = {}
            await asyncio.wait_for(
                stream_chat(a.url, headers, payload_for(ad, PROMPTS[j % len(PROMPTS)], 4, extra,
                                                        system_for(f"warmup-{j}"), lora_ids, served), rec, t_w),
                a.timeout)
    info["warmup_s"] = round(time.perf_counter() - t_w, 2)

    if a.adapter_dist == "zipf":
        picks = zipf_indices(len(adapters), a.requests, a.zipf_s, a.seed)
    else:
        picks = [i % len(adapters) for i in range(a.requests)]
    recs = [{"i": i, "adapter": adapters[picks[i]], "prompt_idx": i % len(PROMPTS)} for i in range(a.requests)]
    sem = asyncio.Semaphore(a.concurrency)
    info["started_unix"] = round(time.time(), 4)
    t0 = time.perf_counter()

    async def one(rec):
        async with sem:
            try:
                await stream_chat(a.url, headers,
                                  payload_for(rec["adapter"], PROMPTS[rec["prompt_idx"]], a.max_tokens, extra,
                                              system_for(f"{a.seed}-{rec['i']}"), lora_ids, served),
                                  rec, t0)
            except (OSError, HttpError, ValueError, asyncio.IncompleteReadError) as e:
                rec["error"] = f"{type(e).__name__}: {e}"

    tasks = [asyncio.create_task(one(r)) for r in recs]
    done, pending = await asyncio.wait(tasks, timeout=a.timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        for r in recs:
            if "t_end" not in r and "error" not in r:
                r["error"] = f"timeout after {a.timeout} s"
    t_last = time.perf_counter() - t0
    return summarize(a, adapters, recs, t_last, info, extra), recs


def summarize(a, adapters, recs, t_last, info, extra) -> dict:
    ttft, itl, e2e, tokens, sources = [], [], [], 0, {"usage": 0, "finish_length": 0, "chunks": 0}
    ends = []
    for r in recs:
        if "error" in r:
            continue
        ct = r.get("chunk_times", [])
        if r.get("usage", {}).get("completion_tokens") is not None:
            n, src = int(r["usage"]["completion_tokens"]), "usage"
        elif r.get("finish_reason") == "length":
            n, src = a.max_tokens, "finish_length"
        else:
            n, src = len(ct), "chunks"
        r["completion_tokens"], r["token_count_source"] = n, src
        sources[src] += 1
        tokens += n
        if ct:
            r["ttft_s"] = ct[0] - r["t_send"]
            ttft.append(r["ttft_s"])
            gaps = [b - x for x, b in zip(ct, ct[1:])]
            itl.extend(gaps)
            r["itl_mean_s"] = sum(gaps) / len(gaps) if gaps else None
            r["itl_max_s"] = max(gaps) if gaps else None
        r["e2e_s"] = r["t_end"] - r["t_send"]
        e2e.append(r["e2e_s"])
        ends.append(r["t_end"])
    ok = len(e2e)
    wall = max(ends) if ends else t_last  # t0 is the first send
    prompt_toks = [r["usage"]["prompt_tokens"] for r in recs
                   if "error" not in r and r.get("usage", {}).get("prompt_tokens") is not None]
    used = sorted({r["adapter"] for r in recs})
    per_adapter = {}
    for ad in (adapters if len(adapters) <= 16 else []):
        rs = [r for r in recs if r["adapter"] == ad and "error" not in r]
        per_adapter[ad] = {
            "requests": len(rs), "tokens": sum(r["completion_tokens"] for r in rs),
            "ttft_p50_ms": round(percentile([r["ttft_s"] for r in rs if "ttft_s" in r], 50) * 1e3, 1) if rs else None,
            "e2e_p50_s": round(percentile([r["e2e_s"] for r in rs], 50), 3) if rs else None}
    return {
        "bench": "mixed_adapters", "url": a.url,
        "adapters": adapters if len(adapters) <= 16 else f"{len(adapters)} adapters: {adapters[0]} ... {adapters[-1]}",
        "adapter_dist": a.adapter_dist if a.adapter_dist == "cycle" else f"zipf(s={a.zipf_s}, seed={a.seed})",
        "distinct_adapters_used": len(used), "system_prompt_words": a.system_prompt_words,
        "unique_system": a.unique_system, "unique_prompts": a.unique_prompts,
        "prompt_tokens_mean": round(sum(prompt_toks) / len(prompt_toks), 1) if prompt_toks else None,
        "requests": a.requests,
        "concurrency": a.concurrency, "max_tokens": a.max_tokens, "temperature": 0, "extra_body": extra,
        "warmup_rounds": a.warmup, **info,
        "ok": ok, "errors": len(recs) - ok,
        "wall_s": round(wall, 3), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 and ok else None,
        "ttft_ms": dist(ttft, 1e3, 1), "itl_ms": dist(itl, 1e3, 2), "e2e_s": dist(e2e, 1, 3),
        "token_count_source": sources, "per_adapter": per_adapter,
        "first_error": next((r["error"] for r in recs if "error" in r), None),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="base URL of the OpenAI API, e.g. http://127.0.0.1:8090/v1")
    ap.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    ap.add_argument("--adapters", required=True, help="comma-separated model names (request i uses i %% n)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32, help="total requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of one request per adapter")
    ap.add_argument("--warmup-adapters", type=int, default=0,
                    help="warm up only the first N adapters (0: all)")
    ap.add_argument("--adapter-dist", choices=["cycle", "zipf"], default="cycle",
                    help="request i's adapter: i %% n (cycle) or a Zipf draw over the list (zipf)")
    ap.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent for --adapter-dist zipf")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Zipf draws and of --unique-system tags")
    ap.add_argument("--system-prompt-words", type=int, default=0,
                    help="prepend a long built-in system message of about this many words (0: none)")
    ap.add_argument("--unique-system", action="store_true",
                    help="start each request's system message with its own tag (no shared prefix)")
    ap.add_argument("--unique-prompts", action="store_true",
                    help="a short system message with a per-request tag first in every request (no shared prefix)")
    ap.add_argument("--extra-body", help="JSON object merged into every request body")
    ap.add_argument("--lora-ids", help="llama-server: NAME=ID,... adapter names sent as the per-request "
                                       "`lora` field [{id: ID, scale: 1.0}]; other names get the base model")
    ap.add_argument("--served-model", help="with --lora-ids: the body's `model` and the name /models must "
                                           "list (default: base)")
    ap.add_argument("--no-check-models", action="store_true",
                    help="go on when /models lists models but not all the adapters")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the whole timed run")
    ap.add_argument("--out", help="write the summary plus per-request details here")
    ap.add_argument("--label", help="free text stored in the JSON (e.g. the engine)")
    return ap


def run_client(argv: list[str]) -> tuple[dict, list[dict]]:
    """The same as the command line, in process: (summary, per-request records)."""
    a = parser().parse_args(argv)
    summary, recs = asyncio.run(run(a))
    if a.label:
        summary["label"] = a.label
    return summary, recs


def main() -> int:
    a = parser().parse_args()
    summary, recs = asyncio.run(run(a))
    if a.label:
        summary["label"] = a.label
    print(json.dumps(summary))
    if a.out:
        detail = []
        for r in recs:
            d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "chunk_times"}
            d["content_chunks"] = len(r.get("chunk_times", []))
            detail.append(d)
        with open(a.out, "w") as f:
            json.dump({**summary, "request_details": detail}, f, indent=1)
            f.write("\n")
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
