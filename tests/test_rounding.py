"""Hessian-aware rounding of the quantized codecs (hyperrag.rag.kv_rounding, QuantCodec._sweep).

What must hold: with H = I the sweep is nearest rounding, byte for byte; with an anisotropic H it
lowers the H-weighted error e^T H e it minimises (and raises the plain error, which it trades);
its bytes decode with the codec's ordinary decoder; it is part of the store key; and on a real
20-document batch, with factors measured from the shipped calibration questions, int4 scores move
less than with nearest rounding.
"""
from __future__ import annotations

import json

import pytest
import torch

from hyperrag.kv.codec import get_codec
from hyperrag.kv.local import LocalKV
from hyperrag.rag.kv_rounding import codec_for, hinv_factors, reader_moments, rounding_factors
from hyperrag.kv.store import content_address
from tests.conftest import write_jsonl

QUANTIZED = ("int8", "int4", "int2")


def synthetic_kv(tokens: int = 77) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(4, 2, 3, tokens, 64, generator=g)
    kv[:, 0, :, :, 3] *= 30  # a key outlier channel
    return kv


def anisotropic_moments(layers: int = 4, heads: int = 3, d: int = 64) -> torch.Tensor:
    """SPD matrices [layers, 2, heads, d, d] whose eigenvalues span four decades, like the
    measured query moments (a few directions carry most of the energy)."""
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(layers, 2, heads, d, d, generator=g, dtype=torch.float64))[0]
    eig = torch.logspace(0, -4, d, dtype=torch.float64)
    return basis @ torch.diag_embed(eig.expand(layers, 2, heads, d)) @ basis.transpose(-1, -2)


def weighted_error(err: torch.Tensor, moments: torch.Tensor) -> float:
    """sum over layers, parts, heads and tokens of e^T H e for errors [L, 2, H, T, D]."""
    return torch.einsum("lphtc,lphcd,lphtd->", err.double(), moments, err.double()).item()


@pytest.mark.parametrize("name", QUANTIZED)
def test_identity_hessian_is_nearest_rounding(name):
    kv = synthetic_kv()
    eye = torch.eye(64, dtype=torch.float64).expand(4, 2, 3, 64, 64)
    codec = get_codec(name)
    assert torch.equal(codec.rounded_by(hinv_factors(eye)).encode(kv), codec.encode(kv))


@pytest.mark.parametrize("name", QUANTIZED)
def test_sweep_lowers_the_weighted_error_and_decodes_as_usual(name):
    kv = synthetic_kv()
    moments = anisotropic_moments()
    plain = get_codec(name)
    swept = plain.rounded_by(hinv_factors(moments))
    payload = swept.encode(kv)
    assert payload.numel() == plain.nbytes(tuple(kv.shape))
    out = swept.decode(payload, tuple(kv.shape))
    assert torch.equal(out, plain.decode(payload, tuple(kv.shape)))  # the format is unchanged
    nearest = plain.decode(plain.encode(kv), tuple(kv.shape))
    ours, theirs = weighted_error(out - kv, moments), weighted_error(nearest - kv, moments)
    assert ours < 0.7 * theirs, (name, ours, theirs)
    # what it trades: the unweighted error grows (errors go where H is small, not away)
    assert (out - kv).norm() > (nearest - kv).norm()


def test_rounding_is_part_of_the_store_key():
    """A store filled with nearest rounding misses under Hessian rounding (and is re-encoded),
    although either's bytes would decode."""
    plain = get_codec("int4")
    swept = plain.rounded_by(hinv_factors(anisotropic_moments()))
    assert swept.spec == plain.spec + "-gptq"
    assert content_address("model", plain, "text") != content_address("model", swept, "text")
    assert codec_for("fp16", "hessian", None, "/nonexistent") is get_codec("fp16")  # casts round nothing


@pytest.fixture(scope="module")
def measured_moments(reranker, tmp_path_factory):
    """The query moments measured once for this module on two of the shipped calibration set's
    eight articles with their questions (the whole set takes ~50 s on 2 cores)."""
    from hyperrag.rag.kv_rounding import CALIBRATION

    folder = tmp_path_factory.mktemp("kv-calibration")
    docs = [json.loads(line) for line in (CALIBRATION / "docs.jsonl").read_text().splitlines()]
    titles = sorted({d["title"] for d in docs})[:2]
    docs = [d for d in docs if d["title"] in titles]
    ids = {d["id"] for d in docs}
    queries = [json.loads(line) for line in (CALIBRATION / "queries.jsonl").read_text().splitlines()]
    write_jsonl(folder / "docs.jsonl", docs)
    write_jsonl(folder / "queries.jsonl", [q for q in queries if q["doc_ids"][0] in ids])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("hyperrag.rag.kv_rounding.CALIBRATION", folder)
        return reader_moments(reranker)


def test_measured_factors_lower_real_score_errors(reranker, real_batch, measured_moments, tmp_path, monkeypatch):
    """Factors from the moments measured on SQuAD train questions (part of the shipped
    calibration set), cached on disk; on a real question with 20 candidates (shipped dev
    corpus), int4 and int2 scores move less from the exact-KV scores with Hessian rounding than
    with nearest rounding."""
    monkeypatch.setattr("hyperrag.rag.kv_rounding.reader_moments", lambda r: measured_moments)
    hinv = rounding_factors(reranker, tmp_path)
    dec = reranker.decoder
    assert hinv.shape == (dec.n_layers, 2, dec.n_kv_heads, dec.head_dim, dec.head_dim)
    assert torch.isfinite(hinv).all()
    monkeypatch.setattr("hyperrag.rag.kv_rounding.reader_moments", lambda r: pytest.fail("measured twice"))
    assert torch.equal(rounding_factors(reranker, tmp_path), hinv)  # from the cache file

    question, candidates, kvs = real_batch
    exact = LocalKV()
    for text, kv in kvs.items():
        exact.put(text, kv)
    reference = reranker.score(question, candidates, "reuse", exact).scores
    for name in ("int4", "int2"):
        errors = {}
        for rounding in ("nearest", "hessian"):
            source = LocalKV(codec_for(name, rounding, reranker, tmp_path))
            for text, kv in kvs.items():
                source.put(text, kv)
            scores = reranker.score(question, candidates, "reuse", source).scores
            errors[rounding] = sum(abs(a - b) for a, b in zip(scores, reference)) / len(scores)
        assert errors["hessian"] < errors["nearest"], (name, errors)


def test_reader_moments_are_symmetric_and_normalised(reranker, measured_moments):
    """The key moments come from queries only: the probe is off again afterwards."""
    moments = measured_moments
    assert reranker.decoder.probe is None
    assert torch.allclose(moments, moments.transpose(-1, -2))
    assert torch.allclose(moments.diagonal(dim1=-2, dim2=-1).mean(-1), torch.ones(moments.shape[:3], dtype=moments.dtype))
