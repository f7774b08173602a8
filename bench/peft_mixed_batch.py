"""Peer measurement for `openlora bench --batch N`: batched decode where every row uses a
different LoRA adapter, with HF transformers + PEFT on CPU.

Run with the reference venv's python (torch, transformers, peft), e.g.

    /root/.cache/openlora/venv-ref/bin/python bench/peft_mixed_batch.py --batch 8 --steps 32

What it measures (the same as `openlora bench --batch N --lora-rank R --steps S`):

* N sequences with 32-token synthetic prompts (row j uses the ids `100 + (i * 7919) % 40000`
  for i in j..j+32, like openlora), prefilled in one batch (not timed), then S greedy decode
  steps of one token for all N rows at once (argmax of the last logits, EOS ignored).
  tokens/s = N * S / wall time of the S decode steps (forward passes + argmax).
* N synthetic PEFT LoRA adapters on one PeftModel (rank R, alpha 2R, all seven projections
  q,k,v,o,gate,up,down; A ~ U(-1/sqrt(in), 1/sqrt(in)), B ~ U(-0.01, 0.01), fixed seeds,
  the same distributions as openlora's synthetic adapters).
* Three modes, each through PEFT's mixed-batch inference path (`adapter_names=[...]` passed to
  every forward call):
    - base: every row "__base__"
    - one adapter: every row adapter 0
    - distinct adapters: row j uses adapter j
* Best of --repeat runs for each mode, after one warm-up.

Also reported, under "extra": the base model with adapters disabled (`disable_adapter()`, no
PEFT hooks) and one adapter made active with `set_adapter` (PEFT's ordinary, non-mixed path),
so the cost of the mixed-batch hooks themselves can be seen. With --check (default on) the
script also verifies, on a few tokens, that `generate(adapter_names=...)` with the KV cache
gives the same tokens as the manual decode loop, and that each mixed-batch row matches that
adapter run alone.

Prints one JSON line on stdout (and writes it to --out if given).
"""

import argparse
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

PROMPT_LEN = 32
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cache_dir():
    if os.environ.get("OPENLORA_CACHE"):
        return Path(os.environ["OPENLORA_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "openlora"
    return Path.home() / ".cache" / "openlora"


def bench_prompt(n):
    return [100 + (i * 7919) % 40000 for i in range(n)]


def batch_prompts(n):
    return [bench_prompt(PROMPT_LEN + j)[j:] for j in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(cache_dir() / "smollm2-hf"),
                    help="HF model folder (default: <cache>/smollm2-hf)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the generate()/per-adapter consistency checks")
    ap.add_argument("--out", help="also write the JSON line to this file")
    a = ap.parse_args()
    if a.batch < 1 or a.steps < 1 or a.lora_rank < 1:
        sys.exit("--batch, --steps and --lora-rank must be at least 1")
    model_dir = Path(a.model)
    if not (model_dir / "config.json").exists():
        sys.exit(
            f"model folder {model_dir} not found; create it with "
            "tests/fixtures/make_fixtures.py (it writes the dequantized default model, "
            "SmolLM2-135M-Instruct in f32, as an HF folder into the openlora cache)"
        )

    import torch
    import transformers
    import peft
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(a.threads)
    n, r, steps = a.batch, a.lora_rank, a.steps

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.eval()
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=PROJECTIONS,
                     bias="none", task_type="CAUSAL_LM")
    names = [f"synth-{i}" for i in range(n)]
    model = get_peft_model(base, cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    # Synthetic weights, same distributions as openlora's synth::random_lora.
    with torch.no_grad():
        for i, name in enumerate(names):
            g = torch.Generator().manual_seed(1000 + i)
            for mod in model.modules():
                if hasattr(mod, "lora_A") and name in getattr(mod, "lora_A", {}):
                    A, B = mod.lora_A[name].weight, mod.lora_B[name].weight  # [r, in], [out, r]
                    ra = 1.0 / A.shape[1] ** 0.5
                    A.copy_((torch.rand(A.shape, generator=g) * 2 - 1) * ra)
                    B.copy_((torch.rand(B.shape, generator=g) * 2 - 1) * 0.01)
    model.eval()
    n_lora_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A") and names[0] in m.lora_A)

    prompts = torch.tensor(batch_prompts(n), dtype=torch.long)
    # transformers 5.x renamed `past_key_values` to `cache` (the old name still works, with a
    # deprecation warning, until 5.40); use whichever the model's forward takes.
    cache_kw = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"

    def cache_of(out):
        return getattr(out, cache_kw)

    def decode(adapter_names, k, set_adapter=None, disabled=False, rows=None):
        """Prefill (untimed), then k greedy steps; returns (tokens [rows, k], seconds)."""
        ids = prompts if rows is None else prompts[rows]
        kw = {} if adapter_names is None else {"adapter_names": adapter_names}
        if set_adapter is not None:
            model.set_adapter(set_adapter)
        ctx = model.disable_adapter() if disabled else _null()
        with ctx:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
            past = cache_of(out)
            nxt = out.logits[:, -1].argmax(-1)
            toks = []
            t0 = time.perf_counter()
            for _ in range(k):
                toks.append(nxt)
                out = model(input_ids=nxt[:, None], use_cache=True, **{cache_kw: past}, **kw)
                past = cache_of(out)
                nxt = out.logits[:, -1].argmax(-1)
            dt = time.perf_counter() - t0
        return torch.stack(toks, 1), dt

    modes = {
        "base_tok_s": dict(adapter_names=["__base__"] * n),
        "one_adapter_tok_s": dict(adapter_names=[names[0]] * n),
        "distinct_adapters_tok_s": dict(adapter_names=list(names)),
    }
    extra_modes = {
        "base_adapters_disabled_tok_s": dict(adapter_names=None, disabled=True),
        "one_adapter_set_adapter_tok_s": dict(adapter_names=None, set_adapter=names[0]),
    }

    best = {}
    runs = {}
    mon = CpuMonitor()
    with torch.inference_mode():
        # Warm-up: one short run of the distinct mode (touches every adapter's weights).
        decode(list(names), min(steps, 4))
        for _ in range(max(1, a.repeat)):
            for key, m in list(modes.items()) + list(extra_modes.items()):
                _, dt = decode(k=steps, **m)
                tps = n * steps / dt
                runs.setdefault(key, []).append(tps)
                best[key] = max(best.get(key, 0.0), tps)

        load = mon.report(os.cpu_count() or 1)
        checks = None
        if a.check:
            checks = run_checks(model, decode, names, n, prompts)

    share = load.get("other_processes_share")
    if share is not None and share > 0.05:
        print(f"WARNING: other processes used {share:.0%} of the machine's CPU during the "
              "measurement; the figures are not reliable (torch's OpenMP threads collapse when "
              "a core is taken, often by 10x or more)", file=sys.stderr)
    b, s, d = best["base_tok_s"], best["one_adapter_tok_s"], best["distinct_adapters_tok_s"]
    result = {
        "engine": "transformers+peft",
        "threads": torch.get_num_threads(),
        "model": str(model_dir),
        "batch": n,
        "lora_rank": r,
        "steps": steps,
        "base_tok_s": b,
        "one_adapter_tok_s": s,
        "distinct_adapters_tok_s": d,
        "lora_overhead_distinct": 1.0 - d / b,
        "extra": {k: best[k] for k in extra_modes},
        "runs": runs,
        "lora_layers_per_adapter": n_lora_layers,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "checks": checks,
        "machine_load": load,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "cpus": os.cpu_count(),
    }
    line = json.dumps(result)
    print(line)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(line + "\n")


class CpuMonitor:
    """CPU time other processes (and steal) used during the measurement, from /proc/stat minus
    this process's own CPU time, so that a run disturbed by other work is flagged."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0, self.stat0, self.own0 = time.time(), self._stat(), self._own()

    @staticmethod
    def _stat():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        v += [0] * (8 - len(v))
        return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "steal": v[7]}

    @staticmethod
    def _own():
        import resource

        s = resource.getrusage(resource.RUSAGE_SELF)
        return s.ru_utime + s.ru_stime

    def report(self, ncpu):
        s1 = self._stat()
        if self.stat0 is None or s1 is None:
            return {"error": "/proc/stat unreadable"}
        wall = time.time() - self.t0
        busy = (s1["busy"] - self.stat0["busy"]) / self.hz
        steal = (s1["steal"] - self.stat0["steal"]) / self.hz
        others = max(0.0, busy - (self._own() - self.own0))
        try:
            load = open("/proc/loadavg").read().split()[:3]
        except OSError:
            load = None
        return {"wall_s": round(wall, 2), "other_processes_cpu_s": round(others, 2),
                "other_processes_share": round(others / (wall * ncpu), 3) if wall > 0 else None,
                "steal_cpu_s": round(steal, 2), "loadavg_end": load}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _upto_eos(row, eos):
    out = []
    for t in row:
        if t in eos:
            break
        out.append(t)
    return out


def run_checks(model, decode, names, n, prompts, k=4):
    """Consistency checks (not timed). Returns a dict of findings."""
    import torch

    res = {}
    distinct = list(names)
    # 1. generate() with adapter_names (mixed batch + KV cache) == the manual decode loop.
    manual, _ = decode(distinct, k)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    try:
        gen = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                             adapter_names=distinct, max_new_tokens=k, do_sample=False,
                             use_cache=True, pad_token_id=model.config.pad_token_id)
        gen = gen[:, prompts.shape[1]:].tolist()
        res["generate_adapter_names_ok"] = all(
            _upto_eos(g, eos) == _upto_eos(m, eos) for g, m in zip(gen, manual.tolist())
        )
    except Exception as e:  # report rather than fail the benchmark
        res["generate_adapter_names_ok"] = False
        res["generate_error"] = f"{type(e).__name__}: {e}"
    # 2. Each mixed-batch row's logits == that adapter run alone (set_adapter, one row).
    mix = model(input_ids=prompts, adapter_names=distinct, logits_to_keep=1).logits[:, -1]
    base = model(input_ids=prompts, adapter_names=["__base__"] * n, logits_to_keep=1).logits[:, -1]
    diffs = []
    for j in range(min(n, 4)):
        model.set_adapter(names[j])
        alone = model(input_ids=prompts[j:j + 1], logits_to_keep=1).logits[0, -1]
        diffs.append(float((alone - mix[j]).abs().max()))
    res["max_abs_logit_diff_mixed_vs_alone"] = max(diffs)
    # 3. The adapters do change the output (smallest per-row max |logit - base logit|).
    res["min_row_max_abs_logit_diff_vs_base"] = float((mix - base).abs().amax(-1).min())
    return res


if __name__ == "__main__":
    main()
