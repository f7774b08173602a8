//! keyword-router: routes a request to adapters by the words in its last user message.
//!
//! Configuration (the `config` table of the plugin's `[[plugins]]` entry):
//!
//! ```toml
//! [plugins.config.keywords]     # word -> adapter name, or `tag:NAME` for every adapter so tagged
//! arr = "pirate"
//! shout = "caps"
//! contract = "tag:legal"
//! [plugins.config]
//! otherwise = "default"         # no match: "default" (the client's model), "reject", or an adapter
//! ```
//!
//! Words match whole words, case-insensitively. Several matches route to several adapters,
//! each with weight 1, in the order of the keywords' first appearance in the message.
//! Adapters the catalog does not know are skipped with a warning.

use openlora_plugin_sdk::router::{RouteDecision, RouteRequest, Router};
use openlora_plugin_sdk::{AdapterChoice, catalog, config, export_router, logging};

struct KeywordRouter;

impl Router for KeywordRouter {
    fn route(request: RouteRequest) -> RouteDecision {
        let text = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.to_lowercase())
            .unwrap_or_default();
        let words: Vec<(usize, &str)> = words(&text).collect();

        // (position of first appearance, target) for every keyword present.
        let mut hits: Vec<(usize, String)> = config::section("keywords")
            .into_iter()
            .filter_map(|(keyword, target)| {
                let keyword = keyword.to_lowercase();
                words.iter().find(|(_, w)| *w == keyword).map(|(at, _)| (*at, target))
            })
            .collect();
        hits.sort();

        let mut chosen: Vec<AdapterChoice> = Vec::new();
        for (_, target) in hits {
            for name in resolve(&target) {
                if !chosen.iter().any(|c| c.name == name) {
                    chosen.push(AdapterChoice { name, weight: 1.0 });
                }
            }
        }
        if !chosen.is_empty() {
            return RouteDecision::Adapters(chosen);
        }
        match config::get("otherwise").as_deref().unwrap_or("default") {
            "default" => RouteDecision::DefaultRoute,
            "reject" => RouteDecision::Reject("no route matches this request".to_owned()),
            adapter => RouteDecision::Adapters(vec![AdapterChoice { name: adapter.to_owned(), weight: 1.0 }]),
        }
    }
}

/// Adapter names for a keyword's target: one adapter, or every adapter with a tag.
fn resolve(target: &str) -> Vec<String> {
    if let Some(tag) = target.strip_prefix("tag:") {
        return catalog::adapters().into_iter().filter(|a| a.tags.iter().any(|t| t == tag)).map(|a| a.name).collect();
    }
    if catalog::adapter(target).is_some() {
        vec![target.to_owned()]
    } else {
        logging::warn(&format!("keyword target `{target}` is not in the catalog; skipped"));
        Vec::new()
    }
}

/// The words of `text` (runs of alphanumerics) with their byte offsets.
fn words(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split(|c: char| !c.is_alphanumeric())
        .scan(0usize, move |offset, word| {
            let at = *offset;
            *offset += word.len() + 1;
            Some((at, word))
        })
        .filter(|(_, w)| !w.is_empty())
}

export_router!(KeywordRouter);

#[cfg(test)]
mod tests;
