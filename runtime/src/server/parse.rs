//! Reading OpenAI-style JSON request bodies into service parameters, with errors that name the
//! field at fault.

use serde_json::{Map, Value};

use super::tools::{self, Tool, ToolChoice, ToolRendering, ToolRequest};
use crate::model::chat_template::ChatMessage;
use crate::service::api::{MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS};
use crate::service::{
    AdapterChoice, Constraint, ConstraintSpec, GenerateRequest, MergeSpec, PromptInput, SamplingParams, ServiceError,
    StructuredOutput,
};

/// A parsed JSON object with typed, field-naming accessors.
pub struct Fields<'a>(pub &'a Map<String, Value>);

fn type_err(k: &str, want: &str, v: &Value) -> ServiceError {
    ServiceError::bad(k, format!("`{k}` must be {want}, not {}", shown(v)))
}

/// A client's value as echoed in an error: at most 100 characters of it.
fn shown(v: &Value) -> String {
    let t = v.to_string();
    match t.char_indices().nth(100) {
        Some((end, _)) => format!("{}...", &t[..end]),
        None => t,
    }
}

impl<'a> Fields<'a> {
    /// Parses a body into a JSON object.
    pub fn parse(body: &[u8]) -> Result<Map<String, Value>, ServiceError> {
        let text = std::str::from_utf8(body)
            .map_err(|e| ServiceError::bad("body", format!("the request body is not valid UTF-8: {e}")))?;
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(other) => Err(ServiceError::bad("body", format!("the request body must be a JSON object, not {other}"))),
            Err(e) => Err(ServiceError::bad("body", format!("the request body is not valid JSON: {e}"))),
        }
    }

    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    /// A string field.
    pub fn str(&self, k: &str) -> Result<Option<&'a str>, ServiceError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(type_err(k, "a string", v)),
        }
    }

    /// A boolean field.
    pub fn bool(&self, k: &str) -> Result<Option<bool>, ServiceError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(type_err(k, "true or false", v)),
        }
    }

    /// A number field.
    pub fn f64(&self, k: &str) -> Result<Option<f64>, ServiceError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                n.as_f64().map(Some).ok_or_else(|| type_err(k, "a number", &Value::Number(n.clone())))
            }
            Some(v) => Err(type_err(k, "a number", v)),
        }
    }

    /// A non-negative integer field.
    pub fn uint(&self, k: &str) -> Result<Option<u64>, ServiceError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(u) => Ok(Some(u)),
                None => Err(ServiceError::bad(k, format!("`{k}` must be a non-negative integer, not {n}"))),
            },
            Some(v) => Err(type_err(k, "a non-negative integer", v)),
        }
    }

    /// Refuses the first field that is not in `known` (null fields aside), naming it and
    /// `what` the body is for, so a client never believes an unsupported setting took effect.
    pub fn only(&self, known: &[&str], what: &str) -> Result<(), ServiceError> {
        match self.0.iter().find(|(k, v)| !v.is_null() && !known.contains(&k.as_str())) {
            None => Ok(()),
            Some((k, _)) => {
                // A name from the client is echoed, so bound what is echoed.
                let k: String = k.chars().take(64).collect();
                Err(ServiceError::bad(
                    &k,
                    format!("`{k}` is not a field of {what} this server supports (its fields: {})", known.join(", ")),
                ))
            }
        }
    }

    fn usize(&self, k: &str) -> Result<Option<usize>, ServiceError> {
        Ok(self.uint(k)?.map(|u| usize::try_from(u).unwrap_or(usize::MAX)))
    }
}

/// The request fields a completions or chat request may carry besides the endpoint's own: each
/// is honoured, except the few in [`IGNORED_FIELDS`]. Any other field is refused with a 400
/// naming it, so a client never believes a setting took effect when it did not.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "prompt_logprobs",
    "user",
    "metadata",
    "cache_salt",
    "adapters",
    "merge",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_decoding_backend",
    "structured_outputs",
];

/// Fields accepted and ignored on purpose: common clients send them with every request, and
/// they ask for nothing this server could do differently (`store`: OpenAI's own storage of
/// completions; `service_tier`: OpenAI's capacity tiers; `parallel_tool_calls`: meaningless
/// without `tools`, and read by chat when it has them).
pub const IGNORED_FIELDS: &[&str] = &["store", "service_tier", "parallel_tool_calls"];

const COMPLETIONS_FIELDS: &[&str] = &["prompt", "echo", "best_of", "suffix"];
const CHAT_FIELDS: &[&str] =
    &["messages", "max_completion_tokens", "top_logprobs", "response_format", "tool_choice", "tools", "modalities"];

/// Why a known but unimplemented field is refused (the 400's message).
fn refusal_reason(k: &str) -> Option<&'static str> {
    Some(match k {
        "functions" | "function_call" => "the deprecated functions API is not supported; send `tools`",
        "audio" => "audio output is not supported",
        "prediction" => "predicted outputs are not supported",
        "web_search_options" => "web search is not supported",
        "reasoning_effort" | "verbosity" => "this model has no reasoning or verbosity settings",
        _ => return None,
    })
}

/// OpenAI's service tiers (`service_tier`); any is accepted, none changes anything.
const SERVICE_TIERS: &[&str] = &["auto", "default", "flex", "scale", "priority", "fast"];

/// An ignored field still has to be what OpenAI's API takes: ignoring `"store": "yes"` would
/// accept a request OpenAI refuses.
fn check_ignored(f: &Fields<'_>, k: &str) -> Result<(), ServiceError> {
    if k == "service_tier" {
        let tier = f.str(k)?.unwrap_or("auto");
        if !SERVICE_TIERS.contains(&tier) {
            let tier: String = tier.chars().take(64).collect();
            return Err(ServiceError::bad(
                k,
                format!("`service_tier` `{tier}` is not one of {}", SERVICE_TIERS.join(", ")),
            ));
        }
    } else {
        f.bool(k)?;
    }
    Ok(())
}

/// Refuses any field the endpoint does not honour or ignore on purpose, naming it.
fn check_fields(f: &Fields<'_>, own: &[&str]) -> Result<(), ServiceError> {
    for (k, v) in f.0 {
        if v.is_null() || COMMON_FIELDS.contains(&k.as_str()) || own.contains(&k.as_str()) {
            continue;
        }
        if IGNORED_FIELDS.contains(&k.as_str()) {
            check_ignored(f, k)?;
            continue;
        }
        // A name from the client is echoed, so bound what is echoed.
        let name: String = k.chars().take(64).collect();
        return Err(match refusal_reason(k) {
            Some(why) => ServiceError::bad(&name, format!("`{name}`: {why}")),
            None => ServiceError::bad(&name, format!("`{name}` is not a request field this server supports")),
        });
    }
    Ok(())
}

/// The list of token ids in field `k`, at most `most` of them.
fn token_ids(f: &Fields<'_>, k: &str, most: usize) -> Result<Vec<u32>, ServiceError> {
    match f.get(k) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => {
            if a.len() > most {
                return Err(ServiceError::bad(k, format!("`{k}` has {} ids; the limit is {most}", a.len())));
            }
            a.iter()
                .map(|v| {
                    v.as_u64().and_then(|u| u32::try_from(u).ok()).ok_or_else(|| type_err(k, "a list of token ids", v))
                })
                .collect()
        }
        Some(v) => Err(type_err(k, "a list of token ids", v)),
    }
}

/// OpenAI's `logit_bias`: an object from token ids (as strings) to biases in [-100, 100].
/// The entry count is checked before any entry is read.
fn logit_bias(f: &Fields<'_>) -> Result<Vec<(u32, f32)>, ServiceError> {
    let o = match f.get("logit_bias") {
        None => return Ok(Vec::new()),
        Some(Value::Object(o)) => o,
        Some(v) => return Err(type_err("logit_bias", "an object from token ids to numbers", v)),
    };
    if o.len() > MAX_LOGIT_BIAS {
        return Err(ServiceError::bad(
            "logit_bias",
            format!("`logit_bias` has {} entries; the limit is {MAX_LOGIT_BIAS}", o.len()),
        ));
    }
    let mut out = Vec::with_capacity(o.len());
    for (k, v) in o {
        let id: u32 = k.trim().parse().map_err(|_| {
            let k: String = k.chars().take(32).collect();
            ServiceError::bad("logit_bias", format!("`logit_bias`: the key {k:?} is not a token id"))
        })?;
        // Integers, as OpenAI's schema says.
        let b = v.as_i64().filter(|b| (-100..=100).contains(b)).ok_or_else(|| {
            ServiceError::bad(
                "logit_bias",
                format!("`logit_bias`: the bias of token {id} must be an integer in [-100, 100], not {v}"),
            )
        })?;
        out.push((id, b as f32));
    }
    Ok(out)
}

fn stop_list(f: &Fields<'_>) -> Result<Vec<String>, ServiceError> {
    match f.get("stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => {
            if a.len() > 16 {
                return Err(ServiceError::bad("stop", "at most 16 stop strings"));
            }
            a.iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| type_err("stop", "a string or a list of strings", v))
                })
                .collect()
        }
        Some(v) => Err(type_err("stop", "a string or a list of strings", v)),
    }
}

fn sampling(f: &Fields<'_>) -> Result<SamplingParams, ServiceError> {
    let d = SamplingParams::default();
    let num = |k: &str, default: f32| -> Result<f32, ServiceError> { Ok(f.f64(k)?.map_or(default, |v| v as f32)) };
    // OpenAI's range (the engine alone would take any temperature >= 0).
    if let Some(t) = f.f64("temperature")?
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ServiceError::bad("temperature", format!("`temperature` must be in [0, 2], not {t}")));
    }
    Ok(SamplingParams {
        temperature: num("temperature", d.temperature)?,
        top_p: num("top_p", d.top_p)?,
        top_k: match f.get("top_k") {
            // vLLM uses -1 (and 0) for "off".
            Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v <= 0) => 0,
            _ => f.usize("top_k")?.unwrap_or(0),
        },
        repetition_penalty: num("repetition_penalty", d.repetition_penalty)?,
        frequency_penalty: num("frequency_penalty", d.frequency_penalty)?,
        presence_penalty: num("presence_penalty", d.presence_penalty)?,
        seed: match f.get("seed") {
            None => None,
            // A 64-bit signed integer, as OpenAI's; the sampler takes its bits.
            Some(Value::Number(n)) => Some(n.as_i64().map(|i| i as u64).ok_or_else(|| {
                ServiceError::bad("seed", format!("`seed` must be a 64-bit signed integer, not {n}"))
            })?),
            Some(v) => return Err(type_err("seed", "an integer", v)),
        },
    })
}

fn adapters_ext(f: &Fields<'_>) -> Result<(Vec<AdapterChoice>, Option<MergeSpec>), ServiceError> {
    let mut choices = Vec::new();
    match f.get("adapters") {
        None => {}
        Some(Value::Array(list)) => {
            for item in list {
                let Value::Object(o) = item else {
                    return Err(type_err("adapters", "a list of {\"name\": .., \"weight\": ..} objects", item));
                };
                let g = Fields(o);
                let name =
                    g.str("name")?.ok_or_else(|| ServiceError::bad("adapters", "each adapter needs a `name`"))?;
                let weight = g.f64("weight")?.unwrap_or(1.0) as f32;
                choices.push(AdapterChoice { name: name.to_owned(), weight });
            }
        }
        Some(v) => return Err(type_err("adapters", "a list of {\"name\": .., \"weight\": ..} objects", v)),
    }
    let merge = match f.get("merge") {
        None => None,
        Some(Value::Object(o)) => {
            let g = Fields(o);
            Some(MergeSpec {
                // Empty: the merger plugin chooses (an error without one).
                method: g.str("method")?.unwrap_or_default().to_owned(),
                density: g.f64("density")?,
                majority_sign_method: g.str("majority_sign_method")?.map(str::to_owned),
                svd_rank: g.usize("svd_rank")?,
                seed: g.uint("seed")?,
            })
        }
        Some(v) => return Err(type_err("merge", "an object", v)),
    };
    Ok((choices, merge))
}

/// vLLM's `prompt_logprobs`: 0..=20 alternatives per prompt token, in whole responses only (as
/// vLLM: its scores come with the answer, and a stream has no place for them).
fn prompt_logprobs(f: &Fields<'_>) -> Result<Option<usize>, ServiceError> {
    let k = "prompt_logprobs";
    let n = match f.get(k) {
        None => return Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if (0..=20).contains(&n) => n as usize,
            Some(-1) => {
                return Err(ServiceError::bad(
                    k,
                    "`prompt_logprobs: -1` (the whole vocabulary) is not supported; ask for at most 20",
                ));
            }
            _ => {
                return Err(ServiceError::bad(
                    k,
                    format!("`{k}` must be an integer between 0 and 20, not {}", shown(v)),
                ));
            }
        },
    };
    if f.bool("stream")?.unwrap_or(false) {
        return Err(ServiceError::bad(k, "`prompt_logprobs` is not available with `stream: true`"));
    }
    Ok(Some(n))
}

/// Options that only change how the response is written.
#[derive(Clone, Debug, Default)]
pub struct OutputOptions {
    /// Chat with tools (a choice other than `none`): answers are read for tool calls.
    pub tools: Option<std::sync::Arc<ToolRequest>>,
    /// Server-sent events.
    pub stream: bool,
    /// A final usage chunk when streaming.
    pub include_usage: bool,
    /// Completions' `echo`: each choice's text starts with its prompt.
    pub echo: bool,
}

fn output(f: &Fields<'_>) -> Result<OutputOptions, ServiceError> {
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| k.as_str() != "include_usage") {
                let k: String = k.chars().take(64).collect();
                return Err(ServiceError::bad(
                    "stream_options",
                    format!("`stream_options.{k}` is not supported (only `include_usage`)"),
                ));
            }
            Fields(o).bool("include_usage")?.unwrap_or(false)
        }
        Some(v) => return Err(type_err("stream_options", "an object", v)),
    };
    Ok(OutputOptions { stream: f.bool("stream")?.unwrap_or(false), include_usage, echo: false, tools: None })
}

fn metadata(f: &Fields<'_>) -> Result<Vec<(String, String)>, ServiceError> {
    match f.get("metadata") {
        None => Ok(Vec::new()),
        // OpenAI's bounds: 16 pairs, keys of 64 characters, values of 512.
        Some(Value::Object(o)) if o.len() > 16 => Err(ServiceError::bad("metadata", "`metadata`: at most 16 pairs")),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| match v {
                _ if k.chars().count() > 64 => {
                    Err(ServiceError::bad("metadata", "`metadata`: keys of at most 64 characters"))
                }
                Value::String(s) if s.chars().count() > 512 => {
                    Err(ServiceError::bad("metadata", "`metadata`: values of at most 512 characters"))
                }
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(type_err("metadata", "an object of string values", other)),
            })
            .collect(),
        Some(v) => Err(type_err("metadata", "an object of string values", v)),
    }
}

fn common(f: &Fields<'_>, prompts: Vec<PromptInput>, max_tokens_key: &[&str]) -> Result<GenerateRequest, ServiceError> {
    let model = f.str("model")?.ok_or_else(|| ServiceError::bad("model", "`model` is required"))?.to_owned();
    let mut max_tokens = None;
    for k in max_tokens_key {
        if let Some(v) = f.get(k) {
            match v.as_i64() {
                Some(n) if n >= 1 => max_tokens = Some(usize::try_from(n).unwrap_or(usize::MAX)),
                _ => return Err(ServiceError::bad(k, format!("`{k}` must be a positive integer, not {v}"))),
            }
        }
    }
    let (adapters, merge) = adapters_ext(f)?;
    Ok(GenerateRequest {
        model,
        adapters,
        merge,
        prompts,
        max_tokens,
        sampling: sampling(f)?,
        stop: stop_list(f)?,
        n: f.usize("n")?.unwrap_or(1),
        logprobs: None,
        prompt_logprobs: prompt_logprobs(f)?,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        metadata: metadata(f)?,
        cache_salt: f.str("cache_salt")?.map(str::to_owned),
        logit_bias: logit_bias(f)?,
        // Checked against max_tokens by the service.
        min_tokens: f.usize("min_tokens")?.unwrap_or(0),
        stop_token_ids: token_ids(f, "stop_token_ids", MAX_STOP_TOKEN_IDS)?,
        user: f.str("user")?.map(str::to_owned),
        constraint: None,
        tools: None,
    })
}

/// Longest schema, grammar or choice list a request may send (as JSON text).
pub const MAX_CONSTRAINT_BYTES: usize = 256 * 1024;

/// The request's structured-output constraint: chat's `response_format`, or vLLM's
/// `guided_*` fields or `structured_outputs` object (one of them at most).
fn structured_output(f: &Fields<'_>, chat: bool) -> Result<Option<StructuredOutput>, ServiceError> {
    let mut found: Vec<(String, Constraint)> = Vec::new();
    let mut whitespace = f.str("guided_whitespace_pattern")?.map(str::to_owned);
    for k in [
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_whitespace_pattern",
        "structured_outputs",
    ] {
        if let Some(v) = f.get(k)
            && serde_json::to_string(v).map_or(0, |t| t.len()) > MAX_CONSTRAINT_BYTES
        {
            return Err(ServiceError::bad(k, format!("`{k}` is longer than {MAX_CONSTRAINT_BYTES} bytes")));
        }
    }
    if chat {
        match f.get("response_format") {
            None => {}
            Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
                Some("text") if o.len() == 1 => {}
                Some("json_object") if o.len() == 1 => found.push(("response_format".into(), Constraint::JsonObject)),
                Some("json_schema") => found.push(("response_format".into(), response_json_schema(o)?)),
                _ => {
                    return Err(type_err(
                        "response_format",
                        "{\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": {..}}",
                        &Value::Object(o.clone()),
                    ));
                }
            },
            Some(v) => return Err(type_err("response_format", "an object", v)),
        }
    }
    if let Some(v) = f.get("guided_json") {
        found.push(("guided_json".into(), Constraint::JsonSchema(schema_value("guided_json", v)?)));
    }
    if let Some(rx) = f.str("guided_regex")? {
        found.push(("guided_regex".into(), Constraint::Regex(rx.to_owned())));
    }
    if let Some(v) = f.get("guided_choice") {
        found.push(("guided_choice".into(), choice_list("guided_choice", v)?));
    }
    if let Some(g) = f.str("guided_grammar")? {
        found.push(("guided_grammar".into(), lark("guided_grammar", g)?));
    }
    match f.get("structured_outputs") {
        None => {}
        Some(Value::Object(o)) => {
            let g = Fields(o);
            g.only(
                &["json", "regex", "choice", "grammar", "json_object", "whitespace_pattern", "disable_any_whitespace"],
                "structured_outputs",
            )
            .map_err(|e| ServiceError::bad("structured_outputs", format!("`structured_outputs`: {}", e.message)))?;
            let k = |name: &str| format!("structured_outputs.{name}");
            if let Some(v) = g.get("json") {
                found.push((k("json"), Constraint::JsonSchema(schema_value("structured_outputs", v)?)));
            }
            if let Some(rx) = g.str("regex")? {
                found.push((k("regex"), Constraint::Regex(rx.to_owned())));
            }
            if let Some(v) = g.get("choice") {
                found.push((k("choice"), choice_list("structured_outputs", v)?));
            }
            if let Some(gr) = g.str("grammar")? {
                found.push((k("grammar"), lark("structured_outputs", gr)?));
            }
            if g.bool("json_object")?.unwrap_or(false) {
                found.push((k("json_object"), Constraint::JsonObject));
            }
            if let Some(p) = g.str("whitespace_pattern")? {
                whitespace = Some(p.to_owned());
            }
            // Checked for its type only: JSON is already spaced like `json.dumps`, nothing more.
            g.bool("disable_any_whitespace")?;
        }
        Some(v) => return Err(type_err("structured_outputs", "an object", v)),
    }
    match f.str("guided_decoding_backend")? {
        None | Some("guidance" | "llguidance" | "auto") => {}
        Some(other) => {
            let other: String = other.chars().take(32).collect();
            return Err(ServiceError::bad(
                "guided_decoding_backend",
                format!("`guided_decoding_backend`: this server uses llguidance, not {other:?}"),
            ));
        }
    }
    let mut found = found.into_iter();
    let Some((field, constraint)) = found.next() else {
        if whitespace.is_some() {
            return Err(ServiceError::bad(
                "guided_whitespace_pattern",
                "`guided_whitespace_pattern` applies to a JSON constraint, and the request has none",
            ));
        }
        return Ok(None);
    };
    if let Some((other, _)) = found.next() {
        return Err(ServiceError::bad(&other, format!("`{field}` and `{other}` both constrain the output; send one")));
    }
    if whitespace.is_some() && !matches!(constraint, Constraint::JsonObject | Constraint::JsonSchema(_)) {
        return Err(ServiceError::bad(
            "guided_whitespace_pattern",
            format!("`guided_whitespace_pattern` applies to JSON constraints, not `{field}`"),
        ));
    }
    Ok(Some(StructuredOutput { field, spec: ConstraintSpec { constraint, whitespace_pattern: whitespace } }))
}

/// A JSON schema given as an object or as a JSON string (vLLM takes both).
fn schema_value(k: &str, v: &Value) -> Result<Value, ServiceError> {
    match v {
        Value::Object(_) => Ok(v.clone()),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(o @ Value::Object(_)) => Ok(o),
            Ok(other) => Err(type_err(k, "a JSON schema object", &other)),
            Err(e) => Err(ServiceError::bad(k, format!("`{k}` is not valid JSON: {e}"))),
        },
        other => Err(type_err(k, "a JSON schema object", other)),
    }
}

fn choice_list(k: &str, v: &Value) -> Result<Constraint, ServiceError> {
    match v {
        Value::Array(a) if !a.is_empty() && a.iter().all(|c| c.as_str().is_some_and(|s| !s.is_empty())) => {
            Ok(Constraint::Choice(a.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect()))
        }
        other => Err(type_err(k, "a non-empty list of non-empty strings", other)),
    }
}

fn lark(k: &str, g: &str) -> Result<Constraint, ServiceError> {
    if g.contains("::=") {
        return Err(ServiceError::bad(
            k,
            format!("`{k}` looks like GBNF (`::=`); this server takes grammars in llguidance's Lark syntax only"),
        ));
    }
    Ok(Constraint::Lark(g.to_owned()))
}

/// OpenAI's `response_format: {"type": "json_schema", "json_schema": {...}}`.
fn response_json_schema(o: &Map<String, Value>) -> Result<Constraint, ServiceError> {
    let k = "response_format";
    if let Some(extra) = o.keys().find(|x| !matches!(x.as_str(), "type" | "json_schema")) {
        let extra: String = extra.chars().take(32).collect();
        return Err(ServiceError::bad(k, format!("`response_format.{extra}` is not a field of a json_schema format")));
    }
    let Some(Value::Object(js)) = o.get("json_schema") else {
        return Err(ServiceError::bad(k, "`response_format.json_schema` is required and must be an object"));
    };
    let g = Fields(js);
    g.only(&["name", "description", "schema", "strict"], "response_format.json_schema")
        .map_err(|e| ServiceError::bad(k, format!("`response_format`: {}", e.message)))?;
    let name = g.str("name")?.ok_or_else(|| ServiceError::bad(k, "`response_format.json_schema.name` is required"))?;
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(ServiceError::bad(
            k,
            "`response_format.json_schema.name` must be 1 to 64 letters, digits, underscores or dashes",
        ));
    }
    let schema = match g.get("schema") {
        None => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(v) => return Err(type_err("response_format", "a JSON schema object in `json_schema.schema`", v)),
    };
    if g.bool("strict")?.unwrap_or(false)
        && let Some(why) = strict_violation(&schema, "#")
    {
        return Err(ServiceError::bad(k, format!("`response_format`: a strict schema {why}")));
    }
    Ok(Constraint::JsonSchema(schema))
}

/// OpenAI's rules for `strict: true` schemas, checked rather than silently patched: every
/// object lists each of its properties in `required` and sets `additionalProperties: false`.
/// Returns where (a JSON pointer) the first rule is broken.
fn strict_violation(schema: &Value, at: &str) -> Option<String> {
    let Value::Object(o) = schema else { return None };
    let is_object = o
        .get("type")
        .is_some_and(|t| t == "object" || t.as_array().is_some_and(|a| a.contains(&Value::from("object"))))
        || o.contains_key("properties");
    if is_object {
        if o.get("additionalProperties") != Some(&Value::Bool(false)) {
            return Some(format!("needs `additionalProperties: false` at {at}"));
        }
        let required: Vec<&str> = o
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(Value::Object(props)) = o.get("properties")
            && let Some(missing) = props.keys().find(|p| !required.contains(&p.as_str()))
        {
            return Some(format!("must list every property in `required`: {missing:?} is missing at {at}"));
        }
    }
    let escape = |k: &str| k.replace('~', "~0").replace('/', "~1");
    for key in ["properties", "$defs", "definitions"] {
        if let Some(Value::Object(m)) = o.get(key) {
            for (name, sub) in m {
                if let Some(v) = strict_violation(sub, &format!("{at}/{key}/{}", escape(name))) {
                    return Some(v);
                }
            }
        }
    }
    for key in ["anyOf", "allOf", "oneOf", "prefixItems"] {
        if let Some(Value::Array(a)) = o.get(key) {
            for (i, sub) in a.iter().enumerate() {
                if let Some(v) = strict_violation(sub, &format!("{at}/{key}/{i}")) {
                    return Some(v);
                }
            }
        }
    }
    o.get("items").and_then(|sub| strict_violation(sub, &format!("{at}/items")))
}

/// `POST /v1/completions` (a list of prompts is one request with a choice per prompt).
pub fn completions(body: &Map<String, Value>) -> Result<(GenerateRequest, OutputOptions), ServiceError> {
    let f = Fields(body);
    check_fields(&f, COMPLETIONS_FIELDS)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    if echo && f.get("logprobs").is_some() {
        return Err(ServiceError::bad(
            "echo",
            "`echo` with `logprobs` is not supported (`prompt_logprobs` gives the prompt's scores)",
        ));
    }
    if f.get("suffix").is_some() {
        return Err(ServiceError::bad("suffix", "`suffix` is not supported"));
    }
    match f.usize("best_of")? {
        Some(0) => return Err(ServiceError::bad("best_of", "`best_of` must be at least 1")),
        Some(b) if b > 1 => return Err(ServiceError::bad("best_of", "`best_of` greater than 1 is not supported")),
        _ => {}
    }
    let tokens = |a: &[Value]| -> Result<Vec<u32>, ServiceError> {
        a.iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|u| u32::try_from(u).ok())
                    .ok_or_else(|| type_err("prompt", "a string, a list of strings, or token ids", v))
            })
            .collect()
    };
    let prompts: Vec<PromptInput> = match f.get("prompt") {
        None => return Err(ServiceError::bad("prompt", "`prompt` is required")),
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => return Err(ServiceError::bad("prompt", "`prompt` is empty")),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().map(|v| PromptInput::Text(v.as_str().unwrap_or_default().to_owned())).collect()
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|v| Ok(PromptInput::Tokens(tokens(v.as_array().map(Vec::as_slice).unwrap_or_default())?)))
            .collect::<Result<_, ServiceError>>()?,
        Some(Value::Array(a)) => vec![PromptInput::Tokens(tokens(a)?)],
        Some(v) => return Err(type_err("prompt", "a string, a list of strings, or token ids", v)),
    };
    if prompts.len() > 64 {
        return Err(ServiceError::bad("prompt", "at most 64 prompts per request"));
    }
    let logprobs = f.usize("logprobs")?;
    // OpenAI's bound for completions (chat's `top_logprobs` goes to 20).
    if logprobs.is_some_and(|l| l > 5) {
        return Err(ServiceError::bad("logprobs", "`logprobs` must be between 0 and 5"));
    }
    let out = OutputOptions { echo, ..output(&f)? };
    let mut g = common(&f, prompts, &["max_tokens"])?;
    g.logprobs = logprobs;
    g.constraint = structured_output(&f, false)?;
    Ok((g, out))
}

/// A conversation as the model will read it, with the request's tools: in the Hermes-style
/// text format (the tools described in the system message, calls and results as text), or in
/// the structured form the chat template renders (`tools` beside the messages).
fn conversation(
    f: &Fields<'_>,
    rendering: ToolRendering,
    tools: Option<&ToolRequest>,
) -> Result<(Vec<ChatMessage>, Option<Value>), ServiceError> {
    let mut messages = messages(f, rendering)?;
    let Some(t) = tools else { return Ok((messages, None)) };
    match rendering {
        ToolRendering::Template => Ok((messages, Some(tools::template_tools(&t.tools)))),
        ToolRendering::Hermes => {
            // The Hermes-style fallback: the tools are described in the system message.
            let text = tools::system_text(&t.tools);
            match messages.first_mut() {
                Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
                _ => messages.insert(0, ChatMessage::new("system", text)),
            }
            Ok((messages, None))
        }
    }
}

/// `POST /v1/chat/completions`; `rendering` is how the deployment hands tools to the model.
pub fn chat(
    body: &Map<String, Value>,
    rendering: ToolRendering,
) -> Result<(GenerateRequest, OutputOptions), ServiceError> {
    let f = Fields(body);
    check_fields(&f, CHAT_FIELDS)?;
    let constraint = structured_output(&f, true)?;
    let tools = tool_request(&f)?;
    match f.get("modalities") {
        None => {}
        Some(Value::Array(a)) if a.iter().all(|m| m.as_str() == Some("text")) => {}
        Some(_) => return Err(ServiceError::bad("modalities", "`modalities`: only [\"text\"] is supported")),
    }
    let (messages, template_tools) = conversation(&f, rendering, tools.as_ref())?;
    let mut g = common(&f, vec![PromptInput::Chat(messages)], &["max_tokens", "max_completion_tokens"])?;
    g.tools = template_tools;
    if f.bool("logprobs")?.unwrap_or(false) {
        g.logprobs = Some(f.usize("top_logprobs")?.unwrap_or(0));
    } else if f.get("top_logprobs").is_some() {
        return Err(ServiceError::bad("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
    }
    g.constraint = constraint;
    if let Some(t) = &tools {
        if g.logprobs.is_some() {
            return Err(ServiceError::bad("logprobs", "`logprobs` cannot be combined with `tools` yet"));
        }
        if let Some(c) = tools::grammar(t) {
            if let Some(other) = &g.constraint {
                return Err(ServiceError::bad(
                    "tool_choice",
                    format!("`tool_choice` and `{}` both constrain the output; send one", other.field),
                ));
            }
            g.constraint = Some(StructuredOutput {
                field: "tool_choice".into(),
                spec: ConstraintSpec { constraint: c, whitespace_pattern: None },
            });
        }
    }
    Ok((g, OutputOptions { tools: tools.map(std::sync::Arc::new), ..output(&f)? }))
}

/// Most tools one request may describe.
pub const MAX_TOOLS: usize = 128;

fn tool_name_ok(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `tools`, `tool_choice` and `parallel_tool_calls`. None when the request has no tools or
/// chooses `none` (the model then answers in text and sees no tools).
fn tool_request(f: &Fields<'_>) -> Result<Option<ToolRequest>, ServiceError> {
    let tools = tool_list(f)?.unwrap_or_default();
    let choice = match f.get("tool_choice") {
        None if tools.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(type_err(
                    "tool_choice",
                    "\"none\", \"auto\", \"required\" or a named function",
                    &Value::String(s.clone()),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ServiceError::bad(
                        "tool_choice",
                        "`tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ..}}",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                let name: String = name.chars().take(64).collect();
                return Err(ServiceError::bad(
                    "tool_choice",
                    format!("`tool_choice` names {name:?}, which is not in `tools`"),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
        Some(v) => return Err(type_err("tool_choice", "a string or an object", v)),
    };
    if tools.is_empty() && choice != ToolChoice::None {
        return Err(ServiceError::bad("tool_choice", "`tool_choice` needs `tools`"));
    }
    if choice == ToolChoice::None {
        return Ok(None);
    }
    let parallel = f.bool("parallel_tool_calls")?.unwrap_or(true);
    Ok(Some(ToolRequest { tools, choice, parallel }))
}

/// The request's `tools`, checked (None when it sends none).
fn tool_list(f: &Fields<'_>) -> Result<Option<Vec<Tool>>, ServiceError> {
    let list = match f.get("tools") {
        None => return Ok(None),
        Some(Value::Array(a)) if a.len() > MAX_TOOLS => {
            return Err(ServiceError::bad(
                "tools",
                format!("`tools` has {} entries; the limit is {MAX_TOOLS}", a.len()),
            ));
        }
        Some(Value::Array(a)) if serde_json::to_string(a).map_or(0, |t| t.len()) > MAX_CONSTRAINT_BYTES => {
            // They become the prompt's tool list and, for `required`, a grammar.
            return Err(ServiceError::bad("tools", format!("`tools` is longer than {MAX_CONSTRAINT_BYTES} bytes")));
        }
        Some(Value::Array(a)) => a.clone(),
        Some(v) => return Err(type_err("tools", "a list of {\"type\": \"function\", \"function\": {..}} objects", v)),
    };
    let mut tools = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let bad = |why: String| ServiceError::bad("tools", format!("tools[{i}]: {why}"));
        let Value::Object(o) = t else { return Err(bad(format!("must be an object, not {}", shown(t)))) };
        let g = Fields(o);
        g.only(&["type", "function"], "a tool").map_err(|e| bad(e.message))?;
        if g.str("type")? != Some("function") {
            return Err(bad("`type` must be \"function\"".into()));
        }
        let Some(Value::Object(func)) = g.get("function") else {
            return Err(bad("`function` is required and must be an object".into()));
        };
        let h = Fields(func);
        h.only(&["name", "description", "parameters", "strict"], "a function").map_err(|e| bad(e.message))?;
        let name = h.str("name")?.unwrap_or_default();
        if !tool_name_ok(name) {
            return Err(bad("`function.name` must be 1 to 64 letters, digits, underscores or dashes".into()));
        }
        if tools.iter().any(|t: &Tool| t.name == name) {
            return Err(bad(format!("the name {name:?} is used twice")));
        }
        let parameters = match h.get("parameters") {
            None => serde_json::json!({"type": "object", "properties": {}}),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(v) => {
                return Err(bad(format!("`function.parameters` must be a JSON schema object, not {}", shown(v))));
            }
        };
        if h.bool("strict")?.unwrap_or(false)
            && let Some(why) = strict_violation(&parameters, "#")
        {
            return Err(bad(format!("a strict function's parameters {why}")));
        }
        let description = h.str("description")?.map(str::to_owned);
        tools.push(Tool { name: name.to_owned(), description, parameters });
    }
    Ok(Some(tools))
}

/// A chat request's `messages`: text only, roles system (or developer), user, assistant.
fn messages(f: &Fields<'_>, rendering: ToolRendering) -> Result<Vec<ChatMessage>, ServiceError> {
    let Some(Value::Array(list)) = f.get("messages") else {
        return Err(ServiceError::bad("messages", "`messages` is required and must be a list"));
    };
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(list.len());
    let mut last_was_tool = false;
    for (i, m) in list.iter().enumerate() {
        let Value::Object(o) = m else {
            return Err(type_err("messages", "a list of {\"role\": .., \"content\": ..} objects", m));
        };
        let g = Fields(o);
        let role =
            g.str("role")?.ok_or_else(|| ServiceError::bad("messages", format!("messages[{i}] has no `role`")))?;
        let role = match role {
            "system" | "user" | "assistant" => role,
            // OpenAI's newer name for the system message.
            "developer" => "system",
            "tool" => "tool",
            "function" => {
                return Err(ServiceError::bad(
                    "messages",
                    format!(
                        "messages[{i}]: `function` messages belong to the deprecated functions API; send `tool` messages"
                    ),
                ));
            }
            other => {
                let other: String = other.chars().take(32).collect();
                return Err(ServiceError::bad(
                    "messages",
                    format!("messages[{i}]: the role {other:?} is not one of system, developer, user, assistant, tool"),
                ));
            }
        };
        for (k, v) in o {
            let empty = v.is_null() || v.as_array().is_some_and(Vec::is_empty);
            let own = match role {
                "assistant" => k == "tool_calls",
                "tool" => k == "tool_call_id",
                _ => false,
            };
            if !matches!(k.as_str(), "role" | "content") && !empty && !own {
                let k: String = k.chars().take(32).collect();
                return Err(ServiceError::bad(
                    "messages",
                    format!("messages[{i}].{k} is not supported (messages carry a `role` and text `content`)"),
                ));
            }
        }
        let content = match g.get("content") {
            None if role == "assistant" => String::new(),
            None => return Err(ServiceError::bad("messages", format!("messages[{i}] has no `content`"))),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ServiceError::bad(
                                "messages",
                                format!("messages[{i}]: only text content parts are supported, not {p}"),
                            ));
                        }
                    }
                }
                text
            }
            Some(v) => return Err(type_err("messages", "text content", v)),
        };
        let content = match role {
            "tool" => {
                let Some(id) = g.str("tool_call_id")? else {
                    return Err(ServiceError::bad(
                        "messages",
                        format!("messages[{i}]: a `tool` message needs `tool_call_id`"),
                    ));
                };
                if rendering == ToolRendering::Template {
                    messages
                        .push(ChatMessage { tool_call_id: Some(id.to_owned()), ..ChatMessage::new("tool", content) });
                } else {
                    // The Hermes-style fallback: a tool's answer is a user turn the model can
                    // read; results of parallel calls are one turn (templates may require roles
                    // to alternate).
                    let text = tools::response_text(&content);
                    match messages.last_mut() {
                        Some(m) if last_was_tool => m.content = format!("{}\n{text}", m.content),
                        _ => messages.push(ChatMessage::new("user", text)),
                    }
                }
                last_was_tool = true;
                continue;
            }
            "assistant" => match g.get("tool_calls") {
                Some(Value::Array(calls)) => {
                    let mut parsed = Vec::with_capacity(calls.len());
                    for (j, c) in calls.iter().enumerate() {
                        let func = c.get("function");
                        let name = func.and_then(|f| f.get("name")).and_then(Value::as_str);
                        let args = func.and_then(|f| f.get("arguments")).and_then(Value::as_str);
                        let (Some(name), Some(args)) = (name, args) else {
                            return Err(ServiceError::bad(
                                "messages",
                                format!("messages[{i}].tool_calls[{j}] needs `function.name` and `function.arguments`"),
                            ));
                        };
                        let args: Value = serde_json::from_str(args).map_err(|e| {
                            ServiceError::bad(
                                "messages",
                                format!("messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}"),
                            )
                        })?;
                        parsed.push((name, args, c.get("id").and_then(Value::as_str)));
                    }
                    if rendering == ToolRendering::Template {
                        // As transformers' templates read a call: `arguments` an object.
                        let calls = parsed
                            .into_iter()
                            .map(|(name, args, id)| {
                                let mut call =
                                    serde_json::json!({"type": "function", "function": {"name": name, "arguments": args}});
                                if let Some(id) = id {
                                    call["id"] = Value::String(id.to_owned());
                                }
                                call
                            })
                            .collect();
                        messages
                            .push(ChatMessage { tool_calls: Some(calls), ..ChatMessage::new("assistant", content) });
                        last_was_tool = false;
                        continue;
                    }
                    let mut text = content;
                    for (name, args, _) in parsed {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(&tools::call_text(name, &args));
                    }
                    text
                }
                None => content,
                Some(v) => return Err(type_err("messages", "a list of tool calls in `tool_calls`", v)),
            },
            _ => content,
        };
        messages.push(ChatMessage::new(role, content));
        last_was_tool = false;
    }
    Ok(messages)
}

/// vLLM's `POST /tokenize`: a `prompt` or chat `messages`, and how to tokenize them.
pub struct TokenizeRequest {
    /// The model named (checked for visibility; adapters share the base's tokenizer).
    pub model: Option<String>,
    /// What to tokenize.
    pub prompt: PromptInput,
    /// The tools handed to the chat template (when it renders them).
    pub tools: Option<Value>,
    /// Add the tokenizer's special tokens (default: yes for a prompt, no for messages, whose
    /// template writes its own).
    pub add_special_tokens: bool,
    /// End a conversation with the assistant's turn (default yes).
    pub add_generation_prompt: bool,
    /// Also return each token's string.
    pub return_token_strs: bool,
}

/// Reads a `POST /tokenize` body. Messages (with `tools`) become the prompt the chat endpoint
/// would build from them under `rendering`.
pub fn tokenize(body: &Map<String, Value>, rendering: ToolRendering) -> Result<TokenizeRequest, ServiceError> {
    let f = Fields(body);
    f.only(
        &["model", "prompt", "messages", "tools", "add_special_tokens", "add_generation_prompt", "return_token_strs"],
        "/tokenize",
    )?;
    let chat = f.get("messages").is_some();
    if !chat && f.get("tools").is_some() {
        return Err(ServiceError::bad("tools", "`tools` goes with `messages`"));
    }
    let (prompt, tools) = match (f.str("prompt")?, chat) {
        (Some(_), true) => return Err(ServiceError::bad("prompt", "send `prompt` or `messages`, not both")),
        (Some(p), false) => (PromptInput::Text(p.to_owned()), None),
        (None, true) => {
            // The tools as `auto` would show them: their choice does not change the prompt.
            let tools = tool_list(&f)?.map(|tools| ToolRequest { tools, choice: ToolChoice::Auto, parallel: true });
            let (messages, tools) = conversation(&f, rendering, tools.as_ref())?;
            (PromptInput::Chat(messages), tools)
        }
        (None, false) => return Err(ServiceError::bad("prompt", "`prompt` (or `messages`) is required")),
    };
    Ok(TokenizeRequest {
        model: f.str("model")?.map(str::to_owned),
        prompt,
        tools,
        add_special_tokens: f.bool("add_special_tokens")?.unwrap_or(!chat),
        add_generation_prompt: f.bool("add_generation_prompt")?.unwrap_or(true),
        return_token_strs: f.bool("return_token_strs")?.unwrap_or(false),
    })
}

/// Reads a `POST /detokenize` body: the model (optional) and the token ids.
pub fn detokenize(body: &Map<String, Value>) -> Result<(Option<String>, Vec<u32>), ServiceError> {
    let f = Fields(body);
    f.only(&["model", "tokens"], "/detokenize")?;
    if f.get("tokens").is_none() {
        return Err(ServiceError::bad("tokens", "`tokens` is required"));
    }
    let ids = token_ids(&f, "tokens", crate::service::MAX_DETOKENIZE_IDS)?;
    Ok((f.str("model")?.map(str::to_owned), ids))
}

/// Reads a request body as `POST /v1/chat/completions` (`chat`) or `POST /v1/completions`
/// does, up to the [`GenerateRequest`] handed to the service. Public for the fuzz tests only.
#[doc(hidden)]
pub fn request_from_body(body: &[u8], chat: bool) -> Result<GenerateRequest, ServiceError> {
    let obj = Fields::parse(body)?;
    if !chat {
        return Ok(completions(&obj)?.0);
    }
    // Both ways a deployment may hand tools to the model read the same body without panicking.
    let _ = self::chat(&obj, ToolRendering::Template);
    Ok(self::chat(&obj, ToolRendering::Hermes)?.0)
}
