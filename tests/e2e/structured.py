"""Structured output through the official `openai` package, against a live `openlora serve`.

Run by runtime/tests/server.rs on 127.0.0.1 (the quickstart's tenants and adapters).
Usage: python structured.py BASE_URL MODEL_ID
Exits non-zero with a message on the first failed check.

What is checked: `client.chat.completions.parse(response_format=PydanticModel)` returns a parsed
object for each of 20 prompts (the base model and an adapter), `json_object` output always parses
as a JSON object, vLLM's `guided_choice`/`guided_regex`/`guided_json` (through `extra_body`) hold,
a streamed constrained answer joins to valid JSON, a token banned with `logit_bias` -100 never
appears, a broken schema is the server's 400 naming the field; and tool calls: `tool_choice`
"required" always yields a call whose arguments validate against the tool's schema, a named
function is the one called, streamed calls arrive as `tool_calls` deltas, `parse()` with a strict
`pydantic_function_tool` parses, and a conversation carrying a call and its result goes on.
"""

import json
import re
import sys

import httpx
import openai
from pydantic import BaseModel

BASE, MODEL = sys.argv[1], sys.argv[2]
# Retries: a fail-closed plugin of the quickstart refuses with 503 ("a retry may succeed") when the
# host is too loaded to give it the CPU within its deadline (e.g. beside other tests).
client = openai.OpenAI(base_url=BASE + "/v1", api_key="sk-demo-user", max_retries=3, timeout=300)


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

# ---- tool calls (the Hermes-style fallback format; the default model's template has no tools) ----
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

for i, city in enumerate(["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]):
    r = client.chat.completions.create(
        model=MODEL if i % 2 == 0 else "caps", messages=[{"role": "user", "content": f"What is the weather in {city}?"}],
        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=0.7, seed=i,
        max_tokens=128)
    c = r.choices[0]
    calls = c.message.tool_calls or []
    check(c.finish_reason == "tool_calls" and len(calls) == 1, f"required #{i}: {c.finish_reason} {c.message}")
    args = json.loads(calls[0].function.arguments)
    ok = (calls[0].function.name == "get_weather" and isinstance(args.get("city"), str) and args.get("unit") in "CF"
          and set(args) == {"city", "unit"}) or (calls[0].function.name == "get_time" and isinstance(args.get("city"), str))
    check(ok and calls[0].id.startswith("call_"), f"required #{i}: the call validates: {calls[0]}")

r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "What time is it in Rome?"}], tools=[WEATHER, TIME],
    tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=96)
calls = r.choices[0].message.tool_calls or []
check(len(calls) == 1 and calls[0].function.name == "get_time" and "city" in json.loads(calls[0].function.arguments),
      f"a named function is the one called: {r.choices[0].message}")

stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "What is the weather in Berlin?"}], tools=[WEATHER],
    tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=96, stream=True)
name, arguments, finish = None, "", None
for ch in stream:
    if not ch.choices:
        continue
    d = ch.choices[0].delta
    for tc in d.tool_calls or []:
        name = tc.function.name or name
        arguments += tc.function.arguments or ""
    finish = ch.choices[0].finish_reason or finish
check(name == "get_weather" and "city" in json.loads(arguments) and finish == "tool_calls",
      f"a streamed call arrives as tool_calls deltas: {name} {arguments!r} {finish}")


class Lookup(BaseModel):
    country: str


r = client.chat.completions.parse(
    model=MODEL, messages=[{"role": "user", "content": "Look up the capital of Japan."}],
    tools=[openai.pydantic_function_tool(Lookup)], tool_choice="required", parallel_tool_calls=False, temperature=0,
    max_tokens=96)
calls = r.choices[0].message.tool_calls or []
check(len(calls) == 1 and isinstance(calls[0].function.parsed_arguments, Lookup),
      f"parse() with a strict pydantic_function_tool: {r.choices[0].message}")

# The conversation goes on with the call and its result; the answer is text.
first = calls[0]
r = client.chat.completions.create(
    model=MODEL, temperature=0, max_tokens=48, tools=[openai.pydantic_function_tool(Lookup)],
    messages=[{"role": "user", "content": "Look up the capital of Japan."},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": first.id, "type": "function",
                   "function": {"name": first.function.name, "arguments": first.function.arguments}}]},
              {"role": "tool", "tool_call_id": first.id, "content": "Tokyo"}],
    tool_choice="none")
check(r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content,
      f"a conversation with a tool call and its result continues in text: {r.choices[0].message.content!r}")

# Two parallel calls and their two results (one turn for the model).
r = client.chat.completions.create(
    model=MODEL, temperature=0, max_tokens=32, tools=[WEATHER], tool_choice="auto",
    messages=[{"role": "user", "content": "Weather in Rome and Oslo?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\", \"unit\": \"C\"}"}},
                  {"id": "call_2", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"C\"}"}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
              {"role": "tool", "tool_call_id": "call_2", "content": "3 C, snow"}])
check(r.choices[0].message.content or r.choices[0].message.tool_calls,
      f"a conversation with two parallel calls and their results is answered: {r.choices[0].message}")

try:
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "no_such_tool"}})
    sys.exit("FAILED: a tool_choice naming no tool was answered")
except openai.BadRequestError as e:
    check(e.body.get("param") == "tool_choice", f"an unknown named tool is a 400 on tool_choice: {e.body}")

print("all structured-output checks passed")
