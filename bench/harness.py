"""Shared pieces of the benchmark scripts (standard library only).

- where things live: `cache_dir()` (`$OPENLORA_CACHE`, else `$XDG_CACHE_HOME/openlora`, else
  `~/.cache/openlora`), the default model, the two venvs;
- the machine, the commit, and a monitor of the CPU time other processes take during a run;
- the peers' environments, made when absent: `llamacpp-bin` (llama.cpp's C++ `llama-server` and
  `llama-bench`, built with CMake from the llama.cpp tree vendored in the llama-cpp-python sdist,
  -DGGML_NATIVE=ON, ~15 min on 2 cores), `venv-llamacpp` (llama-cpp-python[server], compiled
  with -DGGML_NATIVE=ON, ~10 min; the weaker peer, only on request), `venv-ref` (torch, transformers, peft, gguf, numpy,
  safetensors, tokenizers), `smollm2-hf` (the default model dequantized to an f32 HF folder);
- synthetic adapters: `synth8` (bench/make_synth_adapters.py, PEFT, all seven projections), their
  GGUF LoRA conversions for llama.cpp, and folders made by `openlora adapters synth`;
- `OpenloraServer`: writes a deployment TOML (plugins + receipts on, or bare), starts
  `openlora serve` on 127.0.0.1, reads /metrics and the peak RSS, stops it;
- `LlamaServer`: the same for llama.cpp's `llama-server` (32 slots, GGUF LoRAs loaded at start and
  picked per request with the `lora` field, prompt cache off);
- `run_measured`: a subprocess with a time limit and its own peak RSS (wait4).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_NAME = "SmolLM2-135M-Instruct"
# Pinned to what the committed figures were measured with.
LLAMACPP_PIP_SPEC = "llama-cpp-python[server]==0.3.36"
REF_PIP_SPECS = ["torch==2.15.0", "transformers==5.24.0", "peft==0.21.2", "gguf==0.19.0", "numpy==2.4.6",
                 "safetensors==0.8.0", "tokenizers==0.23.3"]
ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# llama.cpp's C++ tools are built from the tree vendored in this sdist (its `vendor/llama.cpp`), so
# that they are the same llama.cpp as llama-cpp-python's; cmake and scikit-build-core (needed to
# read the sdist's metadata) come from PyPI into <cache>/venv-llamacpp-build.
LLAMACPP_SRC_SPEC = "llama-cpp-python==0.3.36"
LLAMACPP_BUILD_PIP_SPECS = ["cmake==4.4.5", "scikit-build-core==1.1.2"]
# The web UI is left out (with LLAMA_USE_PREBUILT_UI on, the build would try to download it) and
# so are HTTPS, the tests and the examples; the CPU backend is compiled for this CPU.
LLAMACPP_CMAKE_ARGS = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_BUILD_TYPE=Release",
                       "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
                       "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
LLAMACPP_TOOLS = ("llama-server", "llama-bench")
# x86 instruction sets ggml can be told to use, by /proc/cpuinfo flag: used instead of
# -DGGML_NATIVE=ON on a CPU with AMX, because ggml's AMX matmul (which a native build turns on)
# crashed llama-bench and llama-server with SIGSEGV at the first Q4_1 matmul on this project's
# Sapphire Rapids VMs (build 0c1e570, 2026-12-04); every other extension is kept.
LLAMACPP_ISA_FLAGS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "bmi2": "GGML_BMI2", "fma": "GGML_FMA",
                      "f16c": "GGML_F16C", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
                      "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
                      "avx512_bf16": "GGML_AVX512_BF16"}


def cpuinfo_field(key: str) -> str | None:
    """The value of the first `key` line of /proc/cpuinfo, or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    return set((cpuinfo_field("flags") or "").split())


def llamacpp_cmake_args() -> list[str]:
    """LLAMACPP_CMAKE_ARGS, with the native build replaced by explicit extensions minus AMX on
    a CPU that has AMX (see LLAMACPP_ISA_FLAGS)."""
    flags = cpu_flags()
    if not any(f.startswith("amx") for f in flags):
        return list(LLAMACPP_CMAKE_ARGS)
    isa = [f"-D{opt}={'ON' if f in flags else 'OFF'}" for f, opt in LLAMACPP_ISA_FLAGS.items()]
    amx = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return ["-DGGML_NATIVE=OFF", *isa, *amx, *LLAMACPP_CMAKE_ARGS[1:]]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    if os.environ.get("OPENLORA_CACHE"):
        return Path(os.environ["OPENLORA_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "openlora"
    return Path.home() / ".cache" / "openlora"


def default_model() -> Path:
    return cache_dir() / "models" / MODEL_FILE


def sigterm_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt, so `finally` blocks stop the servers on either signal."""

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


# ---------------------------------------------------------------- machine, commit, load


def machine_info() -> dict:
    model = cpuinfo_field("model name") or "unknown"
    mem_gib = None
    try:
        for ln in open("/proc/meminfo"):
            if ln.startswith("MemTotal:"):
                mem_gib = round(int(ln.split()[1]) / (1 << 20), 1)
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": model, "mem_total_gib": mem_gib,
            "kernel": platform.release(), "python": platform.python_version()}


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if r.returncode != 0:
            return "none (no commits)"
        s = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
        return r.stdout.strip() + ("+dirty" if s.stdout.strip() else "")
    except OSError:
        return "unknown (no git)"


def _proc_stat():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    v += [0] * (8 - len(v))
    return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "steal": v[7]}  # user nice system irq softirq; steal


def _own_cpu(extra_pids=()) -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t = s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    return t + sum(proc_cpu_seconds(p) or 0.0 for p in extra_pids)


def proc_cpu_seconds(pid: int) -> float | None:
    """user+system CPU time of a live process (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuMonitor:
    """CPU time that other processes (and the hypervisor, as steal) took while a benchmark ran:
    /proc/stat's busy time minus this process, its finished children and the live servers
    (`pids`), so that a run disturbed by a compile nearby is flagged."""

    def __init__(self, pids=()):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.pids = list(pids)
        self.t0, self.stat0, self.own0 = time.time(), _proc_stat(), _own_cpu(self.pids)

    def report(self) -> dict:
        s1 = _proc_stat()
        if self.stat0 is None or s1 is None:
            return {"error": "/proc/stat unreadable"}
        ncpu = machine_info()["nproc"] or 1
        wall = time.time() - self.t0
        busy = (s1["busy"] - self.stat0["busy"]) / self.hz
        steal = (s1["steal"] - self.stat0["steal"]) / self.hz
        others = max(0.0, busy - (_own_cpu(self.pids) - self.own0))
        share = others / (wall * ncpu) if wall > 0 else 0.0
        return {"wall_s": round(wall, 2), "other_processes_cpu_s": round(others, 2),
                "other_processes_share": round(share, 3), "steal_cpu_s": round(steal, 2),
                "disturbed": share > 0.05 or steal > 0.05 * wall * ncpu}


def wait_quiet(max_wait: float, quiet_s: float = 6.0, share: float = 0.10, window: float = 3.0) -> dict:
    """Wait until the machine has been idle (< share busy) for quiet_s seconds in a row (in windows
    of 3 s), at most max_wait seconds. Returns what was seen."""
    ncpu, hz = len(os.sched_getaffinity(0)), os.sysconf("SC_CLK_TCK")
    t_start, calm = time.time(), 0
    while True:
        b0 = _proc_stat()["busy"]
        time.sleep(window)
        b1 = _proc_stat()["busy"]
        busy = (b1 - b0) / hz / (window * ncpu)
        calm = calm + 1 if busy < share else 0
        waited = time.time() - t_start
        if calm * window >= quiet_s:
            return {"quiet": True, "waited_s": round(waited, 1)}
        if waited >= max_wait:
            return {"quiet": False, "waited_s": round(waited, 1), "last_busy_share": round(busy, 3)}


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_mib(pid: int, key: str) -> float | None:
    """A memory line of /proc/PID/status (VmHWM, VmRSS, RssAnon, ...) of a live process, in MiB."""
    try:
        for ln in open(f"/proc/{pid}/status"):
            if ln.startswith(key + ":"):
                return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (the peak resident set) of a live process, in MiB."""
    v = proc_status_mib(pid, "VmHWM")
    return None if v is None else round(v, 1)


def run_measured(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run cmd to completion (killed after `timeout` s); returns rc, stdout, stderr, wall_s and the
    child's own peak RSS (ru_maxrss from wait4, in MiB)."""
    t0 = time.time()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        rusage, rc = None, None
        try:
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid == p.pid:
                    rc, rusage = os.waitstatus_to_exitcode(status), ru
                    p.returncode = rc
                    break
                if time.time() - t0 > timeout:
                    os.killpg(p.pid, signal.SIGKILL)
                    _, status, rusage = os.wait4(p.pid, 0)
                    rc = 124
                    p.returncode = rc
                    break
                time.sleep(0.05)
        except BaseException:
            if p.returncode is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                    os.wait4(p.pid, 0)
                except OSError:
                    pass
                p.returncode = -9
            raise
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "stdout": out.read().decode("utf-8", "replace"),
                "stderr": err.read().decode("utf-8", "replace"), "wall_s": round(time.time() - t0, 2),
                "peak_rss_mib": round(rusage.ru_maxrss / 1024, 1) if rusage else None,
                "timed_out": rc == 124, "command": shlex.join(cmd)}


def last_json_line(text: str) -> dict:
    for ln in reversed(text.strip().splitlines()):
        ln = ln.strip()
        if ln.startswith("{"):
            return json.loads(ln)
    raise ValueError("no JSON line in output")


# ---------------------------------------------------------------- environments


def ensure_venv_llamacpp() -> Path:
    venv = cache_dir() / "venv-llamacpp"
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp, llama_cpp.server, numpy"],
                                      capture_output=True).returncode == 0:
        return py
    log(f"creating {venv} and installing {LLAMACPP_PIP_SPEC} numpy (CMAKE_ARGS=-DGGML_NATIVE=ON): "
        "compiles llama.cpp, takes ~10 minutes")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON")
    subprocess.run([str(venv / "bin" / "pip"), "install", LLAMACPP_PIP_SPEC, "numpy"], check=True, env=env)
    return py


def scrape_metrics(port: int) -> dict[str, float]:
    """A local server's Prometheus text /metrics as {series (with labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for ln in text.splitlines():
        if ln and not ln.startswith("#"):
            k, _, v = ln.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def llamacpp_bin_dir() -> Path:
    return cache_dir() / "llamacpp-bin"


def ensure_llamacpp_bin(jobs: int = 2) -> dict[str, Path]:
    r"""<cache>/llamacpp-bin/{llama-server,llama-bench}: llama.cpp's own C++ server and benchmark,
    built when absent (~15 min on 2 cores, under `nice -n 19`):

        python3 -m venv <cache>/venv-llamacpp-build
        <cache>/venv-llamacpp-build/bin/pip install cmake==4.4.5 scikit-build-core==1.1.2
        <cache>/venv-llamacpp-build/bin/python -m pip download --no-deps --no-binary :all: \
            --no-build-isolation llama-cpp-python==0.3.36 -d <cache>/llamacpp-src
        tar xzf llama_cpp_python-0.3.36.tar.gz; cd llama_cpp_python-0.3.36/vendor/llama.cpp
        nice -n 19 cmake -S . -B build LLAMACPP_CMAKE_ARGS...   # the list above
        nice -n 19 cmake --build build --target llama-server llama-bench -j2
        cp build/bin/llama-server build/bin/llama-bench <cache>/llamacpp-bin/

    <cache>/llamacpp-bin/BUILD.json records the source, the commands and `llama-server --version`."""
    out = llamacpp_bin_dir()
    tools = {t: out / t for t in LLAMACPP_TOOLS}
    cmake_args = llamacpp_cmake_args()
    built_with = llamacpp_build_info().get("cmake_args")
    if all(p.exists() for p in tools.values()) and built_with in (None, cmake_args) and subprocess.run(
            [str(tools["llama-server"]), "--version"], capture_output=True, timeout=60).returncode == 0:
        return tools
    log(f"building llama.cpp's {' and '.join(LLAMACPP_TOOLS)} into {out} from the llama.cpp vendored in the "
        f"{LLAMACPP_SRC_SPEC} sdist (CMake, {cmake_args[0]}): takes ~15 minutes on 2 cores")
    venv = cache_dir() / "venv-llamacpp-build"
    py, cmake = venv / "bin" / "python", venv / "bin" / "cmake"
    steps = []

    def run(cmd, **kw):
        steps.append(shlex.join(str(c) for c in cmd))
        log("  " + steps[-1])
        subprocess.run([str(c) for c in cmd], check=True, **kw)

    def done(cmd):  # a step whose result is already in the cache
        steps.append("# already there: " + shlex.join(str(c) for c in cmd))

    mk = [[sys.executable, "-m", "venv", venv], [venv / "bin" / "pip", "install", "-q", *LLAMACPP_BUILD_PIP_SPECS]]
    for cmd in mk:
        (done if py.exists() and cmake.exists() else run)(cmd)
    src_dir = cache_dir() / "llamacpp-src"
    name, version = LLAMACPP_SRC_SPEC.split("==")
    sdist = src_dir / f"{name.replace('-', '_')}-{version}.tar.gz"
    dl = [py, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
          LLAMACPP_SRC_SPEC, "-d", src_dir]
    if sdist.exists():
        done(dl)
    else:
        src_dir.mkdir(parents=True, exist_ok=True)
        run(dl)
        if not sdist.exists():
            raise RuntimeError(f"pip download did not write {sdist}")
    top = src_dir / sdist.name[:-len(".tar.gz")]
    tree = top / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        done(["tar", "xzf", sdist, "-C", src_dir])
    else:
        import tarfile

        steps.append(shlex.join(["tar", "xzf", str(sdist), "-C", str(src_dir)]) + "  # tarfile, filter='data'")
        log("  " + steps[-1])
        with tarfile.open(sdist) as tf:
            tf.extractall(src_dir, filter="data")
        if not (tree / "CMakeLists.txt").exists():
            raise RuntimeError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
    build = tree / "build"
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    run(["nice", "-n", "19", cmake, "-S", tree, "-B", build, *cmake_args], env=env,
        stdout=subprocess.DEVNULL)
    run(["nice", "-n", "19", cmake, "--build", build, "--target", *LLAMACPP_TOOLS, f"-j{jobs}"], env=env,
        stdout=subprocess.DEVNULL)
    out.mkdir(parents=True, exist_ok=True)
    for t, dst in tools.items():
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes((build / "bin" / t).read_bytes())
        tmp.chmod(0o755)
        tmp.replace(dst)
    ver = subprocess.run([str(tools["llama-server"]), "--version"], capture_output=True, text=True, timeout=60)
    (out / "BUILD.json").write_text(json.dumps({
        "source": f"{sdist.name}: vendor/llama.cpp", "cmake_args": cmake_args, "steps": steps,
        "version": (ver.stdout + ver.stderr).strip(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1) + "\n")
    return tools


def llamacpp_build_info() -> dict:
    """<cache>/llamacpp-bin/BUILD.json, or `llama-server --version` when it is missing."""
    p = llamacpp_bin_dir() / "BUILD.json"
    if p.exists():
        return json.loads(p.read_text())
    exe = llamacpp_bin_dir() / "llama-server"
    if not exe.exists():
        return {}
    ver = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    return {"version": (ver.stdout + ver.stderr).strip()}


def ensure_venv_ref() -> Path:
    venv = cache_dir() / "venv-ref"
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import torch, transformers, peft, gguf, numpy, safetensors"],
                                      capture_output=True).returncode == 0:
        return py
    log(f"creating {venv} and installing {' '.join(REF_PIP_SPECS)} (several GB)")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", *REF_PIP_SPECS], check=True)
    return py


HF_FOLDER_SNIPPET = r"""
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = sys.argv[1], sys.argv[2]
d, f = os.path.split(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.hf_quantizer = None
model.is_quantized = False
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
print(out)
"""


def ensure_hf_model(ref_py: Path, model: Path) -> Path:
    """<cache>/smollm2-hf: the GGUF dequantized to an f32 HF folder (tests/fixtures/make_fixtures.py
    makes the same folder with more checks; this is the minimal version)."""
    out = cache_dir() / "smollm2-hf"
    if (out / "config.json").exists():
        return out
    log(f"writing {out} (the default model dequantized to f32, via transformers' GGUF loader)")
    subprocess.run([str(ref_py), "-c", HF_FOLDER_SNIPPET, str(model), str(out)], check=True)
    return out


def ensure_model(binary: Path) -> Path:
    path = default_model()
    if path.exists():
        return path
    log(f"{path} missing: running `{binary} fetch`")
    subprocess.run([str(binary), "fetch"], check=True, stdout=subprocess.DEVNULL)
    if not path.exists():
        sys.exit(f"`{binary} fetch` did not produce {path}")
    return path


# ---------------------------------------------------------------- adapters


def ensure_synth8(ref_py: Path, out: Path, n: int = 8, rank: int = 8, seed: int = 0) -> list[str]:
    """N PEFT adapters synth00... made by bench/make_synth_adapters.py (all seven projections);
    reused when their .params.json matches."""
    names = [f"synth{i:02d}" for i in range(n)]
    params = {"n": n, "rank": rank, "alpha": 2 * rank, "seed": seed, "b_std": 0.01}
    stamp = out / ".params.json"
    have = all((out / x / "adapter_model.safetensors").exists() for x in names)
    if have and stamp.exists() and json.loads(stamp.read_text()) == params:
        return names
    cmd = [str(ref_py), str(HERE / "make_synth_adapters.py"), "--out", str(out), "--n", str(n), "--rank", str(rank),
           "--alpha", str(2 * rank), "--seed", str(seed)]
    log("making adapters: " + shlex.join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(json.dumps(params))
    return names


def ensure_gguf_loras(ref_py: Path, peft_dir: Path, names: list[str], gguf_dir: Path, model: Path) -> list[Path]:
    """GGUF LoRA conversions (bench/peft_to_gguf_lora.py) for llama.cpp, redone when older than the PEFT file."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        src, dst = peft_dir / n / "adapter_model.safetensors", gguf_dir / f"{n}.gguf"
        if not (dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime):
            cmd = [str(ref_py), str(HERE / "peft_to_gguf_lora.py"), str(peft_dir / n), "--out", str(dst),
                   "--model", str(model)]
            log("converting: " + shlex.join(cmd))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out.append(dst)
    return out


def ensure_openlora_synth(binary: Path, out: Path, count: int, prefix: str, rank: int = 8,
                          targets: str = "q_proj,v_proj", seed: int = 0) -> list[str]:
    """`openlora adapters synth` into `out` (names PREFIX000...), reused when .params.json matches."""
    params = {"count": count, "rank": rank, "targets": targets, "seed": seed, "prefix": prefix}
    stamp = out / ".params.json"
    width = len(str(count - 1))
    names = [f"{prefix}{i:0{width}d}" for i in range(count)]
    if stamp.exists() and json.loads(stamp.read_text()) == params and \
            all((out / x / "adapter_model.safetensors").exists() for x in names):
        return names
    cmd = [str(binary), "adapters", "synth", "--count", str(count), "--rank", str(rank), "--targets", targets,
           "--seed", str(seed), "--prefix", prefix, "--out", str(out)]
    log("making adapters: " + shlex.join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(json.dumps(params))
    return names


# ---------------------------------------------------------------- openlora's server

PLUGINS = [("prompt-guard", "preprocessor"), ("keyword-router", "router"), ("recipe-merger", "merger"),
           ("revenue-split", "attributor")]


def plugins_dir() -> Path:
    return REPO / "target" / "plugins" / "examples"


def deployment_toml(port: int, threads: int, adapter_dirs: list[Path], bare: bool, state_dir: Path,
                    kv_cache_mib: int = 512, prefix_cache: bool = True, device_mib: int | None = None,
                    cpu_activations: str = "f32") -> str:
    """The deployment: the default model, the adapter folders, no API keys; with `bare` no plugins
    and no receipts, else the four example plugins (default configs) and signed receipts;
    `cpu_activations` is `engine.cpu_activations` ("f32" or "int8")."""
    dirs = ", ".join(json.dumps(str(d)) for d in adapter_dirs)
    toml = [
        "[model]", 'path = "default"', f'name = "{BASE_MODEL_NAME}"', f"threads = {threads}",
        "[model.manifest]", 'owner = "base-owner"', "price_per_1k_tokens = 1000",
        "[server]", f'listen = "127.0.0.1:{port}"',
        "[engine]", f"kv_cache_mib = {kv_cache_mib}", f"prefix_cache = {'true' if prefix_cache else 'false'}",
        f"cpu_activations = {json.dumps(cpu_activations)}",
        "[adapters]", f"dirs = [{dirs}]",
        *([f"device_mib = {device_mib}"] if device_mib is not None else []),
        "[attribution]", f"enabled = {'false' if bare else 'true'}", f"state_dir = {json.dumps(str(state_dir))}",
    ]
    if not bare:
        for name, kind in PLUGINS:
            toml += ["[[plugins]]", f'name = "{name}"', f'kind = "{kind}"',
                     f"path = {json.dumps(str(plugins_dir() / (name + '.wasm')))}"]
    return "\n".join(toml) + "\n"


class LocalServer:
    """What the two local servers share: `with` around `start` / `stop`, their /metrics, and the
    peak RSS of the server process. A subclass sets `port`, starts `proc` (logging to `logf`) in
    `start`, and may change `stop_grace_s` (how long SIGTERM gets before SIGKILL) and `_kill`."""

    stop_grace_s = 60
    port: int
    proc: subprocess.Popen | None = None

    def start(self):
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def metrics(self) -> dict[str, float]:
        """/metrics as {series (with labels): value}."""
        return scrape_metrics(self.port)

    def peak_rss_mib(self) -> float | None:
        return peak_rss_mib(self.proc.pid) if self.proc else None

    def _kill(self):
        self.proc.kill()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                self._kill()
                self.proc.wait()
        if getattr(self, "logf", None):
            self.logf.close()
            self.logf = None


class OpenloraServer(LocalServer):
    """`with OpenloraServer(...) as srv:` starts `openlora serve` on 127.0.0.1 and waits for it."""

    def __init__(self, binary: Path, adapter_dirs: list[Path], bare: bool, threads: int = 2,
                 port: int | None = None, kv_cache_mib: int = 512, ready_timeout: float = 300,
                 device_mib: int | None = None, cpu_activations: str = "f32"):
        self.binary, self.bare = Path(binary), bare
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.tmp = tempfile.TemporaryDirectory(prefix="openlora-bench-")
        self.dir = Path(self.tmp.name)
        self.log = self.dir / "server.log"
        self.config = self.dir / "deploy.toml"
        self.config.write_text(deployment_toml(self.port, threads, adapter_dirs, bare, self.dir / "state",
                                               kv_cache_mib, device_mib=device_mib,
                                               cpu_activations=cpu_activations))
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.label = "openlora serve (" + ("bare: no plugins, no receipts" if bare else
                                           "4 example plugins + signed receipts") + ")"

    def start(self):
        if not self.binary.exists():
            raise RuntimeError(f"{self.binary} is missing: run `cargo build --release` first")
        if not self.bare and not (plugins_dir() / "prompt-guard.wasm").exists():
            raise RuntimeError("plugins are not built: run `cargo xtask plugins` first")
        self.logf = open(self.log, "w")
        self.started = time.time()
        self.proc = subprocess.Popen([str(self.binary), "serve", str(self.config)], stdout=self.logf,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + self.ready_timeout
        while "serving" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                text = self.log.read_text()
                self.stop()
                raise RuntimeError("openlora did not start:\n" + text[-3000:])
            time.sleep(0.1)
        self.startup_s = round(time.time() - self.started, 2)



# ---------------------------------------------------------------- llama.cpp's server


class LlamaServer(LocalServer):
    """`with LlamaServer(...) as srv:` starts llama.cpp's C++ `llama-server` on 127.0.0.1 and waits
    for /health. One model (alias `base`), `slots` parallel slots with continuous batching (its
    default), a KV cache of `slots * ctx_per_slot` tokens split evenly over the slots (with -np set,
    the KV cache is not unified), prompt cache off (`--no-cache-prompt`, and `--cache-ram 0` for its
    host-memory prompt cache), no web UI, /metrics on. Each GGUF LoRA is loaded at start with
    `--lora-scaled FILE:0` (and `--lora-init-without-apply`): a request picks its adapter with
    `"lora": [{"id": i, "scale": 1.0}]`, i = its position in `loras` (the others run at 0); a
    request without the field gets the global scales, all 0: the base model. (`--lora FILE
    --lora-init-without-apply` is not enough: this build keeps the global scales at 1.0 and only
    skips applying them at start, so a request without `lora` would get all adapters at once;
    `start` checks GET /lora-adapters.) Adapters at scale 0 are left out of the graph. llama-server
    batches only slots with the same LoRA scales into one decode step, so a mixed-adapter load
    runs one adapter group per step."""

    counters = ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total")
    stop_grace_s = 30

    def __init__(self, binary: Path, model: Path, loras: list[Path], threads: int = 2, slots: int = 32,
                 ctx_per_slot: int = 512, port: int | None = None, ready_timeout: float = 180):
        self.binary, self.model, self.loras = Path(binary), Path(model), [Path(x) for x in loras]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.served_model = "base"
        self.lora_ids = {x.stem: i for i, x in enumerate(self.loras)}
        self.tmp = tempfile.TemporaryDirectory(prefix="llama-server-")
        self.log = Path(self.tmp.name) / "server.log"
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.argv = [str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                     "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
                     "--no-cache-prompt", "--cache-ram", "0", "--no-webui", "--metrics", "--alias", self.served_model]
        for f in self.loras:
            if any(c in str(f) for c in ",:"):
                raise ValueError(f"{f}: a LoRA path with ',' or ':' cannot be passed to --lora-scaled")
            self.argv += ["--lora-scaled", f"{f}:0"]
        if self.loras:
            self.argv.append("--lora-init-without-apply")
        self.settings = {"threads": threads, "slots": slots, "ctx_per_slot": ctx_per_slot,
                         "ctx_total": slots * ctx_per_slot, "cache_prompt": False, "cache_ram_mib": 0,
                         "loras": {x.stem: i for i, x in enumerate(self.loras)}}
        info = llamacpp_build_info()
        self.version = (info.get("version") or "").splitlines()[0] if info.get("version") else "unknown"
        commit = self.version.rsplit("commit ", 1)[-1].rstrip(")") if "commit " in self.version else self.version
        self.label = f"llama.cpp llama-server ({commit})"

    def start(self):
        if not self.binary.exists():
            raise RuntimeError(f"{self.binary} is missing (harness.ensure_llamacpp_bin builds it)")
        self.logf = open(self.log, "w")
        self.started = time.time()
        self.proc = subprocess.Popen(self.argv, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                text = self.log.read_text()
                self.stop()
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n{text[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:  # refused while starting, HTTP 503 while the model loads
                pass
            if time.time() > deadline:
                text = self.log.read_text()
                self.stop()
                raise RuntimeError(f"llama-server not ready after {self.ready_timeout} s:\n{text[-3000:]}")
            time.sleep(0.25)
        self.startup_s = round(time.time() - self.started, 2)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/lora-adapters", timeout=10) as r:
            held = json.loads(r.read())
        scales = {Path(x["path"]).stem: x["scale"] for x in held}
        if len(held) != len(self.loras) or any(v != 0 for v in scales.values()) or \
                [int(x["id"]) for x in held] != list(range(len(self.loras))):
            self.stop()
            raise RuntimeError(f"llama-server holds LoRAs {held}, expected {len(self.loras)} at scale 0")

    def _kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)  # started in its own session: its whole group
