//! Native tests against the SDK's mock host (`cargo test` in this crate).

use openlora_plugin_sdk::attributor::{AdapterUse, Attributor, EvidenceShare, InferenceRecord, ModelUse};
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

#[test]
fn evidence_moves_part_of_the_datasets_share_to_the_quoted_contributor() {
    let _host = MockHost::new().install();
    let paid = |payments: &[openlora_plugin_sdk::attributor::Payment], who: &str| -> u64 {
        payments.iter().filter(|p| p.party == who).map(|p| p.micros).sum()
    };
    // Price 40000: base 10000, adapter 30000 -> owner 15000, datasets 15000.
    let declared = RevenueSplit::attribute(record(40_000)).expect("payments");
    assert_eq!((paid(&declared, "ann"), paid(&declared, "bob")), (5000, 10000));
    let ev = vec![EvidenceShare { adapter: "pirate".into(), dataset: "logs".into(), contributor: "ann".into(), weight: 9 }];
    let with = RevenueSplit::attribute_with_evidence(record(40_000), ev.clone()).expect("payments");
    // Half of the datasets' 15000 by evidence (all to ann), half by declaration (1:2).
    assert_eq!((paid(&with, "ann"), paid(&with, "bob")), (7500 + 2500, 5000));
    assert_eq!(with.iter().map(|p| p.micros).sum::<u64>(), 40_000);
    // Evidence for another adapter changes nothing here.
    let other = vec![EvidenceShare { adapter: "caps".into(), ..ev[0].clone() }];
    let unchanged = RevenueSplit::attribute_with_evidence(record(40_000), other).expect("payments");
    assert_eq!(format!("{unchanged:?}"), format!("{declared:?}"));
    let _host = MockHost::new().config("evidence_bps", "10000").install();
    let all = RevenueSplit::attribute_with_evidence(record(40_000), ev).expect("payments");
    assert_eq!((paid(&all, "ann"), paid(&all, "bob")), (15000, 0));
}
