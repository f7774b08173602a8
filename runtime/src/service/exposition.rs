//! The Prometheus text exposition (format 0.0.4) of the service's figures: vLLM's names that
//! routers already read and openlora's own series (KV blocks, adapter tiers, merges, plugins).
//! The HTTP layer serves it at `GET /metrics`.
//!
//! The contract with the router ecosystem (the Gateway API Inference Extension's model-server
//! protocol, llm-d, inference-perf): `vllm:num_requests_running` and `vllm:num_requests_waiting`
//! (gauges), `vllm:kv_cache_usage_perc` (gauge, 0..1; `vllm:gpu_cache_usage_perc` is the same
//! figure under vLLM's old name, kept for a release), `vllm:lora_requests_info` (a gauge with one
//! series whose labels are `max_lora`, an integer, and `running_lora_adapters` and
//! `waiting_lora_adapters`, comma-separated names; its value is the sample's Unix time) and
//! `vllm:cache_config_info` (`block_size`, `num_gpu_blocks`). Every other `vllm:*` series
//! carries a `model_name` label, as vLLM's do; the two `_info` gauges carry exactly vLLM's
//! labels. Every family has `# HELP` and `# TYPE`, and a counter's family is named with its
//! `_total` suffix (the 0.0.4 text format names the family as its samples), which `promtool
//! check metrics` verifies in the tests.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use openlora_kernels::Backend;

use super::Service;
use crate::metrics::Histogram;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out {
    text: String,
    model: String,
}

/// A counter family's name: its samples' name, ending in `_total`.
fn family(name: &str, kind: &str) -> String {
    if kind == "counter" && !name.ends_with("_total") { format!("{name}_total") } else { name.to_owned() }
}

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let name = family(name, kind);
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A sample with exactly `labels` (no `model_name`): vLLM's `_info` gauges.
    fn info(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let l: Vec<String> = labels.iter().map(|(k, val)| format!("{k}=\"{}\"", esc(val))).collect();
        let _ = writeln!(self.text, "{name}{{{}}} {v}", l.join(","));
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let mut l = format!("model_name=\"{}\"", esc(&self.model));
        for (k, val) in labels {
            let _ = write!(l, ",{k}=\"{}\"", esc(val));
        }
        let _ = writeln!(self.text, "{name}{{{l}}} {v}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.head(name, kind, help);
        self.sample(&family(name, kind), &[], v);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        let (buckets, sum, count) = h.snapshot();
        for (b, c) in buckets {
            self.sample(&format!("{name}_bucket"), &[("le", &format!("{b}"))], c as f64);
        }
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], count as f64);
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count as f64);
    }
}

impl<B: Backend + Clone + 'static> Service<B> {
    /// The Prometheus text exposition (format 0.0.4) of every figure.
    pub fn prometheus_text(&self) -> String {
        let svc = self;
        let s = svc.engine.stats();
        let cfg = svc.engine.config();
        let m = &svc.metrics;
        let mut o = Out { text: String::new(), model: svc.model_id.clone() };
        o.one("vllm:num_requests_running", "gauge", "Requests running on the engine.", s.running as f64);
        o.one("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", s.waiting as f64);
        let usage = if s.kv_blocks_total == 0 { 0.0 } else { s.kv_blocks_used as f64 / s.kv_blocks_total as f64 };
        o.one("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage as a fraction of blocks (1 = full).", usage);
        o.one(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "KV-cache usage as a fraction of blocks (1 = full); the old name of vllm:kv_cache_usage_perc.",
            usage,
        );
        o.head(
            "vllm:lora_requests_info",
            "gauge",
            "Running and waiting LoRA adapters, comma-separated; max_lora is the most adapters one batch can hold (value: Unix time of the sample).",
        );
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let running = s.running_adapters.join(",");
        let waiting = s.waiting_adapters.join(",");
        // Every row of a batch may use a different adapter: a batch holds as many adapters as
        // it holds sequences.
        let max_lora = cfg.max_running.to_string();
        o.info(
            "vllm:lora_requests_info",
            &[("max_lora", &max_lora), ("running_lora_adapters", &running), ("waiting_lora_adapters", &waiting)],
            t,
        );
        o.head("vllm:cache_config_info", "gauge", "Information of the KV cache's configuration (value: 1).");
        let (block_size, blocks) = (cfg.block_size.to_string(), cfg.num_blocks.to_string());
        let prefix = if cfg.prefix_cache { "True" } else { "False" };
        o.info(
            "vllm:cache_config_info",
            &[("block_size", &block_size), ("num_gpu_blocks", &blocks), ("enable_prefix_caching", prefix)],
            1.0,
        );
        o.one("vllm:prompt_tokens", "counter", "Prompt tokens of admitted requests.", s.prompt_tokens_total as f64);
        o.one("vllm:generation_tokens", "counter", "Tokens generated.", s.generation_tokens_total as f64);
        o.one("vllm:num_preemptions", "counter", "Sequences preempted for lack of KV blocks.", s.preemptions as f64);
        o.one(
            "vllm:prefix_cache_hits",
            "counter",
            "Prompt tokens served from the prefix cache.",
            s.prefix_cache_hit_tokens as f64,
        );
        o.head("vllm:request_success", "counter", "Finished requests by finish reason.");
        let finished = m.finished.snapshot();
        for (reason, n) in &finished {
            o.sample("vllm:request_success_total", &[("finished_reason", reason)], *n as f64);
        }
        o.histogram("vllm:time_to_first_token_seconds", "Time to first token.", &m.ttft);
        o.histogram("vllm:e2e_request_latency_seconds", "Request latency from acceptance to the last token.", &m.e2e);
        o.histogram(
            "openlora_evidence_seconds",
            "Time the verbatim-overlap matcher took per receipt that searched adapter datasets.",
            &m.evidence_seconds,
        );

        o.head("openlora_requests_refused", "counter", "Requests refused, by reason.");
        let refused = m.refused.snapshot();
        for (kind, n) in &refused {
            o.sample("openlora_requests_refused_total", &[("reason", kind)], *n as f64);
        }
        o.one("openlora_kv_blocks_capacity", "gauge", "Blocks in the KV pool.", s.kv_blocks_total as f64);
        o.one("openlora_kv_blocks_used", "gauge", "KV blocks held by sequences.", s.kv_blocks_used as f64);
        o.one(
            "openlora_kv_blocks_cached_idle",
            "gauge",
            "Free KV blocks still holding a cached prefix.",
            s.kv_blocks_cached_idle as f64,
        );
        o.one(
            "openlora_prefill_tokens_computed",
            "counter",
            "Tokens prefilled (or recomputed) through the model.",
            s.prefill_tokens_computed as f64,
        );
        o.one("openlora_engine_steps", "counter", "Batched forward passes.", s.steps as f64);
        o.one(
            "openlora_grammar_masks",
            "counter",
            "Token masks computed for grammar-constrained rows (structured output).",
            s.grammar_masks as f64,
        );
        o.one(
            "openlora_grammar_mask_seconds",
            "counter",
            "Time spent computing those masks (mostly beside the forward pass).",
            s.grammar_mask_ns as f64 / 1e9,
        );
        let pm = svc.pager.metrics();
        o.one("openlora_adapters_registered", "gauge", "Adapters in the catalog.", svc.pager.catalog().len() as f64);
        let tiers = [("device", &pm.device), ("host", &pm.host)];
        let fams: [(&str, &str, &str); 6] = [
            ("openlora_adapters_resident", "gauge", "Adapters resident per tier."),
            ("openlora_adapter_tier_bytes", "gauge", "Bytes counted against each tier's budget."),
            ("openlora_adapter_tier_budget_bytes", "gauge", "Each tier's budget."),
            ("openlora_adapter_tier_hits", "counter", "Lookups answered by the tier."),
            ("openlora_adapter_tier_misses", "counter", "Lookups the tier could not answer."),
            ("openlora_adapter_evictions", "counter", "Adapters evicted from the tier."),
        ];
        for (i, (name, kind, help)) in fams.iter().enumerate() {
            o.head(name, kind, help);
            for (tier, t) in tiers {
                let v = [
                    t.resident as f64,
                    t.bytes as f64,
                    t.budget as f64,
                    t.hits as f64,
                    t.misses as f64,
                    t.evictions as f64,
                ][i];
                o.sample(&family(name, kind), &[("tier", tier)], v);
            }
        }
        o.one("openlora_adapters_pinned", "gauge", "Device-resident adapters in use by requests.", pm.pinned as f64);
        o.one("openlora_adapter_disk_loads", "counter", "Adapters read from disk by the pager.", pm.loads as f64);
        o.one("openlora_adapter_load_errors", "counter", "Adapter loads that failed.", pm.load_errors as f64);
        o.head("openlora_adapter_disk_load_seconds", "histogram", "Read + hash + prepare time of each pager load.");
        let (buckets, sum, count) = &pm.load_seconds;
        for (b, c) in buckets {
            o.sample("openlora_adapter_disk_load_seconds_bucket", &[("le", &format!("{b}"))], *c as f64);
        }
        o.sample("openlora_adapter_disk_load_seconds_bucket", &[("le", "+Inf")], *count as f64);
        o.sample("openlora_adapter_disk_load_seconds_sum", &[], *sum);
        o.sample("openlora_adapter_disk_load_seconds_count", &[], *count as f64);
        o.one(
            "openlora_adapter_loads",
            "counter",
            "Adapters loaded (at start and through the admin API).",
            m.adapter_loads.load(Ordering::Relaxed) as f64,
        );
        o.one(
            "openlora_adapter_unloads",
            "counter",
            "Adapters unloaded.",
            m.adapter_unloads.load(Ordering::Relaxed) as f64,
        );
        o.one(
            "openlora_adapter_merges",
            "counter",
            "Merged adapters built (once per recipe and inputs while resident).",
            pm.derived_built as f64,
        );
        o.one(
            "openlora_adapter_merge_joins",
            "counter",
            "Merge requests that waited for a build already in flight instead of building again.",
            pm.derived_joined as f64,
        );
        o.one(
            "openlora_adapter_merge_hits",
            "counter",
            "Merge requests served by a resident merged adapter.",
            pm.derived_hits as f64,
        );
        o.one("openlora_adapter_merge_errors", "counter", "Merge builds that failed.", pm.derived_errors as f64);
        o.one(
            "openlora_adapters_merged_resident",
            "gauge",
            "Merged adapters resident in the device tier (counted in its bytes).",
            pm.derived_resident.0 as f64,
        );
        o.one(
            "openlora_adapters_merged_bytes",
            "gauge",
            "Bytes of merged adapters in the device tier (part of openlora_adapter_tier_bytes).",
            pm.derived_resident.1 as f64,
        );
        o.histogram("openlora_adapter_load_seconds", "Time to read and prepare an adapter.", &m.adapter_load_seconds);
        if let Some(host) = svc.plugins.get() {
            let pm = host.metrics();
            let fams: [(&str, &str, &str); 4] = [
                ("openlora_plugin_calls", "counter", "Plugin calls."),
                ("openlora_plugin_failures", "counter", "Plugin calls that failed (trap, timeout, bad answer)."),
                ("openlora_plugin_fallbacks", "counter", "Failures answered by the fail-open fallback."),
                ("openlora_plugin_quarantined", "gauge", "1 while a plugin is quarantined after repeated failures."),
            ];
            for (name, kind, help) in fams {
                o.head(name, kind, help);
                for m in &pm {
                    let v = match name {
                        "openlora_plugin_calls" => m.calls as f64,
                        "openlora_plugin_failures" => m.failures as f64,
                        "openlora_plugin_fallbacks" => m.fallbacks as f64,
                        _ => f64::from(u8::from(m.quarantined)),
                    };
                    o.sample(&family(name, kind), &[("plugin", &m.name), ("kind", m.kind.name())], v);
                }
            }
            o.head(
                "openlora_plugin_overload_failures",
                "counter",
                "Plugin failures of an overloaded host, not counted towards quarantine (busy: no sandbox slot within the plugin's time limit; starved: a timeout with less than half of it on the CPU).",
            );
            for m in &pm {
                for (reason, v) in [("busy", m.busy), ("starved", m.starved)] {
                    let l = [("plugin", m.name.as_str()), ("kind", m.kind.name()), ("reason", reason)];
                    o.sample("openlora_plugin_overload_failures_total", &l, v as f64);
                }
            }
            o.head(
                "openlora_plugin_call_latency_seconds",
                "summary",
                "Plugin call latency (waiting for a sandbox slot, instantiate, call).",
            );
            for m in &pm {
                let l = [("plugin", m.name.as_str()), ("kind", m.kind.name())];
                for (q, v) in [("0.5", m.latency.p50_us), ("0.99", m.latency.p99_us)] {
                    let mut with_q = l.to_vec();
                    with_q.push(("quantile", q));
                    o.sample("openlora_plugin_call_latency_seconds", &with_q, v as f64 / 1e6);
                }
                o.sample("openlora_plugin_call_latency_seconds_sum", &l, m.latency.sum_us as f64 / 1e6);
                o.sample("openlora_plugin_call_latency_seconds_count", &l, m.latency.count as f64);
            }
        }
        o.text
    }
}
