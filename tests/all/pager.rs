//! The adapter catalog and pager on the tiny model: a request stream over 1,000 adapters with
//! room for 50 gives the same logits as everything resident; pinned adapters survive eviction
//! pressure; unloading returns the budget and drops the weights; one cold adapter is loaded
//! once however many ask at once; a changed folder is served with its new content after a
//! rescan; registration reads headers only and one bad adapter does not stop a scan.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use openlora::adapters::catalog::{Catalog, SaveDtype, write_peft};
use openlora::adapters::pager::{NameStatus, Pager, PagerConfig, PagerError};
use openlora::adapters::synth::random_lora;
use openlora::adapters::{AdapterRegistry, LoraAdapter, LoraHost, Proj, WeightedAdapter};
use openlora::engine::kv_cache::{BlockAllocator, SequenceBlocks};
use openlora::model::config::LlamaConfig;
use openlora::model::llama::{ForwardBatch, LlamaModel};
use openlora::model::weights::SafetensorsFolder;
use openlora_kernels::{AttnSeq, CpuBackend};
use openlora_tests::fixture;

type B = CpuBackend;

fn tiny() -> LlamaModel<B> {
    let dir = fixture("tiny-llama");
    let cfg = LlamaConfig::from_hf_config(&dir.join("config.json")).expect("config");
    LlamaModel::load(&SafetensorsFolder::open(&dir).expect("weights"), cfg, CpuBackend::new()).expect("model")
}

/// A seeded 64-bit generator (splitmix64), so the test needs no RNG crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Roughly Zipf-shaped: index ⌊n^u⌋ - 1 for uniform u, so small indices dominate.
    fn skewed(&mut self, n: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((n as f64).powf(u) as usize).saturating_sub(1).min(n - 1)
    }
}

/// The error of an acquire that must fail.
fn refused(r: Result<Arc<LoraAdapter<B>>, PagerError>, why: &str) -> PagerError {
    match r {
        Ok(a) => panic!("{why}: `{}` was acquired", a.name),
        Err(e) => e,
    }
}

fn name(i: usize) -> String {
    format!("a{i:04}")
}

/// Writes `n` random rank-2 adapters (all seven projections, f32) for `cfg` under `root`.
fn write_adapters(root: &Path, cfg: &LlamaConfig, n: usize, seed: u64) {
    for i in 0..n {
        let h = random_lora(&name(i), cfg, 2, seed * 100_000 + i as u64);
        write_peft(&root.join(name(i)), &h, SaveDtype::F32, "tiny-llama").expect("write adapter");
    }
}

fn pager_for(root: &Path, cfg: &LlamaConfig, config: PagerConfig) -> (Pager<B>, usize) {
    let (catalog, report) = Catalog::scan(cfg.clone(), vec![root.to_path_buf()]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let per = catalog.get(&name(0)).expect("registered").loaded_bytes;
    (Pager::new(Arc::new(catalog), CpuBackend::new(), config).expect("pager"), per)
}

/// Last-position logits of each prompt, all in one batch, each prompt with its adapter.
fn logits(model: &LlamaModel<B>, prompts: &[Vec<u32>], adapters: &[Arc<LoraAdapter<B>>]) -> Vec<Vec<f32>> {
    let mut alloc = BlockAllocator::new(64, 4);
    let mut kv = model.alloc_kv(model.kv_layout(64, 4)).expect("kv");
    let mut seqs: Vec<SequenceBlocks> = prompts.iter().map(|_| SequenceBlocks::default()).collect();
    let (mut tokens, mut positions, mut slots, mut spans) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (p, s) in prompts.iter().zip(seqs.iter_mut()) {
        spans.push((tokens.len(), p.len()));
        slots.extend(s.append(&mut alloc, p.len()).expect("blocks"));
        tokens.extend_from_slice(p);
        positions.extend(0..p.len() as u32);
    }
    let attn: Vec<AttnSeq<'_>> = spans
        .iter()
        .zip(&seqs)
        .map(|(&(q_start, q_len), s)| AttnSeq { q_start, q_len, ctx_len: q_len, block_table: s.table() })
        .collect();
    let weighted: Vec<Vec<WeightedAdapter<B>>> =
        adapters.iter().map(|a| vec![WeightedAdapter { adapter: a.clone(), weight: 1.0 }]).collect();
    let lists: Vec<&[WeightedAdapter<B>]> = weighted.iter().map(Vec::as_slice).collect();
    let last: Vec<u32> = spans.iter().map(|&(s, l)| (s + l - 1) as u32).collect();
    let batch = ForwardBatch {
        tokens: &tokens,
        positions: &positions,
        slots: &slots,
        seqs: &attn,
        logits_rows: &last,
        adapters: &lists,
    };
    let out = model.forward(&mut kv, &batch).expect("forward");
    out.chunks(model.config.vocab_size).map(<[f32]>::to_vec).collect()
}

#[test]
fn a_request_stream_over_1000_adapters_with_room_for_50_matches_everything_resident() {
    let model = tiny();
    let tmp = tempfile::tempdir().expect("tempdir");
    write_adapters(tmp.path(), &model.config, 1000, 1);
    let probe = Catalog::scan(model.config.clone(), vec![tmp.path().to_path_buf()]).0;
    assert_eq!(probe.len(), 1000);
    let per = probe.get(&name(0)).expect("a0000").loaded_bytes;
    let config = PagerConfig::new(50 * per, 8 * per);
    let (pager, _) = pager_for(tmp.path(), &model.config, config);
    let pager = Arc::new(pager);

    // Everything resident: the plain registry, loaded on first use.
    let registry = AdapterRegistry::new(model.config.clone(), CpuBackend::new());
    let mut reference: HashMap<String, Arc<LoraAdapter<B>>> = HashMap::new();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("runtime");
    let mut rng = Rng(7);
    let mut distinct = std::collections::HashSet::new();
    for round in 0..150 {
        // Four requests at a time, acquired concurrently, then run as one mixed batch.
        let names: Vec<String> =
            (0..4).map(|_| name(if rng.below(4) == 0 { rng.below(1000) } else { rng.skewed(1000) })).collect();
        distinct.extend(names.iter().cloned());
        let acquired: Vec<Arc<LoraAdapter<B>>> = rt.block_on(async {
            let tasks: Vec<_> = names
                .iter()
                .map(|n| {
                    let (p, n) = (pager.clone(), n.clone());
                    tokio::spawn(async move { p.acquire(&n).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task").expect("acquire"));
            }
            out
        });
        let refs: Vec<Arc<LoraAdapter<B>>> = names
            .iter()
            .map(|n| {
                reference
                    .entry(n.clone())
                    .or_insert_with(|| registry.load_dir(n, &tmp.path().join(n)).expect("reference load"))
                    .clone()
            })
            .collect();
        let prompts: Vec<Vec<u32>> =
            (0..4).map(|i| (0..3 + i).map(|_| rng.below(model.config.vocab_size) as u32).collect()).collect();
        for (a, r) in acquired.iter().zip(&refs) {
            assert_eq!(a.generation, r.generation, "round {round}: {} has the wrong generation", a.name);
        }
        let got = logits(&model, &prompts, &acquired);
        let want = logits(&model, &prompts, &refs);
        assert_eq!(got, want, "round {round}: logits through the pager differ from everything resident");
        let m = pager.metrics();
        assert!(m.host.bytes <= m.host.budget && m.device.bytes <= m.device.budget, "round {round}: {m:?}");
    }
    drop(rt);
    let m = pager.metrics();
    assert!(distinct.len() > 100, "the stream should touch many adapters, touched {}", distinct.len());
    assert!(m.loads as usize >= distinct.len(), "every distinct adapter is read at least once: {m:?}");
    assert!(m.host.evictions > 0 && m.device.evictions > 0, "the budgets forced evictions: {m:?}");
    assert!(m.device.hits > 0 && m.host.hits > 0, "both tiers answered some acquires: {m:?}");
    assert!(m.host.resident <= 50 && m.device.resident <= 8, "{m:?}");
    assert_eq!(m.load_errors, 0);
    assert_eq!(m.load_seconds.2, m.loads, "every disk load is in the latency histogram");
}

#[test]
fn an_adapter_in_use_survives_eviction_pressure_and_unloading_returns_the_budget() {
    let cfg = tiny().config;
    let tmp = tempfile::tempdir().expect("tempdir");
    write_adapters(tmp.path(), &cfg, 30, 2);
    let per = Catalog::scan(cfg.clone(), vec![tmp.path().to_path_buf()]).0.get(&name(0)).expect("a0").loaded_bytes;
    let mut config = PagerConfig::new(2 * per, 3 * per);
    config.wait_for_room = Duration::from_millis(300);
    let (pager, _) = pager_for(tmp.path(), &cfg, config);

    let held = pager.acquire_blocking(&name(0)).expect("a0000");
    for i in 1..30 {
        drop(pager.acquire_blocking(&name(i)).expect("acquire"));
        let m = pager.metrics();
        assert!(m.device.bytes <= 3 * per && m.host.bytes <= 2 * per, "{m:?}");
    }
    let m = pager.metrics();
    assert!(m.device.evictions >= 26, "pressure evicted the others: {m:?}");
    let listed = pager.resident();
    let a0 = listed.iter().find(|r| r.names == [name(0)]).expect("a0000 still resident");
    assert!(a0.on_device && a0.pinned, "{a0:?}");
    let loads = m.loads;
    let again = pager.acquire_blocking(&name(0)).expect("a0000 again");
    assert!(Arc::ptr_eq(&held, &again), "the pinned adapter was never evicted or reloaded");
    assert_eq!(pager.metrics().loads, loads);
    drop(again);

    // Fill the device tier with pinned adapters: the next load waits, then fails, naming sizes.
    let b = pager.acquire_blocking(&name(1)).expect("a0001");
    let c = pager.acquire_blocking(&name(2)).expect("a0002");
    let err = refused(pager.acquire_blocking(&name(3)), "no room while three are pinned");
    assert!(matches!(err, PagerError::NoRoom { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("{per} bytes")) && msg.contains(&format!("{}", 3 * per)), "{msg}");
    // Released while a load waits: the waiting load completes.
    let waiter = std::thread::scope(|s| {
        let w = s.spawn(|| pager.acquire_blocking(&name(4)));
        std::thread::sleep(Duration::from_millis(50));
        drop(c);
        pager.notify_released();
        w.join().expect("join")
    });
    let d = waiter.expect("loads once a pinned adapter is released");
    assert!(pager.metrics().device.bytes <= 3 * per);
    drop(d);
    drop(b);

    // Unloading an adapter in use keeps its bytes counted until the holder lets go.
    let before = pager.metrics();
    let weak = Arc::downgrade(&held);
    let u = pager.unload(&name(0));
    assert_eq!(u.draining_bytes, per);
    assert_eq!(pager.metrics().device.bytes, before.device.bytes, "still held, still counted");
    drop(held);
    assert!(weak.upgrade().is_none(), "the pager no longer holds the weights");
    let after = pager.metrics();
    assert_eq!(after.device.bytes, before.device.bytes - per, "released bytes return to the budget");
    assert_eq!(after.draining, 0);

    // Unloading everything returns both budgets to zero. A loader thread hands a load's result
    // to its waiters through the load's slot and drops the slot (and its reference) just after
    // waking them; on a busy machine the waiter can get here first, so the last hand-off gets
    // up to 2 s to finish (a reference that is never dropped still fails).
    for i in 0..30 {
        pager.unload(&name(i));
    }
    let handed_off = std::time::Instant::now() + Duration::from_secs(2);
    while pager.metrics().pinned > 0 && std::time::Instant::now() < handed_off {
        std::thread::sleep(Duration::from_millis(5));
    }
    let m = pager.metrics();
    assert_eq!((m.device.bytes, m.host.bytes, m.device.resident, m.host.resident), (0, 0, 0, 0), "{m:?}");
    assert!(pager.resident().is_empty());
    // An unloaded name loads again on demand.
    assert_eq!(pager.acquire_blocking(&name(0)).expect("reload").bytes, per);
}

#[test]
fn concurrent_acquires_of_one_cold_adapter_load_it_once() {
    let cfg = tiny().config;
    let tmp = tempfile::tempdir().expect("tempdir");
    write_adapters(tmp.path(), &cfg, 2, 3);
    let (pager, per) = pager_for(tmp.path(), &cfg, PagerConfig::new(0, 4 * 1024 * 1024));
    let barrier = Barrier::new(16);
    let got: Vec<Arc<LoraAdapter<B>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    pager.acquire_blocking(&name(1)).expect("acquire")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    });
    assert!(got.iter().all(|a| Arc::ptr_eq(a, &got[0])), "everyone got the same prepared adapter");
    let m = pager.metrics();
    assert_eq!(m.loads, 1, "{m:?}");
    assert_eq!(m.prepares, 1, "{m:?}");
    assert_eq!(m.joined + m.device.hits, 15, "the others joined the load or hit after it: {m:?}");
    assert_eq!(m.device.bytes, per);
    // Async callers share loads the same way.
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let n0 = name(0);
    let (x, y) = rt.block_on(async { tokio::join!(pager.acquire(&n0), pager.acquire(&n0)) });
    assert!(Arc::ptr_eq(&x.expect("x"), &y.expect("y")));
    assert_eq!(pager.metrics().loads, 2);
    // Prefetch starts a load without waiting; the next acquire finds it (or joins it).
    pager.unload(&name(1));
    drop(got);
    pager.prefetch(&name(1)).expect("prefetch");
    pager.acquire_blocking(&name(1)).expect("after prefetch");
    assert_eq!(pager.metrics().loads, 3);
}

/// Once a burst of loads is over (the queue quiet for 200 ms), one loader hands the heap's
/// free pages back, once per burst: not after every load of a burst, and not while idle.
#[test]
fn the_loaders_trim_the_heap_once_after_each_burst_of_loads() {
    let cfg = tiny().config;
    let tmp = tempfile::tempdir().expect("tempdir");
    write_adapters(tmp.path(), &cfg, 6, 4);
    // One loader, and each burst queued at once (prefetch does not wait), so a burst is one
    // stretch of work however slow the machine.
    let config = PagerConfig { loader_threads: 1, ..PagerConfig::new(0, 64 * 1024 * 1024) };
    let (pager, _) = pager_for(tmp.path(), &cfg, config);
    let quiet = |want: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pager.metrics().heap_trims < want && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(pager.metrics().heap_trims, want, "{:?}", pager.metrics());
    };
    assert_eq!(pager.metrics().heap_trims, 0, "no loads, no trims");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(pager.metrics().heap_trims, 0, "an idle pager does not trim");
    let burst = |range: std::ops::Range<usize>| {
        for i in range.clone() {
            pager.prefetch(&name(i)).expect("prefetch");
        }
        for i in range {
            pager.acquire_blocking(&name(i)).expect("acquire");
        }
    };
    burst(0..3);
    assert_eq!(pager.metrics().loads, 3);
    quiet(1);
    burst(3..6);
    quiet(2);
    // Hits load nothing, so they leave nothing to trim.
    burst(0..3);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(pager.metrics().heap_trims, 2);
}

#[test]
fn a_changed_folder_under_the_same_name_yields_the_new_generation_after_rescan() {
    let cfg = tiny().config;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("styled");
    write_peft(&dir, &random_lora("styled", &cfg, 2, 10), SaveDtype::F32, "tiny").expect("v1");
    let (catalog, report) = Catalog::scan(cfg.clone(), vec![tmp.path().to_path_buf()]);
    assert_eq!(report.added, vec!["styled".to_owned()]);
    let pager = Pager::new(Arc::new(catalog), CpuBackend::new(), PagerConfig::new(1 << 20, 1 << 20)).expect("pager");
    let v1 = pager.acquire_blocking("styled").expect("v1");
    assert_eq!(v1.generation, LoraHost::load("styled", &dir, &cfg).expect("load").generation);

    // Same shapes and sizes, new values.
    write_peft(&dir, &random_lora("styled", &cfg, 2, 11), SaveDtype::F32, "tiny").expect("v2");
    let want = LoraHost::load("styled", &dir, &cfg).expect("load v2").generation;
    assert_ne!(want, v1.generation);
    let report = pager.rescan();
    assert_eq!(report.changed, vec!["styled".to_owned()], "{report:?}");
    let v2 = pager.acquire_blocking("styled").expect("v2");
    assert_eq!(v2.generation, want, "the new content is served, not the cached old weights");
    assert_eq!(pager.generation("styled"), Some(want));
    // The same content under a second name is read but held once.
    let twin = tmp.path().join("elsewhere/twin");
    std::fs::create_dir_all(&twin).expect("mkdir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(dir.join(f), twin.join(f)).expect("copy");
    }
    pager.catalog().add("twin", &twin).expect("add");
    let t = pager.acquire_blocking("twin").expect("twin");
    assert!(Arc::ptr_eq(&t, &v2), "identical content is prepared once");
    assert_eq!(pager.metrics().deduplicated, 1);
    drop(t);

    let g1 = v1.generation;
    assert!(pager.resident().iter().any(|r| r.generation == g1 && r.pinned && r.names.is_empty()));
    drop(v1);
    assert!(pager.resident().iter().all(|r| r.generation != g1), "released after its last holder");

    // A removed folder leaves the catalog on rescan; acquiring it is a clear error.
    std::fs::remove_dir_all(&dir).expect("rm");
    let report = pager.rescan();
    assert_eq!(report.removed, vec!["styled".to_owned()]);
    let e = refused(pager.acquire_blocking("styled"), "gone");
    assert!(e.to_string().contains("`styled` is not in the catalog"), "{e}");
}

#[test]
fn registration_reads_headers_only_and_a_bad_adapter_does_not_stop_the_scan() {
    let cfg = tiny().config;
    let tmp = tempfile::tempdir().expect("tempdir");
    write_adapters(tmp.path(), &cfg, 3, 4);
    // Non-finite values are only visible in the weights: registered, refused at load.
    let mut h = random_lora("nan", &cfg, 2, 5);
    if let Some(m) = h.layers[1][0].as_mut() {
        m.a[3] = f32::NAN;
    }
    write_peft(&tmp.path().join("nan"), &h, SaveDtype::F32, "tiny").expect("nan");
    // Truncated weights: the header's offsets point past the end.
    write_peft(&tmp.path().join("truncated"), &random_lora("t", &cfg, 2, 6), SaveDtype::F16, "tiny").expect("t");
    let w = tmp.path().join("truncated/adapter_model.safetensors");
    let bytes = std::fs::read(&w).expect("read");
    std::fs::write(&w, &bytes[..bytes.len() - 10]).expect("truncate");
    // Another base: hidden size 32.
    let mut other = cfg.clone();
    other.hidden_size = 32;
    write_peft(&tmp.path().join("other-base"), &random_lora("o", &other, 2, 7), SaveDtype::F32, "x").expect("o");
    // Not an adapter folder at all: ignored.
    std::fs::create_dir_all(tmp.path().join("notes")).expect("mkdir");

    let (catalog, report) = Catalog::scan(cfg.clone(), vec![tmp.path().to_path_buf()]);
    let mut names = catalog.names();
    names.sort();
    assert_eq!(names, vec![name(0), name(1), name(2), "nan".to_owned()]);
    let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("`truncated`") && e.contains("truncated?")), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("`other-base`") && e.contains("does not fit the base model")),
        "{errors:?}"
    );
    let e = catalog.get(&name(0)).expect("entry");
    assert_eq!(e.max_rank, 2);
    assert_eq!(e.modules, 14);
    assert!(e.manifest.is_none());
    let loaded = LoraHost::load("x", &e.dir, &cfg).expect("load");
    assert_eq!(e.loaded_bytes, loaded.bytes(), "the header predicts the loaded size exactly");

    let pager = Pager::new(Arc::new(catalog), CpuBackend::new(), PagerConfig::new(1 << 20, 1 << 20)).expect("pager");
    let err = refused(pager.acquire_blocking("nan"), "non-finite weights");
    assert!(err.to_string().contains("`nan`") && err.to_string().contains("non-finite"), "{err}");
    assert_eq!(pager.metrics().device.bytes, 0, "a failed load leaves nothing counted");
    // Too large for the device budget: refused with both sizes named.
    let small = Pager::new(pager.catalog().clone(), CpuBackend::new(), PagerConfig::new(0, 100)).expect("pager");
    let err = refused(small.acquire_blocking(&name(0)), "too large");
    assert!(
        err.to_string().contains(&format!("{} bytes", e.loaded_bytes)) && err.to_string().contains("100 bytes"),
        "{err}"
    );
}

/// Merged adapters are derived entries of the pager: concurrent acquires of one recipe build it
/// once, it counts against the device budget, and once unpinned it is evicted by LRU like any
/// loaded adapter (and built again on its next acquire).
#[test]
fn a_derived_adapter_is_built_once_counted_in_the_budget_and_evicted_by_lru() {
    use openlora::adapters::merge::{MergeMethod, MergeRecipe, merge};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let cfg = tiny().config;
    let tmp = tempfile::tempdir().expect("tmp");
    write_adapters(tmp.path(), &cfg, 4, 7);
    let probe = pager_for(tmp.path(), &cfg, PagerConfig::new(0, usize::MAX)).1;
    // Room for three adapters of this size (a merge of two rank-2 inputs under `linear` keeps
    // rank 2, the same size).
    let (pager, per) = pager_for(tmp.path(), &cfg, PagerConfig::new(0, 3 * probe));
    let pager = Arc::new(pager);
    let inputs: Vec<LoraHost> =
        (0..2).map(|i| LoraHost::load(&name(i), &tmp.path().join(name(i)), &cfg).expect("load")).collect();
    let inputs = Arc::new(inputs);
    let recipe = MergeRecipe::new(MergeMethod::parse("linear").expect("method"), vec![1.0, 0.5]);
    let key = recipe.generation_of(&inputs.iter().map(|h| h.generation).collect::<Vec<_>>());
    let builds = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(8));
    let build = {
        let (inputs, recipe, builds) = (inputs.clone(), recipe.clone(), builds.clone());
        move || {
            builds.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            let refs: Vec<&LoraHost> = inputs.iter().collect();
            Ok(merge("merged", &refs, &recipe)?)
        }
    };
    let held: Vec<Arc<LoraAdapter<B>>> = (0..8)
        .map(|_| {
            let (pager, barrier, build) = (pager.clone(), barrier.clone(), build.clone());
            std::thread::spawn(move || {
                barrier.wait();
                pager.acquire_derived(key, "merged", build).expect("derived")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    assert_eq!(builds.load(Ordering::SeqCst), 1, "eight concurrent acquires, one build");
    assert!(held.iter().all(|a| Arc::ptr_eq(a, &held[0]) && a.generation == key));
    let m = pager.metrics();
    assert_eq!((m.derived_built, m.derived_joined + m.derived_hits), (1, 7));
    assert_eq!(m.derived_resident, (1, held[0].bytes));
    assert_eq!(m.device.bytes, held[0].bytes, "the merge counts against the device budget");
    assert!(held[0].bytes <= per.max(probe));
    // Pinned, it survives pressure: fill the rest of the budget with loaded adapters.
    let a0 = pager.acquire_blocking(&name(2)).expect("a2");
    let a1 = pager.acquire_blocking(&name(3)).expect("a3");
    assert_eq!(pager.metrics().derived_resident.0, 1);
    drop((a0, a1));
    // Unpinned and least recently used, it is the one evicted for a new load.
    drop(held);
    let _ = pager.acquire_blocking(&name(2)).expect("touch a2");
    let _ = pager.acquire_blocking(&name(3)).expect("touch a3");
    let _a = pager.acquire_blocking(&name(0)).expect("a0");
    let m = pager.metrics();
    assert_eq!(m.derived_resident.0, 0, "the unpinned merge was evicted by LRU");
    assert!(m.device.bytes <= 3 * probe);
    let again = pager.acquire_derived(key, "merged", build).expect("rebuilt");
    assert_eq!(again.generation, key);
    assert_eq!(builds.load(Ordering::SeqCst), 2, "an evicted merge is built again");
}

/// Regression (hole 3): merges ran on whatever blocking thread asked, as many at once as
/// requests asked for, so distinct recipes could take every core. Builds now take one of
/// `max_concurrent_builds` slots; a caller that cannot get one within `load_timeout` gets
/// `Busy` (a 503), and nothing is built twice at once.
#[test]
fn merges_build_on_a_bounded_pool_and_a_busy_pool_answers_busy() {
    use openlora::adapters::merge::{MergeMethod, MergeRecipe, merge};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let cfg = tiny().config;
    let tmp = tempfile::tempdir().expect("tmp");
    write_adapters(tmp.path(), &cfg, 2, 11);
    let config = PagerConfig { load_timeout: Duration::from_millis(300), ..PagerConfig::new(0, usize::MAX) };
    let pager = Arc::new(pager_for(tmp.path(), &cfg, config).0);
    let inputs: Arc<Vec<LoraHost>> =
        Arc::new((0..2).map(|i| LoraHost::load(&name(i), &tmp.path().join(name(i)), &cfg).expect("load")).collect());
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let build = |weight: f32, ms: u64| {
        let (inputs, now, most) = (inputs.clone(), now.clone(), most.clone());
        let recipe = MergeRecipe::new(MergeMethod::parse("linear").expect("method"), vec![1.0, weight]);
        let key = recipe.generation_of(&inputs.iter().map(|h| h.generation).collect::<Vec<_>>());
        let f = move || {
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(ms));
            let refs: Vec<&LoraHost> = inputs.iter().collect();
            let out = merge("merged", &refs, &recipe);
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(out?)
        };
        (key, f)
    };
    // A slow build holds the only slot; a second recipe waits 300 ms, then is told so.
    let (k1, slow) = build(0.5, 1500);
    let p = pager.clone();
    let first = std::thread::spawn(move || p.acquire_derived(k1, "slow", slow));
    std::thread::sleep(Duration::from_millis(200));
    let (k2, quick) = build(0.25, 0);
    let started = std::time::Instant::now();
    match pager.acquire_derived(k2, "quick", quick) {
        Err(PagerError::Busy { slots: 1, .. }) => {}
        other => panic!("expected Busy, got {:?}", other.map(|a| a.name.clone())),
    }
    assert!(started.elapsed() < Duration::from_millis(1200), "it waited its timeout, not the build");
    assert!(first.join().expect("thread").is_ok());
    // Several recipes at once: all built, never two at a time (the waits fit the timeout).
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let (k, f) = build(0.1 * (i + 1) as f32, 50);
            let p = pager.clone();
            std::thread::spawn(move || p.acquire_derived(k, "m", f).is_ok())
        })
        .collect();
    assert!(handles.into_iter().all(|h| h.join().expect("thread")));
    assert_eq!(most.load(Ordering::SeqCst), 1, "builds never overlapped");
}

#[test]
fn name_status_reports_the_bound_generation_its_tiers_and_pins() {
    let cfg = tiny().config;
    let tmp = tempfile::tempdir().expect("tempdir");
    write_adapters(tmp.path(), &cfg, 2, 4);
    let per = Catalog::scan(cfg.clone(), vec![tmp.path().to_path_buf()]).0.get(&name(0)).expect("a0").loaded_bytes;
    // Room for one prepared adapter on the device, both on the host.
    let (pager, _) = pager_for(tmp.path(), &cfg, PagerConfig::new(2 * per, per));
    let names = [name(0), name(1), "absent".to_owned()];
    assert_eq!(pager.name_status(&names), vec![NameStatus::default(); 3], "nothing loaded yet");

    // The loader thread holds a finished load's result for a moment after waking its waiters
    // (it counts as a holder, and the load as in flight), so each state is read once settled.
    let settled = |done: &dyn Fn(&[NameStatus]) -> bool| {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = pager.name_status(&names);
            if done(&s) || std::time::Instant::now() > until {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let held = pager.acquire_blocking(&name(0)).expect("a0000");
    let s = settled(&|s| !s[0].loading);
    let a0 = NameStatus {
        generation: Some(held.generation),
        host_resident: true,
        device_resident: true,
        pinned: true,
        loading: false,
    };
    assert_eq!(s[0], a0, "held by a request");
    assert_eq!(s[1], NameStatus::default());
    drop(held);
    assert_eq!(settled(&|s| !s[0].pinned)[0], NameStatus { pinned: false, ..a0 }, "released");

    // Loading the other evicts a0000's device form (room for one); its host copy stays.
    let b = pager.acquire_blocking(&name(1)).expect("a0001");
    let s = settled(&|s| !s[1].loading);
    assert_eq!(s[0], NameStatus { device_resident: false, pinned: false, ..a0 }, "evicted from the device");
    assert_eq!((s[1].generation, s[1].device_resident, s[1].pinned), (Some(b.generation), true, true));
    assert_eq!(s[2], NameStatus::default(), "an unknown name");
    drop(b);
    pager.unload(&name(1));
    assert_eq!(pager.name_status(&names)[1], NameStatus::default(), "unloaded");
}

/// The bytes of a safetensors file's tensor data (the file minus its header).
fn tensor_bytes(file: &Path) -> usize {
    let b = std::fs::read(file).expect("read");
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
    b.len() - 8 - n
}

/// On the CPU an adapter is held once, in its file's precision: one saved in f16 takes the
/// bytes of its file's tensors (half of its f32 twin's), its prepared weights stay f16, and it
/// computes what the same values widened to f32 do (16-bit values widen exactly). The service
/// then turns the host tier off (`weights_in_host_memory`): a copy there would be f32 in the same RAM.
#[test]
fn the_cpu_holds_an_adapter_once_in_its_files_precision() {
    use openlora_kernels::{Backend, DType};
    let model = tiny();
    let cfg = model.config.clone();
    let tmp = tempfile::tempdir().expect("tempdir");
    let h = random_lora("h", &cfg, 2, 11);
    write_peft(&tmp.path().join("h16"), &h, SaveDtype::F16, "tiny-llama").expect("write f16");
    write_peft(&tmp.path().join("h32"), &h, SaveDtype::F32, "tiny-llama").expect("write f32");
    assert!(CpuBackend::new().weights_in_host_memory());
    let (catalog, report) = Catalog::scan(cfg.clone(), vec![tmp.path().to_path_buf()]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let pager = Pager::new(Arc::new(catalog), CpuBackend::new(), PagerConfig::new(0, 1 << 30)).expect("pager");
    let a16 = pager.acquire_blocking("h16").expect("h16");
    let a32 = pager.acquire_blocking("h32").expect("h32");
    let file16 = tensor_bytes(&tmp.path().join("h16/adapter_model.safetensors"));
    let file32 = tensor_bytes(&tmp.path().join("h32/adapter_model.safetensors"));
    assert_eq!((a16.bytes, a32.bytes), (file16, file32), "resident bytes are the files' tensor bytes");
    assert_eq!(2 * a16.bytes, a32.bytes);
    let m = a16.module(0, Proj::Q).expect("q_proj");
    assert_eq!((m.a.host().dtype(), m.b.host().dtype()), (DType::F16, DType::F16));
    let listed: usize = pager.resident().iter().map(|r| r.bytes + r.host_bytes).sum();
    assert_eq!(listed, file16 + file32, "the listing reports what is held");
    // The same f16 values prepared in f32: the same logits.
    let mut host = LoraHost::load("h16", &tmp.path().join("h16"), &cfg).expect("load");
    for l in &mut host.layers {
        for m in l.iter_mut().flatten() {
            m.dtype = DType::F32;
        }
    }
    let wide = Arc::new(LoraAdapter::prepare(&host, &CpuBackend::new()).expect("prepare"));
    assert_eq!(wide.bytes, a32.bytes);
    let prompts = vec![vec![1u32, 5, 9, 2], vec![3u32, 4], vec![7u32; 12]];
    let got = logits(&model, &prompts, &[a16.clone(), a16.clone(), a16]);
    let want = logits(&model, &prompts, &[wide.clone(), wide.clone(), wide]);
    for (g, w) in got.iter().zip(&want) {
        let err = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-5, "f16-held adapter differs from its f32 widening by {err}");
    }
}

/// A prepared adapter is one allocation: every A and Bᵀ is a view of one buffer, each starting
/// on a 64-byte boundary, in the file's precision, with nothing between them but that padding.
/// (Two allocations per module, interleaved with the f32 values read from the file, left the
/// heap fragmented: 1,000 loaded rank-8 q/v adapters took 1.30x their files' bytes in RSS;
/// one buffer each, 1.01x. `bench/adapter_memory.py` measures it.) The buffer is its own
/// page-aligned mapping, not a heap block; the modules lie in one slice with a 16-bit index per
/// slot, and a CUDA weight is boxed, so a CPU weight is not padded to its size.
#[test]
fn a_prepared_adapter_is_one_buffer_of_its_tensors() {
    use openlora_kernels::{DType, DeviceWeight, quant::quantize_row};
    let cfg = tiny().config.clone();
    let mut host = random_lora("one", &cfg, 3, 5);
    for l in &mut host.layers {
        for m in l.iter_mut().flatten() {
            m.dtype = DType::F16;
        }
    }
    let a = LoraAdapter::prepare(&host, &CpuBackend::new()).expect("prepare");
    let mut views: Vec<(usize, usize)> = Vec::new();
    let mut payload = 0;
    for (l, hl) in host.layers.iter().enumerate() {
        for (p, hm) in hl.iter().enumerate() {
            let (Some(hm), Some(m)) = (hm, a.module(l, Proj::ALL[p])) else {
                assert!(hm.is_none() && a.module(l, Proj::ALL[p]).is_none(), "layer {l} slot {p}");
                continue;
            };
            let mut bt = vec![0f32; hm.rank * hm.out_dim];
            for o in 0..hm.out_dim {
                for r in 0..hm.rank {
                    bt[r * hm.out_dim + o] = hm.b[o * hm.rank + r];
                }
            }
            for (w, want) in [(&m.a, quantize_row(DType::F16, &hm.a)), (&m.b, quantize_row(DType::F16, &bt))] {
                let bytes = w.host().bytes();
                assert_eq!(w.host().dtype(), DType::F16);
                assert_eq!(bytes, &want[..], "A and Bᵀ hold the file's values");
                views.push((bytes.as_ptr() as usize, bytes.len()));
                payload += bytes.len();
            }
        }
    }
    assert_eq!(a.bytes, payload);
    // Offsets from the first tensor (the buffer's start): each tensor starts where the one
    // before it ends, rounded up to 64.
    let first = views[0].0;
    assert_eq!(first % 4096, 0, "the buffer is a mapping of its own, starting on a page");
    assert_eq!(a.modules().count(), host.layers.iter().flatten().flatten().count());
    assert!(a.lm_head().is_none() && a.module(cfg.num_layers, Proj::Q).is_none());
    let mut end = 0usize;
    for &(at, len) in &views {
        assert_eq!(at.wrapping_sub(first), end.next_multiple_of(64), "tensors follow each other in one buffer");
        end = at - first + len;
    }
    assert!(end < payload + 64 * views.len(), "only alignment padding between tensors");
    assert!(
        std::mem::size_of::<DeviceWeight>() <= std::mem::size_of::<openlora_kernels::CpuWeight>() + 8,
        "DeviceWeight is {} bytes",
        std::mem::size_of::<DeviceWeight>()
    );
}
