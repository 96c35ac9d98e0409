"""The same code on CUDA (device auto picks it, bf16 compute there), against the CPU.

- KV reuse against full prefill in bf16 compute: scores within a bound derived from bf16's unit
  roundoff and the score's scale (below), rankings the same wherever that bound decides them;
  fp32 on CUDA equals fp32 on the CPU within the fp32 bound (``FP32_SCORE_BOUND``);
- every KV codec decodes on the device to the CPU's values: bit for bit for the casts, within
  fp32 rounding of one multiply-add for the quantized ones (and one bf16 rounding into a bf16
  batch buffer);
- the engine with ``device="auto"`` runs on CUDA, in bf16, when torch sees a GPU.

Every test takes the device as a parameter: ``cuda`` is skipped, with the reason, where torch
sees no GPU, so a CPU-only machine still runs the CPU side of each comparison (bf16 compute on
the CPU included). ``scripts/gpu_check.sh`` runs this file on a GPU machine with
``HYPERRAG_REQUIRE_CUDA=1``: without CUDA it then fails rather than skip. A tiny random Llama
saved as a Hugging Face folder, no download.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from hyperrag.kv.codec import CODECS, CastCodec
from hyperrag.kv.local import LocalKV
from hyperrag.model.loading import load_llm, resolve_device, resolve_dtype
from hyperrag.rag.rerank import FP32_SCORE_BOUND, Reranker
from tests.conftest import SHIPPED
from tests.test_model_loading import save, smollm2_tokenizer, tiny_llama, tokenizer  # noqa: F401 (fixtures)

CUDA = torch.cuda.is_available()
if os.environ.get("HYPERRAG_REQUIRE_CUDA") == "1" and not CUDA:  # scripts/gpu_check.sh: a skip would pass silently
    pytest.fail("HYPERRAG_REQUIRE_CUDA=1 but torch.cuda.is_available() is False", pytrace=False)
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA is not available here (torch.cuda.is_available() is False); "
                                                 "scripts/gpu_check.sh runs these on a GPU machine")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
QUESTION = "Who led the Norse raiders who settled in Normandy?"
FAST = {"cpu_linear": "aten"}  # no kernel timing in tests

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. A score is h . w, with h the final RMSNorm's
# output and w = head[yes] - head[no]; since ||x / rms(x)||_2 = sqrt(d), ||h||_2 <= sqrt(d) max|g| (g
# the norm's weight), so S = sqrt(d) max|g| ||w||_2 bounds |score|: the score's scale (score_scale).
# Full prefill and KV reuse run the same ops on the same bf16 weights; they differ only in where
# bf16 rounds (batch shapes, a document's KV computed alone and read back). Each of the 2L + 1
# bf16 writes of the residual stream (after each of the L layers' attention and MLP, and the final
# norm) moves h by at most u relative, to first order through layers that do not amplify a relative
# error (their inputs are normalised); so either path's h lies within (2L + 1) u ||h|| of the
# exact one, and the two paths' scores within REUSE_BOUND = 2 (2L + 1) u S. Against fp32 compute,
# each bf16 path also carries the rounding of the weights of its 2L sublayers, the final norm and
# the head (u relative each): within FP32_BOUND = (4L + 3) u S of the fp32 score.
BF16_U = 2.0 ** -8


def reuse_bound(reranker: Reranker) -> float:
    return 2 * (2 * reranker.decoder.n_layers + 1) * BF16_U * score_scale(reranker)


def fp32_bound(reranker: Reranker) -> float:
    return (4 * reranker.decoder.n_layers + 3) * BF16_U * score_scale(reranker)


def score_scale(reranker: Reranker) -> float:
    """S = sqrt(d) max|g| ||head[yes] - head[no]||_2 (see above)."""
    g = reranker.llm.model.model.norm.weight.float()
    return math.sqrt(g.numel()) * g.abs().max().item() * reranker.score_vec.norm().item()


def decided(scores: list[float], gap: float) -> list[int]:
    """Documents whose scores are all more than ``gap`` apart (greedily from the top): their order
    cannot change under a perturbation of at most ``gap / 2`` per score."""
    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if not keep or scores[keep[-1]] - scores[i] > gap:
            keep.append(i)
    return keep


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """Weights drawn wider than the default (0.1, as in test_families) so scores spread out."""
    return save(tmp_path_factory.mktemp("cuda") / "tiny-llama", tiny_llama(tokenizer, 0, initializer_range=0.1),
                tokenizer)


@pytest.fixture(scope="module")
def texts():
    return [json.loads(line)["text"] for line in (SHIPPED / "docs.jsonl").read_text().splitlines()][:24]


@pytest.fixture(scope="module")
def cpu_fp32(tiny_folder, cache_dir, texts):
    """The reference: full-prefill scores in fp32 on the CPU."""
    llm = load_llm(str(tiny_folder), cache_dir, device="cpu", dtype="float32", **FAST)
    return Reranker(llm, max_doc_tokens=160, batch_size=8).score(QUESTION, texts, "full").scores


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_reuse_matches_full_prefill(device, tiny_folder, cache_dir, texts, cpu_fp32):
    llm = load_llm(str(tiny_folder), cache_dir, device=device, dtype="bfloat16", **FAST)
    assert (llm.device.type, llm.dtype) == (device, torch.bfloat16)
    reranker = Reranker(llm, max_doc_tokens=160, batch_size=8)
    full = reranker.score(QUESTION, texts, "full").scores
    reuse = reranker.score(QUESTION, texts, "reuse", LocalKV()).scores
    bound = reuse_bound(reranker)
    assert max(abs(a - b) for a, b in zip(full, reuse)) <= bound
    # close to fp32 too, not only self-consistent
    assert max(abs(a - b) for a, b in zip(full, cpu_fp32)) <= fp32_bound(reranker)
    # The ranking: where the bound decides an order (scores more than twice it apart), reuse keeps it.
    keep = decided(full, 2 * bound)
    assert len(keep) >= 3, f"only {len(keep)} documents more than {2 * bound:.3f} apart: the check says little"
    assert sorted(keep, key=lambda i: -reuse[i]) == keep


@needs_cuda
def test_fp32_on_cuda_equals_the_cpu(tiny_folder, cache_dir, texts, cpu_fp32):
    llm = load_llm(str(tiny_folder), cache_dir, device="cuda", dtype="float32", **FAST)
    reranker = Reranker(llm, max_doc_tokens=160, batch_size=8)
    for mode in ("full", "reuse"):
        scores = reranker.score(QUESTION, texts, mode, LocalKV() if mode == "reuse" else None).scores
        assert max(abs(a - b) for a, b in zip(scores, cpu_fp32)) <= FP32_SCORE_BOUND, mode


# A quantized element decodes as lo + code * scale (keys) or code * scale - zero * scale (values):
# one multiply and one add in fp32 (unit roundoff 2^-24) on either device, fused or not. The
# operands are at most the group's range (<= 2 max|kv|, x 2^(1/8) for values' one-byte scales) and
# its minimum (<= max|kv|), so each side is within about 5.4 x 2^-24 max|kv| of the exact value and
# the two sides within QUANT_BOUND = 2^-20 max|kv| (16 units). Into a bf16 buffer each side then
# rounds once more, so where they differ they may land one bf16 ulp (<= 2^-7 |value|) apart.
QUANT_UNITS = 2.0 ** -20


def synthetic_kv() -> torch.Tensor:
    """[layers, 2, heads, tokens, head_dim] with an outlier key channel, an outlier value token and
    a last key group shorter than the others."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 2, 2, 70, 64, generator=g)
    kv[:, 0, :, :, 3] *= 20
    kv[:, 1, :, 10] *= 30
    return kv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CODECS))
def test_codecs_decode_on_the_device_as_on_the_cpu(name, dtype, device):
    codec, kv = CODECS[name], synthetic_kv()
    shape = tuple(kv.shape)
    payload = codec.encode(kv)  # the store's bytes: on the CPU, shipped to the device by decode_into
    reference = codec.decode(payload, shape)  # CPU, fp32: the compiled kernel for the quantized codecs
    # Straight into one row of a batch buffer, as the reranker loads it (slot 5 of row 1 of 3).
    buf = torch.full((shape[0], 2, 3, shape[2], shape[3] + 20, shape[4]), 9.0, dtype=dtype, device=device)
    row = buf[:, :, 1, :, 5: 5 + shape[3]]
    codec.decode_into(payload, shape, row)
    got = row.float().cpu()
    untouched = buf.clone()
    untouched[:, :, 1, :, 5: 5 + shape[3]] = 9.0
    assert (untouched == 9.0).all()  # nothing outside the row written
    if isinstance(codec, CastCodec):
        assert torch.equal(got, reference.to(dtype).float())  # a cast is a cast on every device
        return
    tol = QUANT_UNITS * kv.abs().max().item()
    if dtype == torch.float32:
        assert (got - reference).abs().max().item() <= tol
    else:
        assert ((got - reference.to(dtype).float()).abs() <= 2.0 ** -7 * (reference.abs() + tol) + tol).all()


def test_auto_device_and_dtype(tiny_folder, tiny_corpus_dir, cache_dir):
    """``device="auto"`` is CUDA in bf16 where torch sees a GPU, else the CPU in fp32; the whole
    engine (embedder, reranker, generator, store) runs there and answers."""
    from hyperrag.common.settings import Settings
    from hyperrag.rag.pipeline import Engine

    expected = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    assert (resolve_device("auto").type, resolve_dtype("auto", resolve_device("auto"))) == expected
    settings = Settings(corpus=str(tiny_corpus_dir), model=str(tiny_folder), adapter="", cache_dir=cache_dir,
                        store_url="memory://", device="auto", dtype="auto", cpu_linear="aten", cpu_stream_threads=1,
                        top_k=4, top_n=2, batch_size=4, max_new_tokens=4)
    engine = Engine.load(settings)
    try:
        decoder = engine.reranker.decoder
        assert (decoder.device.type, decoder.dtype) == expected
        assert engine.generator.llm.device.type == expected[0]
        assert engine.runtime.embedder.device.type == expected[0]
        assert str(expected[1]) in engine.store.identity  # bf16 and fp32 KV are stored apart
        result = engine.ask(QUESTION, "reuse")
        again = engine.ask(QUESTION, "reuse")
        assert len(result.docs) == 4 and [d.id for d in again.docs] == [d.id for d in result.docs]
        assert again.rerank.encoded_docs == 0  # the second time every document's KV came from the store
    finally:
        engine.close()
