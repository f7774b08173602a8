//! prompt-guard: injects a system prompt and redacts e-mail addresses and phone numbers, so
//! they never reach the model.
//!
//! Configuration:
//!
//! ```toml
//! [plugins.config]
//! system_prompt = "You are a careful assistant."  # put first; an existing system message is kept after it
//! redact_emails = true     # default true: `ada@example.com` -> `[email]`
//! redact_phones = true     # default true: `+1 (555) 123-4567` -> `[phone]`
//! ```
//!
//! A phone number is a run of 9 to 15 digits, optionally led by `+`, whose digits are
//! separated by at most one space, dash, dot or parenthesis at a time (so dates such as
//! `2024-05-01` and short numbers stay). An e-mail address is `local@domain.tld` with a
//! top-level domain of at least two letters.

use openlora_plugin_sdk::preprocessor::{PreprocessOutcome, PreprocessRequest, Preprocessor};
use openlora_plugin_sdk::{Message, config, export_preprocessor};

struct PromptGuard;

impl Preprocessor for PromptGuard {
    fn preprocess(request: PreprocessRequest) -> PreprocessOutcome {
        let emails = config::get("redact_emails").as_deref() != Some("false");
        let phones = config::get("redact_phones").as_deref() != Some("false");
        let mut messages = request.messages;
        let mut changed = false;
        for message in &mut messages {
            let mut content = message.content.clone();
            if emails {
                content = redact_emails(&content);
            }
            if phones {
                content = redact_phones(&content);
            }
            if content != message.content {
                message.content = content;
                changed = true;
            }
        }
        if let Some(system) = config::get("system_prompt").filter(|s| !s.is_empty()) {
            let already = messages.first().is_some_and(|m| m.role == "system" && m.content.starts_with(&system));
            if !already {
                match messages.first_mut() {
                    Some(first) if first.role == "system" => first.content = format!("{system}\n\n{}", first.content),
                    _ => messages.insert(0, Message { role: "system".to_owned(), content: system }),
                }
                changed = true;
            }
        }
        if changed { PreprocessOutcome::Edited(messages) } else { PreprocessOutcome::Unchanged }
    }
}

fn is_local_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._%+-".contains(c)
}

fn is_domain_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '.'
}

/// Replaces every e-mail address in `text` with `[email]`.
fn redact_emails(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied_to = 0;
    while i < chars.len() {
        if chars[i] == '@' {
            let mut start = i;
            while start > copied_to && is_local_char(chars[start - 1]) {
                start -= 1;
            }
            let mut end = i + 1;
            while end < chars.len() && is_domain_char(chars[end]) {
                end += 1;
            }
            // A sentence may end right after the address: a trailing dot is not the domain's.
            while end > i + 1 && (chars[end - 1] == '.' || chars[end - 1] == '-') {
                end -= 1;
            }
            let domain: String = chars[i + 1..end].iter().collect();
            let tld_ok = domain.rsplit_once('.').is_some_and(|(host, tld)| {
                !host.is_empty() && tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic())
            });
            if start < i && tld_ok {
                out.extend(&chars[copied_to..start]);
                out.push_str("[email]");
                copied_to = end;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out.extend(&chars[copied_to..]);
    out
}

/// Replaces every phone number in `text` with `[phone]`.
fn redact_phones(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied_to = 0;
    while i < chars.len() {
        let starts = chars[i] == '+' || chars[i] == '(' || chars[i].is_ascii_digit();
        let after_word = i > 0 && chars[i - 1].is_alphanumeric();
        if starts && !after_word {
            let (end, digits) = scan_phone(&chars, i);
            let ends_in_word = end < chars.len() && chars[end].is_alphanumeric();
            if (9..=15).contains(&digits) && !ends_in_word {
                out.extend(&chars[copied_to..i]);
                out.push_str("[phone]");
                copied_to = end;
                i = end;
                continue;
            }
            // Skip the whole run so a long number is not re-scanned from its middle.
            i = end.max(i + 1);
            continue;
        }
        i += 1;
    }
    out.extend(&chars[copied_to..]);
    out
}

/// From `start`, the end of the longest phone-like run (ending on a digit or `)`) and the
/// number of digits in it.
fn scan_phone(chars: &[char], start: usize) -> (usize, usize) {
    let mut i = start;
    if chars[i] == '+' {
        i += 1;
    }
    let (mut end, mut digits, mut count) = (start, 0, 0);
    let mut last_was_separator = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            count += 1;
            last_was_separator = false;
            end = i + 1;
            digits = count;
        } else if c == ')' && !last_was_separator {
            end = i + 1;
            digits = count;
        } else if matches!(c, ' ' | '-' | '.' | '(') && !last_was_separator {
            last_was_separator = c != '(';
        } else {
            break;
        }
        i += 1;
    }
    (end, digits)
}

export_preprocessor!(PromptGuard);

#[cfg(test)]
mod tests;
