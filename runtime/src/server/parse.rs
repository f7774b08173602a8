//! Reading OpenAI-style JSON request bodies into service parameters, with errors that name the
//! field at fault.

use serde_json::{Map, Value};

use crate::model::chat_template::ChatMessage;
use crate::service::{AdapterChoice, GenerateRequest, MergeSpec, PromptInput, SamplingParams, ServiceError};

/// A parsed JSON object with typed, field-naming accessors.
pub struct Fields<'a>(pub &'a Map<String, Value>);

fn type_err(k: &str, want: &str, v: &Value) -> ServiceError {
    ServiceError::bad(k, format!("`{k}` must be {want}, not {v}"))
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

    fn usize(&self, k: &str) -> Result<Option<usize>, ServiceError> {
        Ok(self.uint(k)?.map(|u| usize::try_from(u).unwrap_or(usize::MAX)))
    }
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
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .or_else(|| n.as_i64().map(|i| i as u64))
                    .ok_or_else(|| ServiceError::bad("seed", format!("`seed` must be an integer, not {n}")))?,
            ),
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

/// Options that only change how the response is written.
#[derive(Clone, Copy, Debug, Default)]
pub struct OutputOptions {
    /// Server-sent events.
    pub stream: bool,
    /// A final usage chunk when streaming.
    pub include_usage: bool,
}

fn output(f: &Fields<'_>) -> Result<OutputOptions, ServiceError> {
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(v) => return Err(type_err("stream_options", "an object", v)),
    };
    Ok(OutputOptions { stream: f.bool("stream")?.unwrap_or(false), include_usage })
}

fn metadata(f: &Fields<'_>) -> Result<Vec<(String, String)>, ServiceError> {
    match f.get("metadata") {
        None => Ok(Vec::new()),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| match v {
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
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        metadata: metadata(f)?,
        cache_salt: f.str("cache_salt")?.map(str::to_owned),
    })
}

/// `POST /v1/completions` (a list of prompts is one request with a choice per prompt).
pub fn completions(body: &Map<String, Value>) -> Result<(GenerateRequest, OutputOptions), ServiceError> {
    let f = Fields(body);
    if f.bool("echo")?.unwrap_or(false) {
        return Err(ServiceError::bad("echo", "`echo` is not supported"));
    }
    if f.get("suffix").is_some() {
        return Err(ServiceError::bad("suffix", "`suffix` is not supported"));
    }
    if f.usize("best_of")?.is_some_and(|b| b > 1) {
        return Err(ServiceError::bad("best_of", "`best_of` greater than 1 is not supported"));
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
    let out = output(&f)?;
    let mut g = common(&f, prompts, &["max_tokens"])?;
    g.logprobs = logprobs;
    Ok((g, out))
}

/// `POST /v1/chat/completions`.
pub fn chat(body: &Map<String, Value>) -> Result<(GenerateRequest, OutputOptions), ServiceError> {
    let f = Fields(body);
    let Some(Value::Array(list)) = f.get("messages") else {
        return Err(ServiceError::bad("messages", "`messages` is required and must be a list"));
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(o) = m else {
            return Err(type_err("messages", "a list of {\"role\": .., \"content\": ..} objects", m));
        };
        let g = Fields(o);
        let role =
            g.str("role")?.ok_or_else(|| ServiceError::bad("messages", format!("messages[{i}] has no `role`")))?;
        let content = match g.get("content") {
            None => String::new(),
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
        messages.push(ChatMessage { role: role.to_owned(), content });
    }
    let mut g = common(&f, vec![PromptInput::Chat(messages)], &["max_tokens", "max_completion_tokens"])?;
    if f.bool("logprobs")?.unwrap_or(false) {
        g.logprobs = Some(f.usize("top_logprobs")?.unwrap_or(0));
    }
    Ok((g, output(&f)?))
}

/// Reads a request body as `POST /v1/chat/completions` (`chat`) or `POST /v1/completions`
/// does, up to the [`GenerateRequest`] handed to the service. Public for the fuzz tests only.
#[doc(hidden)]
pub fn request_from_body(body: &[u8], chat: bool) -> Result<GenerateRequest, ServiceError> {
    let obj = Fields::parse(body)?;
    let (req, _) = if chat { self::chat(&obj)? } else { completions(&obj)? };
    Ok(req)
}
