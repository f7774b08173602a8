//! Native tests against the SDK's mock host (`cargo test` in this crate).

use openlora_plugin_sdk::attributor::{AdapterUse, Attributor, InferenceRecord, ModelUse};
use openlora_plugin_sdk::testing::MockHost;
use openlora_plugin_sdk::{Contributor, Dataset};

use super::RevenueSplit;

fn record(price: u64) -> InferenceRecord {
    InferenceRecord {
        request_id: "r".into(),
        tenant: "acme".into(),
        time_ms: 0,
        base_model: ModelUse { id: "base".into(), sha256: String::new(), owner: "lab".into(), price_per_1k_tokens: 1 },
        adapters: vec![AdapterUse {
            name: "pirate".into(),
            generation: String::new(),
            weight: 1.0,
            owner: "ahoy".into(),
            price_per_1k_tokens: 3,
            datasets: vec![Dataset {
                id: "logs".into(),
                sha256: String::new(),
                license: "cc-by".into(),
                contributors: vec![
                    Contributor { name: "ann".into(), share: 1 },
                    Contributor { name: "bob".into(), share: 2 },
                ],
            }],
        }],
        merge: None,
        prompt_tokens: 10,
        completion_tokens: 10,
        finish_reason: "stop".into(),
        price_micros: price,
    }
}

#[test]
fn payments_sum_to_the_price_exactly_for_every_price() {
    let _host = MockHost::new().config("platform_bps", "500").install();
    for price in [0, 1, 7, 999, 1_000_003] {
        let payments = RevenueSplit::attribute(record(price)).expect("payments");
        assert_eq!(payments.iter().map(|p| p.micros).sum::<u64>(), price, "{payments:?}");
    }
}

#[test]
fn a_bad_basis_point_setting_is_refused_naming_the_key() {
    let _host = MockHost::new().config("dataset_bps", "12000").install();
    let err = RevenueSplit::attribute(record(100)).expect_err("refused");
    assert!(err.contains("dataset_bps"), "{err}");
}
