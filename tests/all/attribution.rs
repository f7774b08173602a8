//! The ledger: every flipped byte is caught at its entry, concurrent appends form one chain,
//! a torn last line is cut on recovery, and the node key is private to its owner.

use std::sync::Arc;

use openlora::adapters::manifest::{Contributor, Dataset};
use openlora::attribution::ledger::{Ledger, load_or_create_key, verify_bytes, verify_file};
use openlora::attribution::receipt::{
    AdapterUse, InferenceRecord, ModelUse, Receipt, ReceiptBody, builtin_attribution,
};
use openlora::attribution::totals;

fn record(i: u64) -> InferenceRecord {
    InferenceRecord {
        request_id: format!("req-{i}"),
        tenant: if i.is_multiple_of(2) { "demo".into() } else { "partner".into() },
        time_ms: 1_700_000_000_000 + i,
        base_model: ModelUse {
            id: "m".into(),
            sha256: "ab".repeat(32),
            owner: "base-co".into(),
            price_per_1k_tokens: 100,
        },
        adapters: vec![AdapterUse {
            name: "pirate".into(),
            generation: "cd".repeat(32),
            weight: 0.75,
            owner: "alice".into(),
            price_per_1k_tokens: 2000,
            datasets: vec![Dataset {
                id: "pirate-qa".into(),
                sha256: "ef".repeat(32),
                license: "cc-by-4.0".into(),
                files: Vec::new(),
                merkle_root: None,
                contributors: vec![
                    Contributor { name: "alice".into(), share: 3 },
                    Contributor { name: "bob".into(), share: 1 },
                ],
            }],
        }],
        merge: None,
        prompt_tokens: 30 + i,
        completion_tokens: 17,
        finish_reason: "stop".into(),
        plugins: vec![],
        prompt_sha256: "00".repeat(32),
        output_sha256: "11".repeat(32),
        user: None,
        evidence: None,
    }
}

fn ledger_in(dir: &std::path::Path) -> Ledger {
    let key = load_or_create_key(&dir.join("node.key")).expect("key");
    Ledger::open(&dir.join("ledger.jsonl"), key).expect("open")
}

#[test]
fn flipping_any_byte_is_detected_at_the_entry_that_holds_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let l = ledger_in(tmp.path());
    for i in 0..3 {
        let r = record(i);
        let a = builtin_attribution(&r);
        l.append_blocking(r, a).expect("append");
    }
    let data = std::fs::read(tmp.path().join("ledger.jsonl")).expect("read");
    assert!(verify_bytes(&data, None).error.is_none());
    // Entry of each byte: lines, each with its newline.
    let mut entry_of = Vec::with_capacity(data.len());
    let mut e = 0;
    for &b in &data {
        entry_of.push(e);
        if b == b'\n' {
            e += 1;
        }
    }
    for pos in 0..data.len() {
        for bit in [0x01u8, 0x20, 0x80] {
            let mut bad = data.clone();
            bad[pos] ^= bit;
            let v = verify_bytes(&bad, None);
            match v.error {
                Some(openlora::attribution::LedgerError::Bad { index, .. }) => {
                    assert_eq!(index, entry_of[pos], "byte {pos} (bit {bit:#x}) blamed on entry {index}")
                }
                other => panic!("byte {pos} flipped with {bit:#x} went undetected: {other:?}"),
            }
        }
    }
}

#[test]
fn concurrent_appends_form_one_unbroken_chain_and_payments_sum_exactly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let l = Arc::new(ledger_in(tmp.path()));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                (0..63)
                    .map(|i| {
                        let r = record(t * 1000 + i);
                        let a = builtin_attribution(&r);
                        l.append_blocking(r, a).expect("append")
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let mut ids: Vec<String> = threads.into_iter().flat_map(|t| t.join().expect("join")).collect();
    // 16 * 63 = 1,008 receipts.
    assert_eq!(ids.len(), 1008);
    let v = verify_file(&tmp.path().join("ledger.jsonl"), Some(l.public_key())).expect("read");
    assert!(v.error.is_none(), "{:?}", v.error);
    assert_eq!(v.receipts.len(), 1008);
    let mut on_disk: Vec<String> = v.receipts.iter().map(|r| r.hash.clone()).collect();
    ids.sort();
    on_disk.sort();
    assert_eq!(ids, on_disk, "every acknowledged receipt is in the ledger");
    for r in &v.receipts {
        let a = &r.body.attribution;
        assert_eq!(a.payments.iter().map(|p| p.micros).sum::<u64>(), a.total_micros);
        assert!(a.total_micros > 0);
    }
    let t = totals(&v.receipts);
    let sum: u64 = t.iter().map(|(_, _, v)| v).sum();
    assert_eq!(sum, v.receipts.iter().map(|r| r.body.attribution.total_micros).sum::<u64>());
    // A receipt can be read back by id.
    let (r, tenant) = l.get(&ids[5]).expect("read").expect("present");
    assert_eq!(r.hash, ids[5]);
    assert_eq!(tenant, r.body.record.tenant);
}

#[test]
fn a_torn_last_line_is_cut_on_reopen_and_the_key_is_private() {
    let tmp = tempfile::tempdir().expect("tmp");
    {
        let l = ledger_in(tmp.path());
        for i in 0..4 {
            let r = record(i);
            let a = builtin_attribution(&r);
            l.append_blocking(r, a).expect("append");
        }
    }
    let path = tmp.path().join("ledger.jsonl");
    let data = std::fs::read(&path).expect("read");
    std::fs::write(&path, &data[..data.len() - 40]).expect("tear");
    assert!(verify_file(&path, None).expect("read").torn_tail);
    let l = ledger_in(tmp.path());
    assert_eq!(l.len(), 3);
    let r = record(9);
    let a = builtin_attribution(&r);
    l.append_blocking(r, a).expect("append after recovery");
    let v = verify_file(&path, None).expect("read");
    assert!(v.error.is_none(), "{:?}", v.error);
    assert_eq!(v.receipts.len(), 4);
    // Damage in the middle is not "repaired": opening refuses and names the entry.
    let mut data = std::fs::read(&path).expect("read");
    let second_line = data.iter().position(|&b| b == b'\n').expect("nl") + 10;
    data[second_line] ^= 1;
    std::fs::write(&path, &data).expect("write");
    drop(l);
    let key = load_or_create_key(&tmp.path().join("node.key")).expect("key");
    match Ledger::open(&path, key) {
        Err(e) => assert!(e.to_string().contains("entry 1"), "{e}"),
        Ok(_) => panic!("a damaged ledger opened"),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("node.key")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

/// Regression (multi-tenant trust, hole 7): two processes could append to one ledger and
/// interleave their chains (the node then refused to start). The second writer is refused,
/// naming the holder; the lock goes with the first.
#[test]
fn a_second_writer_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().expect("tmp");
    let first = ledger_in(tmp.path());
    let key = load_or_create_key(&tmp.path().join("node.key")).expect("key");
    match Ledger::open(&tmp.path().join("ledger.jsonl"), key) {
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("in use by") && m.contains(&format!("pid {}", std::process::id())), "{m}");
        }
        Ok(_) => panic!("a second writer opened the ledger"),
    }
    let r = record(1);
    let a = builtin_attribution(&r);
    first.append_blocking(r, a).expect("the first writer keeps writing");
    drop(first);
    let again = ledger_in(tmp.path());
    assert_eq!(again.len(), 1, "reopened once the first writer is gone");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("ledger.jsonl")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the ledger is private to its owner");
    }
}

/// Regression (hole 7): a replaced `node.key` was accepted until the second restart bricked the
/// ledger. A key that did not sign the existing receipts is refused at open, naming both keys.
#[test]
fn a_replaced_node_key_is_refused_naming_both_keys() {
    let tmp = tempfile::tempdir().expect("tmp");
    let l = ledger_in(tmp.path());
    let r = record(1);
    let a = builtin_attribution(&r);
    l.append_blocking(r, a).expect("append");
    let signer = l.public_key().to_owned();
    drop(l);
    std::fs::remove_file(tmp.path().join("node.key")).expect("remove key");
    let elsewhere = tempfile::tempdir().expect("tmp");
    let new_key = || load_or_create_key(&tmp.path().join("node.key")).expect("new key");
    let other_hex = Ledger::open(&elsewhere.path().join("l.jsonl"), new_key()).expect("open").public_key().to_owned();
    assert_ne!(other_hex, signer);
    match Ledger::open(&tmp.path().join("ledger.jsonl"), new_key()) {
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains(&signer) && m.contains(&other_hex), "names both keys: {m}");
        }
        Ok(_) => panic!("a ledger opened with a key that did not sign it"),
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Rewrites the ledger at `path` as a holder of a signing key would forge it: `edit` each
/// body, then re-chain, re-hash and re-sign every receipt (`sign`, whose public key is
/// `public`). Hashes, links and signatures all check out afterwards.
fn resign(
    path: &std::path::Path,
    public: &str,
    sign: impl Fn(&[u8]) -> Vec<u8>,
    edit: impl Fn(usize, &mut ReceiptBody),
) {
    let data = std::fs::read_to_string(path).expect("read");
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for (i, line) in data.lines().enumerate() {
        let mut r: Receipt = serde_json::from_str(line).expect("receipt");
        edit(i, &mut r.body);
        r.body.node_key = public.to_owned();
        r.body.prev.clone_from(&prev);
        let hash = r.body.hash();
        r.hash = hex_of(&hash);
        r.sig = hex_of(&sign(&hash));
        prev.clone_from(&r.hash);
        out.push_str(&serde_json::to_string(&r).expect("json"));
        out.push('\n');
    }
    std::fs::write(path, out).expect("write");
}

/// Regression (hole 7): `ledger verify` did not check that a receipt's payments sum to its
/// total, so a receipt whose split was edited and re-signed with the ledger's own key passed.
#[test]
fn ledger_verify_rejects_payments_not_summing_to_total() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("ledger.jsonl");
    let public = {
        let l = ledger_in(tmp.path());
        for i in 0..3 {
            let r = record(i);
            let a = builtin_attribution(&r);
            l.append_blocking(r, a).expect("append");
        }
        l.public_key().to_owned()
    };
    let key = load_or_create_key(&tmp.path().join("node.key")).expect("key");
    let sign = |hash: &[u8]| key.sign(hash).as_ref().to_vec();
    // Re-signing alone leaves a valid ledger: what fails below is the sum, nothing else.
    resign(&path, &public, sign, |_, _| {});
    assert!(verify_file(&path, Some(&public)).expect("read").error.is_none());

    // Receipt 1 pays its first party 1,000 micros more than the total it charges.
    resign(&path, &public, sign, |i, body| {
        if i == 1 {
            body.attribution.payments[0].micros += 1000;
        }
    });
    let v = verify_file(&path, Some(&public)).expect("read");
    assert_eq!(v.receipts.len(), 1, "the entry before it verifies");
    let total = record(1).total_price();
    let data = std::fs::read_to_string(&path).expect("read");
    let id = serde_json::from_str::<Receipt>(data.lines().nth(1).expect("line 2")).expect("receipt").hash;
    match v.error {
        Some(openlora::attribution::LedgerError::Bad { index: 1, reason, .. }) => {
            assert!(reason.contains(&format!("receipt {id}")), "names the receipt: {reason}");
            assert!(
                reason.contains(&format!("payments sum to {} micros", total + 1000))
                    && reason.contains(&format!("total_micros is {total}")),
                "names both amounts: {reason}"
            );
        }
        other => panic!("payments not summing to the total went undetected: {other:?}"),
    }
    // The node refuses to open it, and refuses to sign such a receipt in the first place.
    let key = load_or_create_key(&tmp.path().join("node.key")).expect("key");
    assert!(Ledger::open(&path, key).is_err(), "a ledger whose sums are wrong opened");
    let fresh = tempfile::tempdir().expect("tmp");
    let l = ledger_in(fresh.path());
    let r = record(7);
    let mut a = builtin_attribution(&r);
    a.total_micros += 1;
    let refused = l.append_blocking(r, a.clone()).expect_err("refused");
    assert!(refused.contains(&format!("total_micros is {}", a.total_micros)), "{refused}");
    assert!(l.is_empty());
}
