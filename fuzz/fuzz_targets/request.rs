//! libFuzzer target `request`: see tests/fuzz/README.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Refusals are fine; a panic, a hang or an allocation past -malloc_limit_mb is a finding.
    let _ = openlora_tests::fuzz_targets::request(data);
});
