"""End-to-end checks of openlora's OpenAI surface through the frameworks applications use:
langchain-openai (`ChatOpenAI`, `OpenAI`), litellm (`completion`, with the `openai/` prefix
users give for an OpenAI-compatible server and the `hosted_vllm/` prefix for a vLLM one) and
llama-index's `OpenAILike` (which talks to `/v1/completions` unless told it is a chat model).

Run by runtime/tests/server.rs against a live `openlora serve` on 127.0.0.1 (the quickstart's
tenants and adapters). Usage: python frameworks.py BASE_URL MODEL_ID
Exits non-zero with a message on the first failed check.

What is checked: the greedy answers are the known ones (the same through every client), a
stream joins to the whole answer and reports usage, an adapter is chosen by `model`, and what
structured output and tool calls work (`with_structured_output` both ways, `bind_tools`,
`response_format`), and what the server refuses reaches the framework's user as the server's 400
naming the field, never as an answer that silently ignored it.
"""

import json
import os
import sys

# litellm fetches its model price list from the internet at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
import openai  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_openai import ChatOpenAI, OpenAI  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.llms.openai_like import OpenAILike  # noqa: E402
from pydantic import BaseModel  # noqa: E402

BASE, MODEL = sys.argv[1], sys.argv[2]
USER = "sk-demo-user"
FRANCE_Q = "What is the capital of France?"
FRANCE_A = "The capital of France is Paris."


def check(cond, what):
    if not cond:
        sys.exit("FAILED: " + what)
    print("ok:", what.split("\n")[0])


def title_case(text):
    """The caps adapter's style: at least 80% of the words start with a capital."""
    words = [w for w in text.split() if w[:1].isalpha()]
    return bool(words) and sum(w[0].isupper() for w in words) >= 0.8 * len(words)


def refused(call, field):
    """Runs `call`; it must raise the server's 400 naming `field`."""
    try:
        out = call()
    except (openai.BadRequestError, litellm.BadRequestError) as e:
        text = str(e)
        check(field in text, f"the 400 names `{field}`: {text[:200]}")
        return
    sys.exit(f"FAILED: a request with `{field}` was answered instead of refused: {out!r}"[:500])


# ---- langchain-openai ----
chat = ChatOpenAI(base_url=BASE + "/v1", api_key=USER, model=MODEL, temperature=0, max_tokens=32, max_retries=0,
                  timeout=120)
m = chat.invoke([HumanMessage(FRANCE_Q)])
check(m.content == FRANCE_A, f"langchain ChatOpenAI.invoke: {m.content!r}")
check(m.usage_metadata and m.usage_metadata["output_tokens"] > 0, f"langchain usage: {m.usage_metadata}")
check(m.response_metadata.get("finish_reason") == "stop", f"langchain finish_reason: {m.response_metadata}")

chunks = list(ChatOpenAI(base_url=BASE + "/v1", api_key=USER, model=MODEL, temperature=0, max_tokens=32,
                         max_retries=0, timeout=120, stream_usage=True).stream([HumanMessage(FRANCE_Q)]))
check("".join(c.content for c in chunks) == FRANCE_A, "langchain stream joins to the whole answer")
check(len([c for c in chunks if c.content]) > 1, f"langchain stream came in pieces: {len(chunks)} chunks")
usage = [c.usage_metadata for c in chunks if c.usage_metadata]
check(usage and usage[-1]["output_tokens"] == m.usage_metadata["output_tokens"],
      f"langchain stream usage (stream_options.include_usage): {usage}")

caps = ChatOpenAI(base_url=BASE + "/v1", api_key=USER, model="caps", temperature=0, max_tokens=32, max_retries=0,
                  timeout=120).invoke([HumanMessage(FRANCE_Q)])
check(title_case(caps.content) and "Paris" in caps.content, f"langchain with model=caps: {caps.content!r}")


class Capital(BaseModel):
    country: str
    capital: str


# Room for a whole JSON answer or call (the plain checks above keep 32 tokens).
chat = ChatOpenAI(base_url=BASE + "/v1", api_key=USER, model=MODEL, temperature=0, max_tokens=128, max_retries=0,
                  timeout=120)
got = chat.with_structured_output(Capital).invoke(FRANCE_Q + " Answer in JSON.")
check(isinstance(got, Capital) and got.capital, f"langchain with_structured_output (json_schema): {got!r}")
got = chat.with_structured_output(Capital, method="function_calling").invoke(FRANCE_Q)
check(isinstance(got, Capital) and got.capital, f"langchain with_structured_output (function_calling): {got!r}")
msg = chat.bind_tools([Capital], tool_choice="required").invoke(FRANCE_Q)
check(len(msg.tool_calls) >= 1 and msg.tool_calls[0]["name"] == "Capital" and "capital" in msg.tool_calls[0]["args"],
      f"langchain bind_tools(tool_choice='required'): {msg.tool_calls}")
refused(lambda: chat.bind(functions=[{"name": "f", "parameters": {}}]).invoke(FRANCE_Q), "functions")

llm = OpenAI(base_url=BASE + "/v1", api_key=USER, model=MODEL, temperature=0, max_tokens=8, max_retries=0,
             timeout=120)
text = llm.invoke("The capital of France is")
check(isinstance(text, str) and text.strip(), f"langchain OpenAI (completions).invoke: {text!r}")

# ---- litellm ----
kw = dict(api_base=BASE + "/v1", api_key=USER, temperature=0, max_tokens=32, num_retries=0, timeout=120)
r = litellm.completion(model="openai/" + MODEL, messages=[{"role": "user", "content": FRANCE_Q}], **kw)
check(r.choices[0].message.content == FRANCE_A, f"litellm completion: {r.choices[0].message.content!r}")
check(r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, f"litellm usage: {r.usage}")

parts = litellm.completion(model="openai/" + MODEL, messages=[{"role": "user", "content": FRANCE_Q}], stream=True,
                           **kw)
streamed = "".join((c.choices[0].delta.content or "") for c in parts if c.choices)
check(streamed == FRANCE_A, f"litellm stream joins to the whole answer: {streamed!r}")

r = litellm.completion(model="openai/caps", messages=[{"role": "user", "content": FRANCE_Q}], **kw)
check(title_case(r.choices[0].message.content), f"litellm with model=caps: {r.choices[0].message.content!r}")

try:
    litellm.completion(model="openai/no-such-adapter", messages=[{"role": "user", "content": "Hi"}], **kw)
    sys.exit("FAILED: an unknown model was answered")
except litellm.NotFoundError as e:
    check("no-such-adapter" in str(e), f"litellm maps the 404 to NotFoundError: {str(e)[:160]}")
try:
    litellm.completion(model="openai/" + MODEL, messages=[{"role": "user", "content": "Hi"}],
                       **{**kw, "api_key": "sk-wrong"})
    sys.exit("FAILED: a wrong key was answered")
except litellm.AuthenticationError as e:
    check("invalid API key" in str(e), f"litellm maps the 401 to AuthenticationError: {str(e)[:160]}")
r = litellm.completion(model="openai/" + MODEL, messages=[{"role": "user", "content": FRANCE_Q + " Reply in JSON."}],
                      response_format={"type": "json_object"}, **{**kw, "max_tokens": 64})
check(r.choices[0].finish_reason != "stop" or isinstance(json.loads(r.choices[0].message.content), dict),
      f"litellm response_format json_object: {r.choices[0].message.content!r}")

# vLLM's provider in litellm: the same server, addressed as a vLLM one.
r = litellm.completion(model="hosted_vllm/" + MODEL, messages=[{"role": "user", "content": FRANCE_Q}], **kw)
check(r.choices[0].message.content == FRANCE_A, f"litellm hosted_vllm/ completion: {r.choices[0].message.content!r}")
parts = litellm.completion(model="hosted_vllm/caps", messages=[{"role": "user", "content": FRANCE_Q}], stream=True,
                           **kw)
streamed = "".join((c.choices[0].delta.content or "") for c in parts if c.choices)
check(title_case(streamed) and "Paris" in streamed, f"litellm hosted_vllm/caps stream: {streamed!r}")

# ---- llama-index OpenAILike ----
# Its default is a completion model: `complete` and `stream_complete` go to /v1/completions.
lkw = dict(api_base=BASE + "/v1", api_key=USER, temperature=0, max_tokens=16, max_retries=0, timeout=120)
plain = OpenAI(base_url=BASE + "/v1", api_key=USER, model=MODEL, temperature=0, max_tokens=16, max_retries=0,
               timeout=120).invoke("Once upon a time, there was a little dog named")
li = OpenAILike(model=MODEL, **lkw)
done = li.complete("Once upon a time, there was a little dog named")
check(done.text == plain and done.text.startswith(" Max"),
      f"llama-index OpenAILike.complete (/v1/completions) = langchain's completion: {done.text!r} vs {plain!r}")
pieces = list(li.stream_complete("Once upon a time, there was a little dog named"))
check(len(pieces) > 1 and pieces[-1].text == done.text,
      f"llama-index stream_complete joins to the whole completion: {[p.delta for p in pieces]}")
chat_li = OpenAILike(model=MODEL, is_chat_model=True, **{**lkw, "max_tokens": 32})
r = chat_li.chat([ChatMessage(role="user", content=FRANCE_Q)])
check(r.message.content == FRANCE_A, f"llama-index OpenAILike(is_chat_model=True).chat: {r.message.content!r}")
r = OpenAILike(model="caps", is_chat_model=True, **{**lkw, "max_tokens": 32}).chat(
    [ChatMessage(role="user", content=FRANCE_Q)])
check(title_case(r.message.content), f"llama-index with model=caps: {r.message.content!r}")
try:
    OpenAILike(model="no-such-adapter", **lkw).complete("Hi")
    sys.exit("FAILED: llama-index: an unknown model was answered")
except openai.NotFoundError as e:
    check("no-such-adapter" in str(e), f"llama-index sees the 404: {str(e)[:160]}")

print("all framework checks passed")
