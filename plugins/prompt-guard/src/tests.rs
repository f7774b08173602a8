//! Native tests against the SDK's mock host (`cargo test` in this crate).

use openlora_plugin_sdk::Message;
use openlora_plugin_sdk::preprocessor::{PreprocessOutcome, PreprocessRequest, Preprocessor};
use openlora_plugin_sdk::testing::MockHost;

use super::PromptGuard;

fn run(messages: &[(&str, &str)]) -> PreprocessOutcome {
    PromptGuard::preprocess(PreprocessRequest {
        model: "base".into(),
        messages: messages.iter().map(|(r, c)| Message { role: (*r).into(), content: (*c).into() }).collect(),
        metadata: vec![],
        tenant: "acme".into(),
    })
}

fn edited(outcome: PreprocessOutcome) -> Vec<(String, String)> {
    match outcome {
        PreprocessOutcome::Edited(m) => m.into_iter().map(|m| (m.role, m.content)).collect(),
        other => panic!("expected an edit, got {other:?}"),
    }
}

#[test]
fn contacts_are_redacted_and_dates_kept() {
    let _host = MockHost::new().install();
    let out = edited(run(&[("user", "mail ada@example.com or call 555-123-4567 before 2024-05-01")]));
    assert_eq!(out[0].1, "mail [email] or call [phone] before 2024-05-01");
    assert!(matches!(run(&[("user", "nothing to hide")]), PreprocessOutcome::Unchanged));
}

#[test]
fn config_turns_redaction_off_and_injects_the_system_prompt_once() {
    let _host = MockHost::new().config("redact_emails", "false").config("system_prompt", "Be careful.").install();
    let out = edited(run(&[("user", "ada@example.com")]));
    assert_eq!(out, [("system".into(), "Be careful.".into()), ("user".into(), "ada@example.com".into())]);
    let again = run(&[("system", "Be careful."), ("user", "hi")]);
    assert!(matches!(again, PreprocessOutcome::Unchanged), "already there: {again:?}");
}
