"""Structured output through the official `openai` package, against a live `openlora serve`.

Run by runtime/tests/server.rs on 127.0.0.1 (the quickstart's tenants and adapters).
Usage: python structured.py BASE_URL MODEL_ID
Exits non-zero with a message on the first failed check.

What is checked: `client.chat.completions.parse(response_format=PydanticModel)` returns a parsed
object for each of 20 prompts (the base model and an adapter), `json_object` output always parses
as a JSON object, vLLM's `guided_choice`/`guided_regex`/`guided_json` (through `extra_body`) hold,
a streamed constrained answer joins to valid JSON, a token banned with `logit_bias` -100 never
appears, and a broken schema is the server's 400 naming the field.
"""

import json
import re
import sys

import httpx
import openai
from pydantic import BaseModel

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="sk-demo-user", max_retries=0, timeout=300)


def check(cond, what):
    if not cond:
        sys.exit("FAILED: " + what)
    print("ok:", what.split("\n")[0])


class Capital(BaseModel):
    country: str
    capital: str


COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil", "India", "Kenya",
             "Norway", "Peru", "Greece", "Poland", "Chile", "Cuba", "Ireland", "Portugal", "Mexico", "China"]

parsed = 0
for i, country in enumerate(COUNTRIES):
    model = MODEL if i % 2 == 0 else "caps"
    r = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": f"What is the capital of {country}? Answer in JSON."}],
        response_format=Capital, temperature=0, max_tokens=96)
    msg = r.choices[0].message
    check(isinstance(msg.parsed, Capital), f"parse() #{i} ({model}, {country}) gave {msg.content!r}")
    check(r.choices[0].finish_reason == "stop", f"parse() #{i} finished: {r.choices[0].finish_reason}")
    parsed += 1
check(parsed == 20, f"parse() returned a parsed object on {parsed} of 20 prompts")

for i, q in enumerate(["Tell me about dogs.", "List two fruits.", "Describe the weather.", "Who are you?",
                       "Give me a recipe."]):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q + " Reply in JSON."}],
        response_format={"type": "json_object"}, temperature=0.8, seed=i, max_tokens=160)
    c = r.choices[0]
    if c.finish_reason == "stop":
        check(isinstance(json.loads(c.message.content), dict), f"json_object #{i}: {c.message.content!r}")
    else:
        check(c.finish_reason == "length", f"json_object #{i} ended {c.finish_reason}")
        print("  (ran to max_tokens: the JSON is cut, as OpenAI's is)")

r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}], temperature=1.0, max_tokens=8,
    extra_body={"guided_choice": ["yes", "no"]})
check(r.choices[0].message.content in ("yes", "no"), f"guided_choice: {r.choices[0].message.content!r}")

r = client.completions.create(
    model=MODEL, prompt="My phone number is", temperature=1.0, max_tokens=16, n=3, seed=3,
    extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
for c in r.choices:
    check(re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.text) is not None, f"guided_regex on /v1/completions, n=3: {c.text!r}")

stream = client.chat.completions.create(
    model="signature", messages=[{"role": "user", "content": "What is the capital of Italy? Answer in JSON."}],
    temperature=0, max_tokens=96, stream=True,
    extra_body={"guided_json": Capital.model_json_schema()})
text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
check(Capital.model_validate_json(text) is not None, f"a streamed guided_json answer joins to valid JSON: {text!r}")

# logit_bias -100 bans a token even where the grammar would allow it.
yes = httpx.post(BASE + "/tokenize", json={"model": MODEL, "prompt": "yes", "add_special_tokens": False},
                 headers={"Authorization": "Bearer sk-demo-user"}).json()["tokens"]
check(len(yes) == 1, f"'yes' is one token: {yes}")
for seed in range(5):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}], temperature=1.0, seed=seed,
        max_tokens=8, logit_bias={str(yes[0]): -100}, logprobs=True, extra_body={"guided_choice": ["yes", "no"]})
    c = r.choices[0]
    toks = [t.token for t in c.logprobs.content]
    check(c.message.content in ("yes", "no") and "yes" not in toks,
          f"a banned token never appears, the grammar still holds (seed {seed}): {toks}")

try:
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        response_format={"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}})
    sys.exit("FAILED: a broken schema was answered")
except openai.BadRequestError as e:
    check(e.body.get("param") == "response_format" and "response_format" in e.body.get("message", ""),
          f"a broken schema is a 400 naming response_format: {e.body.get('message')!r}")

print("all structured-output checks passed")
