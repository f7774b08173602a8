//! Native tests against the SDK's mock host (`cargo test` in this crate).

use openlora_plugin_sdk::AdapterChoice;
use openlora_plugin_sdk::merger::{MergeMethod, MergeRequest, Merger};
use openlora_plugin_sdk::testing::MockHost;

use super::RecipeMerger;

fn request(n: usize, merge: Option<&str>) -> MergeRequest {
    MergeRequest {
        adapters: (0..n).map(|i| AdapterChoice { name: format!("a{i}"), weight: 1.0 }).collect(),
        metadata: merge.map(|m| vec![("merge".to_owned(), m.to_owned())]).unwrap_or_default(),
    }
}

#[test]
fn the_adapter_count_or_the_metadata_picks_the_method() {
    let _host = MockHost::new().install();
    assert!(matches!(RecipeMerger::merge(request(2, None)).expect("recipe").method, MergeMethod::Linear));
    assert!(matches!(RecipeMerger::merge(request(3, None)).expect("recipe").method, MergeMethod::Ties));
    assert!(matches!(RecipeMerger::merge(request(2, Some("ties"))).expect("recipe").method, MergeMethod::Ties));
    assert!(RecipeMerger::merge(request(2, Some("slerp"))).is_err(), "unknown methods are refused");
    assert!(RecipeMerger::merge(request(0, None)).is_err());
}

#[test]
fn normalize_scales_the_weights_to_one() {
    let _host = MockHost::new().config("normalize", "true").install();
    let recipe = RecipeMerger::merge(request(4, None)).expect("recipe");
    assert!((recipe.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{:?}", recipe.weights);
}
