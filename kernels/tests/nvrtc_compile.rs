//! Every CUDA kernel compiles with NVRTC for sm_80 and sm_90, with no GPU and no driver.
//!
//! NVRTC comes from the `nvidia-cuda-nvrtc-cu12` wheel that `.ci/run` installs under
//! `$OPENLORA_CACHE/cuda-nvrtc` (or any libnvrtc named by `$OPENLORA_NVRTC` or on the loader's
//! path). Without one the test fails and says how to get it, unless
//! `OPENLORA_SKIP_NVRTC=1` is set (for machines that cannot install it).

use openlora_kernels::cuda::nvrtc;

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_and_reports_registers() {
    if std::env::var_os("OPENLORA_SKIP_NVRTC").is_some() {
        eprintln!("OPENLORA_SKIP_NVRTC is set: not compiling the CUDA kernels");
        return;
    }
    let from = nvrtc::ensure_nvrtc().unwrap_or_else(|e| {
        panic!(
            "{e}\nInstall it with: python3 -m pip install --target ~/.cache/openlora/cuda-nvrtc \
             nvidia-cuda-nvrtc-cu12==12.9.86 (as .ci/run does)"
        )
    });
    let (major, minor) = nvrtc::nvrtc_version().expect("nvrtc version");
    println!("NVRTC {major}.{minor} from {from}");
    println!(
        "{:<10} {:<6} {:<28} {:>5} {:>7} {:>7} {:>6}",
        "module", "arch", "kernel", "regs", "spill-s", "spill-l", "smem"
    );
    for arch in ["sm_80", "sm_90"] {
        for (name, src) in nvrtc::MODULES {
            let m = nvrtc::compile(name, src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(m.cubin.len() > 100, "{name} for {arch}: empty cubin");
            // An ELF file.
            assert_eq!(&m.cubin[..4], b"\x7fELF", "{name} for {arch} is not a cubin");
            let res = m.resources();
            assert!(!res.is_empty(), "{name} for {arch}: no ptxas report in the log:\n{}", m.log);
            for r in &res {
                println!(
                    "{:<10} {:<6} {:<28} {:>5} {:>7} {:>7} {:>6}",
                    name, arch, r.kernel, r.registers, r.spill_stores, r.spill_loads, r.shared_bytes
                );
                assert!(r.registers > 0, "{name}/{}: no register count parsed", r.kernel);
                assert!(r.registers <= 255, "{name}/{}: {} registers", r.kernel, r.registers);
                assert!(
                    r.spill_stores == 0 && r.spill_loads == 0,
                    "{name}/{} for {arch} spills registers ({} B stores, {} B loads)",
                    r.kernel,
                    r.spill_stores,
                    r.spill_loads
                );
            }
            if m.log.contains("warning") {
                panic!("{name} for {arch} compiled with warnings:\n{}", m.log);
            }
        }
    }
}

#[test]
fn a_broken_kernel_is_an_error_naming_the_module_and_line() {
    if std::env::var_os("OPENLORA_SKIP_NVRTC").is_some() || nvrtc::ensure_nvrtc().is_err() {
        return;
    }
    let e = nvrtc::compile("broken", "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", "sm_80")
        .expect_err("must not compile");
    let msg = e.to_string();
    assert!(msg.contains("broken") && msg.contains("undefined_name"), "{msg}");
}

#[test]
fn the_ptxas_report_parser_reads_registers_spills_and_shared_memory() {
    let log = "ptxas info    : Compiling entry function 'gemv' for 'sm_90'\n\
               ptxas info    : Function properties for gemv\n\
                   16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 40 registers, used 0 barriers, 4352 bytes smem, 400 bytes cmem[0]\n";
    let r = nvrtc::parse_ptxas_report(log);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].kernel.as_str(), r[0].registers, r[0].spill_stores, r[0].spill_loads, r[0].shared_bytes),
        ("gemv", 40, 8, 12, 4352)
    );
}
