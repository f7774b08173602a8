//! [`DeviceBackend`]: the backend chosen at start (`device = "auto" | "cpu" | "cuda:N"`), one
//! type for the runtime to hold whichever it is.
//!
//! Each operation dispatches on the variant; buffers, weights and caches carry their variant,
//! and mixing them (a CPU buffer given to the CUDA backend) is a shape error, never a crash.

use crate::backend::{AttnSeq, Backend, KvLayout, LoraSegment, PickedRow, RopeTable, RowPick};
use crate::cpu::{CpuBackend, CpuKvCache, CpuWeight};
use crate::cuda::{CudaBackend, CudaBuf, CudaError, CudaKvCache, CudaOptions, CudaWeight, Precision};
use crate::error::{KernelError, Result};
use crate::weight::HostWeight;

/// Which device a deployment asks for.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// A GPU if one is usable, else the CPU (said in one log line).
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA device N; failing to start it is an error.
    Cuda(usize),
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: expected \"auto\", \"cpu\" or \"cuda:N\"")),
        }
    }
}

/// The CPU or a CUDA device.
#[derive(Clone, Debug)]
pub enum DeviceBackend {
    /// The CPU reference backend.
    Cpu(CpuBackend),
    /// An NVIDIA GPU.
    Cuda(CudaBackend),
}

impl DeviceBackend {
    /// Starts the requested backend. `Auto` falls back to the CPU and returns why in the second
    /// value (for the one log line); an explicit `cuda:N` that cannot start is an error.
    /// `precision` is the dense weights' on a GPU, `kv` its KV pools' (the CPU ignores both);
    /// `cpu_int8` turns on the CPU's 8-bit-activation matmuls (a GPU ignores it).
    pub fn start(
        req: &DeviceRequest,
        precision: Precision,
        kv: Precision,
        cpu_int8: bool,
    ) -> Result<(Self, Option<String>), CudaError> {
        let cpu = || CpuBackend::new().with_int8(cpu_int8);
        let opts = |ordinal| CudaOptions { ordinal, precision, kv_precision: kv, ..Default::default() };
        match req {
            DeviceRequest::Cpu => Ok((Self::Cpu(cpu()), None)),
            DeviceRequest::Cuda(n) => {
                let b = CudaBackend::new(&opts(*n))?;
                Ok((Self::Cuda(b), None))
            }
            DeviceRequest::Auto => match CudaBackend::new(&opts(0)) {
                Ok(b) => Ok((Self::Cuda(b), None)),
                Err(e) => Ok((Self::Cpu(cpu()), Some(e.to_string()))),
            },
        }
    }

    /// Whether this is a GPU.
    pub fn is_gpu(&self) -> bool {
        matches!(self, Self::Cuda(_))
    }
}

/// A buffer of either backend.
#[derive(Debug)]
pub enum DeviceBuf {
    /// Host memory.
    Cpu(Vec<f32>),
    /// Device memory.
    Cuda(CudaBuf),
}

/// A weight of either backend.
#[derive(Debug)]
pub enum DeviceWeight {
    /// CPU.
    Cpu(CpuWeight),
    /// CUDA (boxed: a CUDA weight is several times the size of a CPU one, and an enum is the
    /// size of its largest variant; a CPU adapter's modules would pay for it).
    Cuda(Box<CudaWeight>),
}

/// A KV cache of either backend.
#[derive(Debug)]
pub enum DeviceKvCache {
    /// CPU.
    Cpu(CpuKvCache),
    /// CUDA.
    Cuda(CudaKvCache),
}

fn mixed(op: &'static str) -> KernelError {
    KernelError::Shape { op, detail: "operands belong to different backends".into() }
}

fn cpu_segs<'a>(segments: &[LoraSegment<'a, DeviceWeight>]) -> Result<Vec<LoraSegment<'a, CpuWeight>>> {
    segments
        .iter()
        .map(|s| match (s.a, s.b) {
            (DeviceWeight::Cpu(a), DeviceWeight::Cpu(b)) => {
                Ok(LoraSegment { rows: s.rows.clone(), a, b, scale: s.scale })
            }
            _ => Err(mixed("lora_sgmv")),
        })
        .collect()
}

fn cuda_segs<'a>(segments: &[LoraSegment<'a, DeviceWeight>]) -> Result<Vec<LoraSegment<'a, CudaWeight>>> {
    segments
        .iter()
        .map(|s| match (s.a, s.b) {
            (DeviceWeight::Cuda(a), DeviceWeight::Cuda(b)) => {
                Ok(LoraSegment { rows: s.rows.clone(), a: &**a, b: &**b, scale: s.scale })
            }
            _ => Err(mixed("lora_sgmv")),
        })
        .collect()
}

impl Backend for DeviceBackend {
    type Buf = DeviceBuf;
    type Weight = DeviceWeight;
    type KvCache = DeviceKvCache;

    fn name(&self) -> String {
        match self {
            Self::Cpu(b) => b.name(),
            Self::Cuda(b) => b.name(),
        }
    }

    fn execute<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self {
            Self::Cpu(b) => b.execute(f),
            Self::Cuda(b) => b.execute(f),
        }
    }

    fn prepare_weight(&self, w: HostWeight) -> Result<DeviceWeight> {
        Ok(match self {
            Self::Cpu(b) => DeviceWeight::Cpu(b.prepare_weight(w)?),
            Self::Cuda(b) => DeviceWeight::Cuda(Box::new(b.prepare_weight(w)?)),
        })
    }

    fn weight_shape(&self, w: &DeviceWeight) -> (usize, usize) {
        match (self, w) {
            (Self::Cpu(b), DeviceWeight::Cpu(w)) => b.weight_shape(w),
            (Self::Cuda(b), DeviceWeight::Cuda(w)) => b.weight_shape(w),
            _ => (0, 0),
        }
    }

    fn weight_bytes(&self, w: &DeviceWeight) -> usize {
        match (self, w) {
            (Self::Cpu(b), DeviceWeight::Cpu(w)) => b.weight_bytes(w),
            (Self::Cuda(b), DeviceWeight::Cuda(w)) => b.weight_bytes(w),
            _ => 0,
        }
    }

    fn zeros(&self, len: usize) -> Result<DeviceBuf> {
        Ok(match self {
            Self::Cpu(b) => DeviceBuf::Cpu(b.zeros(len)?),
            Self::Cuda(b) => DeviceBuf::Cuda(b.zeros(len)?),
        })
    }

    fn upload(&self, data: &[f32]) -> Result<DeviceBuf> {
        Ok(match self {
            Self::Cpu(b) => DeviceBuf::Cpu(b.upload(data)?),
            Self::Cuda(b) => DeviceBuf::Cuda(b.upload(data)?),
        })
    }

    fn download(&self, buf: &DeviceBuf) -> Result<Vec<f32>> {
        match (self, buf) {
            (Self::Cpu(b), DeviceBuf::Cpu(x)) => b.download(x),
            (Self::Cuda(b), DeviceBuf::Cuda(x)) => b.download(x),
            _ => Err(mixed("download")),
        }
    }

    fn buf_len(&self, buf: &DeviceBuf) -> usize {
        match buf {
            DeviceBuf::Cpu(x) => x.len(),
            DeviceBuf::Cuda(x) => x.len(),
        }
    }

    fn embedding(&self, table: &DeviceWeight, ids: &[u32], out: &mut DeviceBuf) -> Result<()> {
        match (self, table, out) {
            (Self::Cpu(b), DeviceWeight::Cpu(t), DeviceBuf::Cpu(o)) => b.embedding(t, ids, o),
            (Self::Cuda(b), DeviceWeight::Cuda(t), DeviceBuf::Cuda(o)) => b.embedding(t, ids, o),
            _ => Err(mixed("embedding")),
        }
    }

    fn rms_norm(&self, x: &DeviceBuf, weight: &DeviceWeight, eps: f32, out: &mut DeviceBuf) -> Result<()> {
        match (self, x, weight, out) {
            (Self::Cpu(b), DeviceBuf::Cpu(x), DeviceWeight::Cpu(w), DeviceBuf::Cpu(o)) => b.rms_norm(x, w, eps, o),
            (Self::Cuda(b), DeviceBuf::Cuda(x), DeviceWeight::Cuda(w), DeviceBuf::Cuda(o)) => b.rms_norm(x, w, eps, o),
            _ => Err(mixed("rms_norm")),
        }
    }

    fn add_rms_norm(
        &self,
        x: &mut DeviceBuf,
        delta: &DeviceBuf,
        weight: &DeviceWeight,
        eps: f32,
        out: &mut DeviceBuf,
    ) -> Result<()> {
        match (self, x, delta, weight, out) {
            (Self::Cpu(b), DeviceBuf::Cpu(x), DeviceBuf::Cpu(d), DeviceWeight::Cpu(w), DeviceBuf::Cpu(o)) => {
                b.add_rms_norm(x, d, w, eps, o)
            }
            (Self::Cuda(b), DeviceBuf::Cuda(x), DeviceBuf::Cuda(d), DeviceWeight::Cuda(w), DeviceBuf::Cuda(o)) => {
                b.add_rms_norm(x, d, w, eps, o)
            }
            _ => Err(mixed("add_rms_norm")),
        }
    }

    fn matmul(&self, x: &DeviceBuf, rows: usize, w: &DeviceWeight, out: &mut DeviceBuf) -> Result<()> {
        match (self, x, w, out) {
            (Self::Cpu(b), DeviceBuf::Cpu(x), DeviceWeight::Cpu(w), DeviceBuf::Cpu(o)) => b.matmul(x, rows, w, o),
            (Self::Cuda(b), DeviceBuf::Cuda(x), DeviceWeight::Cuda(w), DeviceBuf::Cuda(o)) => b.matmul(x, rows, w, o),
            _ => Err(mixed("matmul")),
        }
    }

    fn add_bias(&self, x: &mut DeviceBuf, bias: &DeviceWeight) -> Result<()> {
        match (self, x, bias) {
            (Self::Cpu(b), DeviceBuf::Cpu(x), DeviceWeight::Cpu(w)) => b.add_bias(x, w),
            (Self::Cuda(b), DeviceBuf::Cuda(x), DeviceWeight::Cuda(w)) => b.add_bias(x, w),
            _ => Err(mixed("add_bias")),
        }
    }

    fn add_assign(&self, acc: &mut DeviceBuf, x: &DeviceBuf) -> Result<()> {
        match (self, acc, x) {
            (Self::Cpu(b), DeviceBuf::Cpu(a), DeviceBuf::Cpu(x)) => b.add_assign(a, x),
            (Self::Cuda(b), DeviceBuf::Cuda(a), DeviceBuf::Cuda(x)) => b.add_assign(a, x),
            _ => Err(mixed("add_assign")),
        }
    }

    fn rope(&self, x: &mut DeviceBuf, positions: &[u32], heads: usize, table: &RopeTable) -> Result<()> {
        match (self, x) {
            (Self::Cpu(b), DeviceBuf::Cpu(x)) => b.rope(x, positions, heads, table),
            (Self::Cuda(b), DeviceBuf::Cuda(x)) => b.rope(x, positions, heads, table),
            _ => Err(mixed("rope")),
        }
    }

    fn silu_mul(&self, gate: &DeviceBuf, up: &DeviceBuf, out: &mut DeviceBuf) -> Result<()> {
        match (self, gate, up, out) {
            (Self::Cpu(b), DeviceBuf::Cpu(g), DeviceBuf::Cpu(u), DeviceBuf::Cpu(o)) => b.silu_mul(g, u, o),
            (Self::Cuda(b), DeviceBuf::Cuda(g), DeviceBuf::Cuda(u), DeviceBuf::Cuda(o)) => b.silu_mul(g, u, o),
            _ => Err(mixed("silu_mul")),
        }
    }

    fn gather_rows(&self, x: &DeviceBuf, width: usize, rows: &[u32], out: &mut DeviceBuf) -> Result<()> {
        match (self, x, out) {
            (Self::Cpu(b), DeviceBuf::Cpu(x), DeviceBuf::Cpu(o)) => b.gather_rows(x, width, rows, o),
            (Self::Cuda(b), DeviceBuf::Cuda(x), DeviceBuf::Cuda(o)) => b.gather_rows(x, width, rows, o),
            _ => Err(mixed("gather_rows")),
        }
    }

    fn lora_sgmv(
        &self,
        x: &DeviceBuf,
        in_dim: usize,
        out: &mut DeviceBuf,
        out_dim: usize,
        segments: &[LoraSegment<'_, DeviceWeight>],
    ) -> Result<()> {
        match (self, x, out) {
            (Self::Cpu(b), DeviceBuf::Cpu(x), DeviceBuf::Cpu(o)) => {
                b.lora_sgmv(x, in_dim, o, out_dim, &cpu_segs(segments)?)
            }
            (Self::Cuda(b), DeviceBuf::Cuda(x), DeviceBuf::Cuda(o)) => {
                b.lora_sgmv(x, in_dim, o, out_dim, &cuda_segs(segments)?)
            }
            _ => Err(mixed("lora_sgmv")),
        }
    }

    fn alloc_kv_cache(&self, layout: KvLayout) -> Result<DeviceKvCache> {
        Ok(match self {
            Self::Cpu(b) => DeviceKvCache::Cpu(b.alloc_kv_cache(layout)?),
            Self::Cuda(b) => DeviceKvCache::Cuda(b.alloc_kv_cache(layout)?),
        })
    }

    fn write_kv(&self, cache: &mut DeviceKvCache, k: &DeviceBuf, v: &DeviceBuf, slots: &[u32]) -> Result<()> {
        match (self, cache, k, v) {
            (Self::Cpu(b), DeviceKvCache::Cpu(c), DeviceBuf::Cpu(k), DeviceBuf::Cpu(v)) => b.write_kv(c, k, v, slots),
            (Self::Cuda(b), DeviceKvCache::Cuda(c), DeviceBuf::Cuda(k), DeviceBuf::Cuda(v)) => {
                b.write_kv(c, k, v, slots)
            }
            _ => Err(mixed("write_kv")),
        }
    }

    fn paged_attention(
        &self,
        q: &DeviceBuf,
        cache: &DeviceKvCache,
        seqs: &[AttnSeq<'_>],
        heads: usize,
        out: &mut DeviceBuf,
    ) -> Result<()> {
        match (self, q, cache, out) {
            (Self::Cpu(b), DeviceBuf::Cpu(q), DeviceKvCache::Cpu(c), DeviceBuf::Cpu(o)) => {
                b.paged_attention(q, c, seqs, heads, o)
            }
            (Self::Cuda(b), DeviceBuf::Cuda(q), DeviceKvCache::Cuda(c), DeviceBuf::Cuda(o)) => {
                b.paged_attention(q, c, seqs, heads, o)
            }
            _ => Err(mixed("paged_attention")),
        }
    }

    fn weights_in_host_memory(&self) -> bool {
        match self {
            Self::Cpu(b) => b.weights_in_host_memory(),
            Self::Cuda(b) => b.weights_in_host_memory(),
        }
    }

    fn picks_on_device(&self) -> bool {
        match self {
            Self::Cpu(b) => b.picks_on_device(),
            Self::Cuda(b) => b.picks_on_device(),
        }
    }

    fn pick_rows(&self, logits: &DeviceBuf, width: usize, picks: &[RowPick]) -> Result<Vec<PickedRow>> {
        match (self, logits) {
            (Self::Cpu(b), DeviceBuf::Cpu(l)) => b.pick_rows(l, width, picks),
            (Self::Cuda(b), DeviceBuf::Cuda(l)) => b.pick_rows(l, width, picks),
            _ => Err(mixed("pick_rows")),
        }
    }

    fn kv_value_bytes(&self) -> usize {
        match self {
            Self::Cpu(b) => b.kv_value_bytes(),
            Self::Cuda(b) => b.kv_value_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_requests_parse_and_print() {
        for (s, want) in
            [("auto", DeviceRequest::Auto), ("cpu", DeviceRequest::Cpu), ("cuda:3", DeviceRequest::Cuda(3))]
        {
            let got: DeviceRequest = s.parse().expect(s);
            assert_eq!(got, want);
            assert_eq!(got.to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(0)));
        for bad in ["gpu", "cuda:", "cuda:-1", "CUDA:0", ""] {
            let e = bad.parse::<DeviceRequest>().expect_err(bad);
            assert!(e.contains("cuda:N"), "{e}");
        }
    }

    #[test]
    fn auto_without_a_driver_falls_back_to_the_cpu_and_says_why() {
        let (b, why) = DeviceBackend::start(&DeviceRequest::Auto, Precision::Bf16, Precision::F32, false)
            .expect("auto never fails");
        if crate::cuda::probe(0).is_err() {
            assert!(!b.is_gpu());
            assert!(why.expect("a reason").contains("CUDA"));
            assert!(DeviceBackend::start(&DeviceRequest::Cuda(0), Precision::Bf16, Precision::F32, false).is_err());
        } else {
            assert!(b.is_gpu() && why.is_none());
        }
    }

    #[test]
    fn the_cpu_variant_runs_the_cpu_kernels() {
        let b = DeviceBackend::Cpu(CpuBackend::new());
        let w = HostWeight::from_f32(2, 2, &[1.0, 0.0, 0.0, 1.0]).expect("w");
        let w = b.prepare_weight(w).expect("prepare");
        let x = b.upload(&[1.0, 2.0]).expect("x");
        let mut out = b.zeros(2).expect("out");
        b.matmul(&x, 1, &w, &mut out).expect("matmul");
        assert_eq!(b.download(&out).expect("download"), vec![1.0, 2.0]);
        assert!(!b.picks_on_device(), "host logits need no reduction on a device");
        let picks = [RowPick::Argmax];
        assert_eq!(b.pick_rows(&out, 2, &picks).expect("argmax"), vec![PickedRow::Argmax(1)]);
        let picks = [RowPick::TopK(1)];
        assert_eq!(b.pick_rows(&out, 2, &picks).expect("topk"), vec![PickedRow::TopK(vec![(1, 2.0)])]);
        let picks = [RowPick::Full];
        assert_eq!(b.pick_rows(&out, 2, &picks).expect("full"), vec![PickedRow::Full(vec![1.0, 2.0])]);
        let nan = b.upload(&[1.0, f32::NAN]).expect("nan");
        for pick in [RowPick::Argmax, RowPick::TopK(2)] {
            assert_eq!(b.pick_rows(&nan, 2, &[pick]).expect("nan"), vec![PickedRow::NonFinite], "{pick:?}");
        }
        assert_eq!(b.kv_value_bytes(), 4);
    }
}
