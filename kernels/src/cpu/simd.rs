//! Runtime selection of the widest SIMD level the CPU has.
//!
//! The binary is built for baseline x86-64 so it runs anywhere; hot kernels are compiled several
//! times with `#[target_feature]` and picked once at start-up by feature detection (never
//! `target-cpu=native`).

use std::sync::OnceLock;

/// Instruction-set levels the CPU kernels are specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable code (whatever the baseline target allows).
    Generic,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + the AVX2 set.
    Avx512,
}

impl SimdLevel {
    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Generic => "generic",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

/// The level detected on this CPU (cached). `OPENLORA_SIMD=generic|avx2|avx512` caps it, which
/// tests use to exercise every path on one machine.
pub fn detected() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let hw = hardware();
        match std::env::var("OPENLORA_SIMD").as_deref() {
            Ok("generic") => SimdLevel::Generic,
            Ok("avx2") => hw.min(SimdLevel::Avx2),
            _ => hw,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn hardware() -> SimdLevel {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        SimdLevel::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Generic
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn hardware() -> SimdLevel {
    SimdLevel::Generic
}

/// Defines `$name(level, args...)` that runs the `#[inline(always)]` body `$generic` compiled for
/// the given SIMD level. The body is plain Rust written so LLVM vectorises it (fixed-width lane
/// arrays, no cross-lane reductions in the inner loop).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $generic:path) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::cpu::simd::SimdLevel, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { $generic($($arg),*) }
                #[target_feature(enable = "avx2,fma,f16c")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { $generic($($arg),*) }
                match level {
                    // SAFETY: `level` comes from `simd::detected()`, which only reports levels
                    // whose features the running CPU has.
                    $crate::cpu::simd::SimdLevel::Avx512 => unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::simd::SimdLevel::Avx2 => unsafe { avx2($($arg),*) },
                    $crate::cpu::simd::SimdLevel::Generic => $generic($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = level;
                $generic($($arg),*)
            }
        }
    };
}
pub(crate) use multiversion;
