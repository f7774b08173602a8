//! Tool calls on the OpenAI surface. How the model reads them is the deployment's
//! `[model] tool_format` ([`ToolRendering`]):
//!
//! - `template`: the chat template renders them (the request's `tools` handed to it as
//!   transformers does, assistant `tool_calls` with `arguments` as objects, `tool` messages with
//!   their `tool_call_id`), for templates that read `tools` (Qwen 2.5, Hermes, SmolLM3, ...);
//! - `hermes`, the fallback for templates that do not (the default model's): the tools are
//!   described in the system message, an assistant message's `tool_calls` become `<tool_call>`
//!   blocks in its text, and a `tool` message becomes a user turn holding a `<tool_response>`
//!   block.
//!
//! Either way the model's calls are read as Hermes-style `<tool_call>` JSON blocks, the format
//! those templates teach:
//! - `tool_choice: "required"` or a named function constrain decoding with a Lark grammar whose
//!   calls are JSON valid for each tool's `parameters` ([`grammar`]); `"auto"` decodes freely and
//!   [`parse_calls`] reads whatever calls the answer holds; `"none"` leaves the tools out.
//! - Calls are returned as OpenAI's `tool_calls` (`finish_reason: "tool_calls"`), whole or as
//!   stream deltas ([`ToolStream`]).

use serde_json::{Map, Value, json};

use crate::service::Constraint;

/// Opens one call in the model's output.
pub const OPEN: &str = "<tool_call>";
/// Closes it.
pub const CLOSE: &str = "</tool_call>";

/// One function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    /// Its name (1-64 letters, digits, `_` or `-`).
    pub name: String,
    /// What it does (shown to the model).
    pub description: Option<String>,
    /// A JSON schema of its arguments (an object schema).
    pub parameters: Value,
}

/// How a request's tools, calls and results reach the model (the deployment's
/// `[model] tool_format`, with `auto` resolved against its chat template).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolRendering {
    /// The Hermes-style text format, written into the messages before the template.
    Hermes,
    /// Handed to the chat template, which renders them itself.
    Template,
}

/// The tools as a chat template reads them (transformers' `tools` argument).
pub fn template_tools(tools: &[Tool]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                let mut f = Map::new();
                f.insert("name".into(), json!(t.name));
                if let Some(d) = &t.description {
                    f.insert("description".into(), json!(d));
                }
                f.insert("parameters".into(), t.parameters.clone());
                json!({"type": "function", "function": f})
            })
            .collect(),
    )
}

/// OpenAI's `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model answers in text.
    None,
    /// The model decides.
    Auto,
    /// The model must call at least one tool.
    Required,
    /// The model must call this one.
    Named(String),
}

/// A request's tools and what it asks of them.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    /// The tools.
    pub tools: Vec<Tool>,
    /// The choice.
    pub choice: ToolChoice,
    /// More than one call per answer (OpenAI's `parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// A call read from an answer.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON object as text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// The text added to the system message: the tools and the format of a call.
pub fn system_text(tools: &[Tool]) -> String {
    let mut s = String::from(
        "You can call functions to help answer. The functions are listed below, one JSON object per line, \
         between <tools> and </tools>:\n<tools>\n",
    );
    for t in template_tools(tools).as_array().into_iter().flatten() {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo call a function, write its name and arguments as a JSON object between <tool_call> and \
         </tool_call>, like this:\n<tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"argument\": \"value\"}}\n</tool_call>",
    );
    s
}

/// An assistant message's earlier call, as the model would have written it.
pub fn call_text(name: &str, arguments: &Value) -> String {
    format!("{OPEN}\n{}\n{CLOSE}", json!({"name": name, "arguments": arguments}))
}

/// A `tool` message's content, as the turn the model reads.
pub fn response_text(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The grammar `required` or a named function decodes under: one call (or several, one per
/// line, with `parallel`), each JSON whose `name` is a tool's and whose `arguments` are valid
/// for its `parameters`, spaced like `json.dumps`. None for `auto` and `none`.
pub fn grammar(r: &ToolRequest) -> Option<Constraint> {
    let tools: Vec<&Tool> = match &r.choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => r.tools.iter().collect(),
        ToolChoice::Named(n) => r.tools.iter().filter(|t| &t.name == n).collect(),
    };
    let alternatives: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = json!({
        "anyOf": alternatives,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
    });
    let start = if r.parallel && r.choice == ToolChoice::Required { "call (\"\\n\" call)*" } else { "call" };
    Some(Constraint::Lark(format!(
        "start: {start}\ncall: {open} body {close}\nbody: %json {schema}\n",
        open = serde_json::to_string(&format!("{OPEN}\n")).unwrap_or_default(),
        close = serde_json::to_string(&format!("\n{CLOSE}")).unwrap_or_default(),
    )))
}

/// Reads the calls in an answer: every `<tool_call>` block whose JSON names one of `tools` and
/// carries an arguments object (only the first, unless `parallel`). Returns the text outside
/// those blocks, trimmed (None when empty), and the calls; None when the answer holds no valid
/// call (it is then plain text, returned as it is). A block that is not a valid call (broken or
/// cut-off JSON, an unknown name, a second call without `parallel`) stays in the text: nothing
/// the model wrote is dropped.
pub fn parse_calls(text: &str, tools: &[Tool], parallel: bool) -> Option<(Option<String>, Vec<ToolCall>)> {
    let (content, calls) = split_calls(text, tools, parallel);
    if calls.is_empty() {
        return None;
    }
    let content = content.trim();
    Some(((!content.is_empty()).then(|| content.to_owned()), calls))
}

/// [`parse_calls`] before trimming: the text outside the valid blocks, and the calls.
fn split_calls(text: &str, tools: &[Tool], parallel: bool) -> (String, Vec<ToolCall>) {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        content.push_str(&rest[..i]);
        let after = &rest[i + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(j) => (&after[..j], &after[j + CLOSE.len()..]),
            // An unclosed last block still counts if its JSON is whole (the answer ended).
            None => (after, ""),
        };
        let call = serde_json::from_str::<Value>(body.trim()).ok().and_then(|v| {
            let name = v.get("name")?.as_str()?;
            tools.iter().find(|t| t.name == name)?;
            let args = match v.get("arguments") {
                Some(Value::Object(o)) => Value::Object(o.clone()),
                Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok().filter(Value::is_object)?,
                None => json!({}),
                Some(_) => return None,
            };
            Some(ToolCall { name: name.to_owned(), arguments: args.to_string() })
        });
        match call {
            Some(c) if parallel || calls.is_empty() => calls.push(c),
            _ => content.push_str(&rest[i..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    (content, calls)
}

/// One choice of a streamed answer with tools: text is sent as it comes until it might open a
/// call; from there on it is held, and read as calls (or sent as text) when the choice ends.
#[derive(Debug, Default)]
pub struct ToolStream {
    /// Everything generated.
    text: String,
    /// How much of `text` was sent as content.
    sent: usize,
    /// A call has opened: nothing more is sent until the end.
    holding: bool,
}

impl ToolStream {
    /// Takes new text; returns the part that can be sent as content now.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.holding {
            return String::new();
        }
        let unsent = &self.text[self.sent..];
        let safe = match unsent.find(OPEN) {
            Some(i) => {
                self.holding = true;
                i
            }
            // Hold back a tail that could still grow into `<tool_call>`.
            None => (1..=OPEN.len().min(unsent.len()))
                .rev()
                .find(|&k| unsent.is_char_boundary(unsent.len() - k) && OPEN.starts_with(&unsent[unsent.len() - k..]))
                .map_or(unsent.len(), |k| unsent.len() - k),
        };
        let out = unsent[..safe].to_owned();
        self.sent += safe;
        out
    }

    /// At the end of the choice, given its last text: what to send as content now (what was
    /// held, less the valid calls) and the calls (none: the held text was plain text).
    pub fn finish(&mut self, last: &str, tools: &[Tool], parallel: bool) -> (String, Vec<ToolCall>) {
        let mut out = self.push(last);
        let (outside, calls) = split_calls(&self.text[self.sent..], tools, parallel);
        if calls.is_empty() {
            out.push_str(&self.text[self.sent..]);
        } else {
            out.push_str(outside.trim());
        }
        self.sent = self.text.len();
        (out, calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Tool> {
        vec![Tool {
            name: "get_weather".into(),
            description: Some("The weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }]
    }

    #[test]
    fn calls_are_read_with_the_text_around_them() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = parse_calls(t, &weather(), true).expect("a call");
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls, vec![ToolCall { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() }]);
        // Unknown names, broken JSON and no call at all are plain text.
        assert!(
            parse_calls("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>", &weather(), true).is_none()
        );
        assert!(parse_calls("<tool_call>{\"name\": \"get_weather\"", &weather(), true).is_none());
        assert!(parse_calls("It is sunny.", &weather(), true).is_none());
        // Arguments given as a JSON string are accepted; two calls are two.
        let two = "<tool_call>{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}</tool_call>\n\
                   <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>";
        let (content, calls) = parse_calls(two, &weather(), true).expect("calls");
        assert_eq!(content, None);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, "{\"city\":\"Rome\"}");
        // Without parallel calls the second stays text; a call cut off by max_tokens too, and
        // the whole calls before it are kept.
        let (content, calls) = parse_calls(two, &weather(), false).expect("calls");
        assert_eq!(calls.len(), 1);
        assert!(content.is_some_and(|c| c.starts_with("<tool_call>") && c.contains("Oslo")));
        let cut =
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"get_w";
        let (content, calls) = parse_calls(cut, &weather(), true).expect("calls");
        assert_eq!((calls.len(), content.as_deref()), (1, Some("<tool_call>{\"name\": \"get_w")));
    }

    #[test]
    fn a_stream_sends_text_until_a_call_may_open() {
        let mut s = ToolStream::default();
        assert_eq!(s.push("Hello <to"), "Hello ");
        assert_eq!(s.push("day> is"), "<today> is");
        assert_eq!(s.push(" fine <tool_"), " fine ");
        assert_eq!(s.push("call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>"), "");
        let (rest, calls) = s.finish(" Done.", &weather(), true);
        assert_eq!((rest.as_str(), calls[0].name.as_str()), ("Done.", "get_weather"));
        // Plain text: everything held and the last piece are sent; nothing is lost.
        let mut plain = ToolStream::default();
        assert_eq!(plain.push("a <"), "a ");
        assert_eq!(plain.finish("\n", &weather(), true), ("<\n".to_owned(), Vec::new()));
        let mut all = ToolStream::default();
        assert_eq!(all.push("fine"), "fine");
        assert_eq!(all.finish(" end", &weather(), true), (" end".to_owned(), Vec::new()));
    }

    #[test]
    fn required_and_named_choices_have_a_grammar_auto_and_none_do_not() {
        let mut r = ToolRequest { tools: weather(), choice: ToolChoice::Auto, parallel: true };
        assert!(grammar(&r).is_none());
        r.choice = ToolChoice::Required;
        let Some(Constraint::Lark(g)) = grammar(&r) else { panic!("a Lark grammar") };
        assert!(g.contains("get_weather") && g.contains("call (\"\\n\" call)*"), "{g}");
        r.choice = ToolChoice::Named("get_weather".into());
        let Some(Constraint::Lark(g)) = grammar(&r) else { panic!("a Lark grammar") };
        assert!(g.starts_with("start: call\n"), "{g}");
    }
}
