"""End-to-end checks of openlora's HTTP API with the official `openai` Python package.

Run by runtime/tests/server.rs against a live `openlora serve` on 127.0.0.1 (the quickstart's
tenants and adapters). Usage: python openai_client.py BASE_URL MODEL_ID
Exits non-zero with a message on the first failed check.
"""

import re
import sys

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

BASE, MODEL = sys.argv[1], sys.argv[2]
USER, PARTNER, ADMIN = "sk-demo-user", "sk-demo-partner", "sk-demo-admin"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
DOG = "Once upon a time, there was a little dog named"


def client(key):
    return openai.OpenAI(base_url=BASE + "/v1", api_key=key, max_retries=0, timeout=120)


def metrics():
    text = httpx.get(BASE + "/metrics", headers={"Authorization": "Bearer " + ADMIN}).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m, name):
    return sum(v for (n, _), v in m.items() if n == name)


def check(cond, what):
    if not cond:
        sys.exit("FAILED: " + what)
    print("ok:", what.split("\n")[0])


user, partner, admin = client(USER), client(PARTNER), client(ADMIN)
before = metrics()

# /v1/models: the base and the adapters this tenant may see, adapters with parent = base.
ids = {m.id: m for m in user.models.list().data}
check(MODEL in ids and "caps" in ids and "signature" in ids, f"user sees base + public adapters: {sorted(ids)}")
check("pirate" not in ids, "the private adapter is invisible to another tenant")
check(getattr(ids["caps"], "parent", None) == MODEL, "adapters list the base as parent")
check("pirate" in {m.id for m in partner.models.list().data}, "the partner sees its private adapter")

# Chat with the base model, greedy: the known output.
r = user.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
check(r.choices[0].message.content == "The capital of France is Paris.", f"base chat: {r.choices[0].message.content!r}")
check(r.choices[0].finish_reason == "stop", "finish_reason stop")
check(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, "usage is reported")

# Completions, greedy, non-streaming and streaming give the same known text.
r = user.completions.create(model=MODEL, prompt=DOG, temperature=0, max_tokens=16)
want = " Max who loved to play with his toy car. One day, he decided to"
check(r.choices[0].text == want and r.choices[0].finish_reason == "length", f"completion: {r.choices[0].text!r}")
chunks = list(user.completions.create(model=MODEL, prompt=DOG, temperature=0, max_tokens=16, stream=True,
                                      stream_options={"include_usage": True}))
text = "".join(c.choices[0].text for c in chunks if c.choices)
check(text == want, f"streamed completion equals the whole one: {text!r}")
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16, "stream ends with usage")

# An adapter by `model`, streamed: the caps adapter capitalises every word.
stream = user.chat.completions.create(model="caps", messages=FRANCE, temperature=0, max_tokens=40, stream=True)
parts, finish = [], None
for c in stream:
    if c.choices:
        parts.append(c.choices[0].delta.content or "")
        finish = c.choices[0].finish_reason or finish
caps = "".join(parts)
words = [w for w in caps.split() if re.match(r"[^\w\s]*[A-Za-z]", w)]
title = words and sum(bool(re.match(r"[^\w\s]*[A-Z]", w)) for w in words) >= 0.8 * len(words)  # Title Case
check(len(parts) > 3 and title, f"caps adapter streamed: {caps!r}")
check(finish in ("stop", "length"), "streamed finish_reason")

# The private adapter works for its tenant and is a 404 for others.
r = partner.chat.completions.create(model="pirate", messages=FRANCE, temperature=0, max_tokens=40)
pirate = r.choices[0].message.content
check(any(w in pirate.lower() for w in ("arr", "matey", " ye ", "aye")), f"pirate adapter: {pirate!r}")
try:
    user.chat.completions.create(model="pirate", messages=FRANCE, max_tokens=4)
    check(False, "another tenant used the private adapter")
except openai.NotFoundError:
    check(True, "another tenant gets 404 for the private adapter")

# Two adapters composed through the extension field: both behaviours show.
r = partner.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea."}], temperature=0, max_tokens=60,
    extra_body={"adapters": [{"name": "pirate", "weight": 1.0}, {"name": "signature", "weight": 1.0}]})
both = r.choices[0].message.content
check(both != pirate and len(both) > 0, f"composed pirate+signature: {both!r}")
alone = partner.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea."}], temperature=0, max_tokens=60)
check(both != alone.choices[0].message.content, "composition changes the output")
r = partner.chat.completions.create(
    model=MODEL, messages=FRANCE, temperature=0, max_tokens=30,
    extra_body={"adapters": [{"name": "pirate", "weight": 0.5}, {"name": "signature", "weight": 0.5}],
                "merge": {"method": "linear"}})
check(len(r.choices[0].message.content) > 0, f"merged (linear) adapters: {r.choices[0].message.content!r}")

# n, seed, stop, logprobs.
r = user.completions.create(model=MODEL, prompt=DOG, max_tokens=8, n=2, seed=7, temperature=1.0)
r2 = user.completions.create(model=MODEL, prompt=DOG, max_tokens=8, n=2, seed=7, temperature=1.0)
check(len(r.choices) == 2 and [c.text for c in r.choices] == [c.text for c in r2.choices], "n=2 with a seed repeats")
r = user.completions.create(model=MODEL, prompt=DOG, max_tokens=16, temperature=0, stop=[" toy"])
check(r.choices[0].text == " Max who loved to play with his" and r.choices[0].finish_reason == "stop", "stop string")
r = user.completions.create(model=MODEL, prompt=DOG, max_tokens=3, temperature=0, logprobs=2)
lp = r.choices[0].logprobs
check(len(lp.token_logprobs) == 3 and all(v <= 0 for v in lp.token_logprobs) and len(lp.top_logprobs[0]) == 2,
      "completion logprobs")
r = user.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3, temperature=0, logprobs=True,
                                 top_logprobs=3)
c = r.choices[0].logprobs.content
check(len(c) == 3 and len(c[0].top_logprobs) == 3 and c[0].top_logprobs[0].logprob >= c[0].top_logprobs[1].logprob,
      "chat logprobs")

# Errors in the OpenAI shape, with the right status.
for fn, exc, what in [
    (lambda: user.chat.completions.create(model="no-such-model", messages=FRANCE), openai.NotFoundError, "unknown model 404"),
    (lambda: client("sk-wrong").models.list(), openai.AuthenticationError, "wrong key 401"),
    (lambda: user.completions.create(model=MODEL, prompt=DOG, max_tokens=-1), openai.BadRequestError, "negative max_tokens 400"),
    (lambda: user.completions.create(model=MODEL, prompt=DOG, temperature=-2), openai.BadRequestError, "bad temperature 400"),
]:
    try:
        fn()
        check(False, what + " (no error)")
    except exc as e:
        check(isinstance(e.body, dict) and "message" in e.body, what)

# Metrics moved.
after = metrics()
check(metric(after, "vllm:generation_tokens_total") > metric(before, "vllm:generation_tokens_total"),
      "vllm:generation_tokens_total moved")
check(metric(after, "vllm:request_success_total") > metric(before, "vllm:request_success_total"),
      "vllm:request_success_total moved")
check(("vllm:num_requests_running", (("model_name", MODEL),)) in after, "vllm:num_requests_running present")
check(any(n == "vllm:lora_requests_info" for (n, _) in after), "vllm:lora_requests_info present")
print("all openai-client checks passed")
