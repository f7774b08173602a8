//! Chat templates: turning a conversation into the exact prompt text a chat model was trained on.
//!
//! Every chat model ships a Jinja template (in `tokenizer_config.json`, `chat_template.jinja`, or
//! the GGUF key `tokenizer.chat_template`) that wraps messages in its role markers. A prompt that
//! differs from the template's output by one newline is a prompt the model never saw in training,
//! and answers degrade, so [`ChatTemplate`] renders templates the way HF transformers'
//! `apply_chat_template(tokenize=False)` does, byte for byte: Jinja with `trim_blocks` and
//! `lstrip_blocks`, Python string methods (`.strip()`, `.startswith()`, ...), transformers' own
//! `raise_exception`, `tojson` (Python `json.dumps` formatting) and `strftime_now`, and Python's
//! way of printing `None`, booleans, lists and dicts.
//!
//! [`ChatTemplate::chatml`] is the fallback for models that ship no template.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value, context};

use super::error::{ModelError, Result};

/// The name the template is registered under (it shows in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// The ChatML template, as HF ships it for ChatML models (Qwen, SmolLM, Hermes, ...).
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + \
                      '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' \
                      }}{% endif %}";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, or whatever roles the template knows.
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant message's calls, as templates that render tools read them (transformers'
    /// shape: `{"type": "function", "id"?, "function": {"name", "arguments"}}` with `arguments`
    /// a JSON object). Absent (undefined in the template) when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` message's call id. Absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None }
    }
}

/// A compiled chat template, with the special tokens it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

/// The error `raise_exception(message)` raises, kept as the source of the template error so that
/// the message reaches the caller unchanged.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RaisedException(String);

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template. `bos_token` and `eos_token` are the texts of the model's
    /// BOS and EOS tokens, which templates may print (`{{ bos_token }}`).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ModelError::ChatTemplate(format!("cannot compile: {e}")))?;
        Ok(Self { env, source: source.to_owned(), bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), for models with no template.
    pub fn chatml() -> Self {
        // A constant template that the unit tests compile: this cannot fail.
        Self::new(CHATML, "", "<|im_end|>").expect("the built-in ChatML template compiles")
    }

    /// Renders a conversation. With `add_generation_prompt`, the text ends with what opens the
    /// assistant's turn (`<|im_start|>assistant\n` in ChatML), so the model writes the reply next.
    ///
    /// A template that calls `raise_exception(msg)` (to reject, say, roles that do not alternate)
    /// fails with [`ModelError::ChatTemplate`] holding exactly `msg`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template renders a request's tools itself (it reads the `tools` variable),
    /// as the templates of Qwen 2.5, Hermes, Llama 3.1 and SmolLM3 do.
    pub fn renders_tools(&self) -> bool {
        self.env.get_template(TEMPLATE_NAME).map(|t| t.undeclared_variables(false).contains("tools")).unwrap_or(false)
    }

    /// Renders a conversation with the request's tools handed to the template as `tools`
    /// (transformers' `apply_chat_template(messages, tools=...)`: a list of
    /// `{"type": "function", "function": {"name", "description"?, "parameters"}}`), `None` when
    /// the request has none.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::ChatTemplate(format!("cannot load template: {e}")))?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            // transformers passes these as None when the request has none.
            tools => tools.map_or(Value::from(()), Value::from_serialize),
            documents => Value::from(()),
        };
        template.render(ctx).map_err(render_error)
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS token text templates see as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS token text templates see as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// A render error as a [`ModelError`]: the bare message for `raise_exception`, else minijinja's
/// description (which names the template line).
fn render_error(e: Error) -> ModelError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(raised) = s.downcast_ref::<RaisedException>() {
            return ModelError::ChatTemplate(raised.0.clone());
        }
        source = s.source();
    }
    ModelError::ChatTemplate(format!("cannot render: {e}"))
}

/// `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: Value) -> std::result::Result<Value, Error> {
    let message = message.as_str().map_or_else(|| message.to_string(), str::to_owned);
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedException(message)))
}

/// Prints values the way Jinja (Python) does: `None`, `True`/`False`, Python reprs of lists and
/// dicts, Python float formatting. Everything else as minijinja prints it.
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &State<'_, '_>,
    value: &Value,
) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_repr(&mut s, value)?;
            out.write_str(&s).map_err(|e| Error::new(ErrorKind::WriteFailure, "cannot write output").with_source(e))
        }
        ValueKind::Number if !value.is_integer() => out
            .write_str(&python_float(value))
            .map_err(|e| Error::new(ErrorKind::WriteFailure, "cannot write output").with_source(e)),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `repr()` of a value (what `str()` of a list or dict prints for its items).
fn python_repr(out: &mut String, value: &Value) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => out.push_str(&python_float(value)),
        ValueKind::String => python_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &item)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &key)?;
                out.push_str(": ");
                python_repr(out, &value.get_item(&key)?)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's `repr()` of a string: single quotes unless the text has `'` and no `"`.
fn python_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr()` of a float: shortest round-trip digits, scientific below 1e-4 and from 1e16.
fn python_float(value: &Value) -> String {
    let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    format_python_float(x, "nan", "inf")
}

/// Formats `x` like Python's `float.__repr__`, with the given spellings of NaN and infinity.
fn format_python_float(x: f64, nan: &str, inf: &str) -> String {
    if x.is_nan() {
        return nan.to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { inf.to_owned() } else { format!("-{inf}") };
    }
    // `{:e}` gives the shortest round-trip digits as `d.ddde<exp>`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let plain = format!("{x}");
        if plain.contains('.') { plain } else { format!("{plain}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Options of transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
struct JsonOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// The `tojson` filter, as transformers defines it: Python's `json.dumps` with `ensure_ascii=False`
/// by default and no HTML escaping (unlike Jinja's own `tojson`).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")
                })?;
                Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (a.to_string(), b.to_string()),
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let opts = JsonOptions {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

/// Writes `value` as Python's `json.dumps` would.
fn write_json(out: &mut String, value: &Value, o: &JsonOptions, level: usize) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => {
            let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            out.push_str(&format_python_float(x, "NaN", "Infinity"));
        }
        ValueKind::String => json_string(out, value.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                json_newline(out, o, level + 1);
                write_json(out, item, o, level + 1)?;
            }
            json_newline(out, o, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                json_newline(out, o, level + 1);
                json_string(out, key, o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, item, o, level + 1)?;
            }
            json_newline(out, o, level);
            out.push('}');
        }
        kind => {
            return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: a {kind} is not JSON serializable")));
        }
    }
    Ok(())
}

/// With an indent, a newline and `level` indents (Python's `json.dumps(indent=...)` layout).
fn json_newline(out: &mut String, o: &JsonOptions, level: usize) {
    if let Some(indent) = &o.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

/// A dict key as Python's `json.dumps` writes it: strings as is, numbers, booleans and None spelled.
fn json_key(key: &Value) -> std::result::Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => format_python_float(f64::try_from(key.clone()).unwrap_or(f64::NAN), "NaN", "Infinity"),
        kind => {
            return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: keys must be str, not {kind}")));
        }
    })
}

/// A JSON string literal, escaped as Python's `json.dumps` does.
fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)`: the current time formatted like Python's `strftime`. The time is UTC
/// (transformers uses the server's local time; servers usually run in UTC).
fn strftime_now(format: &str) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(format, i64::try_from(secs).unwrap_or(0))
}

/// Formats a Unix time (UTC) with the common `strftime` codes; unknown codes are kept as written.
/// `%-d` style (no padding, glibc) is supported for the numeric codes.
fn strftime(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day % 3600 / 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = usize::try_from((days + 3).rem_euclid(7)).unwrap_or(0);
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[usize::try_from(month - 1).unwrap_or(0).min(11)];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            if unpadded {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match chars.next() {
            Some('Y') => {
                let _ = write!(out, "{year}");
            }
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month, 2),
            Some('d') => num(&mut out, day, 2),
            Some('e') => {
                let _ = if unpadded { write!(out, "{day}") } else { write!(out, "{day:>2}") };
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('j') => num(&mut out, yday, 3),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b' | 'h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('u') => num(&mut out, i64::try_from(weekday).unwrap_or(0) + 1, 1),
            Some('w') => num(&mut out, i64::try_from((weekday + 1) % 7).unwrap_or(0), 1),
            Some('F') => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            Some('D') => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
            }
        }
    }
    out
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Day count since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    /// A ChatML template written with block tags on their own lines, as many models ship it:
    /// trim_blocks / lstrip_blocks must remove the layout whitespace.
    const CHATML_MULTILINE: &str = "{% for message in messages %}\n    {% if loop.first and message['role'] != 'system' %}\n<|im_start|>system\nYou are helpful.<|im_end|>\n    {% endif %}\n<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n";

    #[test]
    fn chatml_renders() -> Result<()> {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>")?;
        let m = msgs(&[("system", "Be brief."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "2+2?")]);
        let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n";
        assert_eq!(t.render(&m, false)?, want);
        assert_eq!(t.render(&m, true)?, format!("{want}<|im_start|>assistant\n"));
        assert_eq!(ChatTemplate::chatml().render(&m, true)?, format!("{want}<|im_start|>assistant\n"));
        assert_eq!(ChatTemplate::chatml().render(&[], true)?, "<|im_start|>assistant\n");
        Ok(())
    }

    #[test]
    fn block_whitespace_is_trimmed_like_hf() -> Result<()> {
        let t = ChatTemplate::new(CHATML_MULTILINE, "", "")?;
        let got = t.render(&msgs(&[("user", "  What is 2+2?\n")]), true)?;
        assert_eq!(
            got,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        // keep_trailing_newline = false: one final newline of the template source is dropped.
        assert_eq!(ChatTemplate::new("x\n", "", "")?.render(&[], false)?, "x");
        assert_eq!(ChatTemplate::new("x\n\n", "", "")?.render(&[], false)?, "x\n");
        Ok(())
    }

    #[test]
    fn raise_exception_surfaces_its_message() -> Result<()> {
        let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
                   {{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "")?;
        assert_eq!(t.render(&msgs(&[("user", "ok")]), false)?, "ok");
        match t.render(&msgs(&[("system", "no")]), false) {
            Err(ModelError::ChatTemplate(msg)) => assert_eq!(msg, "Only user and assistant roles are supported!"),
            other => panic!("expected the template's exception, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn errors_are_chat_template_errors() {
        let err = ChatTemplate::new("{% for x in %}", "", "").map(|_| ()).expect_err("syntax error");
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
        let t = ChatTemplate::new("{{ messages | no_such_filter }}", "", "").expect("compiles");
        let err = t.render(&[], false).map(|_| ()).expect_err("unknown filter");
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
    }

    #[test]
    fn special_tokens_and_python_methods() -> Result<()> {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}\
                   {% if m.content.startswith('  a') %}!{% endif %}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>")?;
        assert_eq!(t.render(&msgs(&[("user", "  abc ")]), false)?, "<s>ABC!</s>");
        assert_eq!((t.bos_token(), t.eos_token(), t.source()), ("<s>", "</s>", src));
        Ok(())
    }

    #[test]
    fn values_print_like_python() -> Result<()> {
        let src = "{{ add_generation_prompt }} {{ tools }} {{ [1, 'a', none, true, 1.5] }} {{ {'k': \"it's\"} }} \
                   {{ 0.1 + 0.2 }} {{ 1e20 }} {{ 3 }} {{ 'x' }} {{ messages[0] }}{{ undefined_var }}";
        let t = ChatTemplate::new(src, "", "")?;
        assert_eq!(
            t.render(&msgs(&[("user", "hi")]), true)?,
            "True None [1, 'a', None, True, 1.5] {'k': \"it's\"} 0.30000000000000004 1e+20 3 x {'role': 'user', 'content': 'hi'}"
        );
        Ok(())
    }

    #[test]
    fn tojson_matches_python_json_dumps() -> Result<()> {
        let t = ChatTemplate::new(
            "{{ messages | tojson }}|{{ {'b': 1, 'a': [1.0, none, false], 'c': {}} | tojson(indent=2, sort_keys=true) }}|\
             {{ 'é<\"\\n\u{1}' | tojson }}|{{ 'é😀' | tojson(ensure_ascii=true) }}|\
             {{ [1, 2] | tojson(separators=[',', ':']) }}",
            "",
            "",
        )?;
        assert_eq!(
            t.render(&msgs(&[("user", "hi")]), false)?,
            "[{\"role\": \"user\", \"content\": \"hi\"}]|{\n  \"a\": [\n    1.0,\n    null,\n    false\n  ],\n  \"b\": 1,\n  \"c\": {}\n}|\
             \"é<\\\"\\n\\u0001\"|\"\\u00e9\\ud83d\\ude00\"|[1,2]"
        );
        Ok(())
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %a %B %j %p %I %-d/%-m %y %e %%", t),
            "2024-07-26 13:05:09 Friday Fri July 208 PM 01 26/7 24 26 %"
        );
        assert_eq!(strftime("%F %T %q", 0), "1970-01-01 00:00:00 %q");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        let now = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").and_then(|t| t.render(&[], false));
        assert!(now.is_ok_and(|y| y.len() == 4 && y.starts_with('2')));
    }

    #[test]
    fn templates_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn messages_round_trip_through_serde() {
        let m = ChatMessage::new("user", "hi");
        let json = serde_json::to_string(&m).expect("serializes");
        assert_eq!(json, r#"{"role":"user","content":"hi"}"#);
        assert_eq!(serde_json::from_str::<ChatMessage>(&json).expect("parses"), m);
    }
}
