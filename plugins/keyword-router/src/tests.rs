//! Native tests against the SDK's mock host (`cargo test` in this crate).

use openlora_plugin_sdk::Message;
use openlora_plugin_sdk::router::{RouteDecision, RouteRequest, Router};
use openlora_plugin_sdk::testing::{MockHost, adapter};

use super::KeywordRouter;

fn route(text: &str) -> RouteDecision {
    KeywordRouter::route(RouteRequest {
        model: "base".into(),
        messages: vec![Message { role: "user".into(), content: text.into() }],
        metadata: vec![],
        tenant: "acme".into(),
    })
}

fn names(decision: RouteDecision) -> Vec<String> {
    match decision {
        RouteDecision::Adapters(chosen) => chosen.into_iter().map(|c| c.name).collect(),
        other => panic!("expected adapters, got {other:?}"),
    }
}

fn host() -> MockHost {
    MockHost::new()
        .config("keywords.arr", "pirate")
        .config("keywords.shout", "caps")
        .config("keywords.contract", "tag:legal")
        .adapter(adapter("pirate"))
        .adapter(adapter("caps"))
        .adapter(adapter("nda").tag("legal"))
        .adapter(adapter("lease").tag("legal"))
}

#[test]
fn whole_words_route_in_order_of_appearance() {
    let _host = host().install();
    assert_eq!(names(route("Shout it, arr!")), ["caps", "pirate"]);
    assert_eq!(names(route("review this CONTRACT")), ["lease", "nda"], "a tag is every adapter so tagged");
    assert!(matches!(route("sharrk shouting"), RouteDecision::DefaultRoute), "only whole words match");
}

#[test]
fn otherwise_decides_when_nothing_matches() {
    let _host = host().config("otherwise", "reject").install();
    assert!(matches!(route("hello"), RouteDecision::Reject(_)));
    drop(_host);
    let _host = host().config("otherwise", "pirate").install();
    assert_eq!(names(route("hello")), ["pirate"]);
}

#[test]
fn a_target_missing_from_the_catalog_is_skipped_with_a_warning() {
    let host = MockHost::new().config("keywords.arr", "pirate").install();
    assert!(matches!(route("arr"), RouteDecision::DefaultRoute));
    assert!(host.logged("`pirate` is not in the catalog"), "{:?}", host.logs());
}
