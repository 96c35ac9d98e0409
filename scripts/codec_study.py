"""Where does quantised KV lose the ranking? An error study of the stored document KV.

    ./run.sh python scripts/codec_study.py [--queries 12] [--top-k 20] [--json out.json]

Takes the bench's questions and candidates on the shipped corpus, computes every candidate's
exact fp32 KV once, then scores the candidates with KV reuse where the KV went through a
*simulated* quantiser (quantise and dequantise in fp32; same arithmetic as the codecs) that is
applied to a chosen part only: keys or values, one layer, the first tokens. The score error is
against the exact KV (which equals full prefill within 1e-4). This says where the error comes
from and which technique removes it, before any byte format is written.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass, field

import torch

from hyperrag.model.decoder import hadamard



def nf_levels(bits: int) -> torch.Tensor:
    """Normal-quantile levels in [-1, 1] (NF4-style), for data that is near-Gaussian after rotation."""
    n = 2**bits
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    z = torch.special.ndtri(p)
    return (z / z.abs().max()).float()


def quantise(x: torch.Tensor, bits: int, dim: int, group: int, nf: bool = False) -> torch.Tensor:
    """Asymmetric min/max quantise-dequantise of groups of ``group`` along ``dim`` (fp16 stats).
    ``group <= 0``: one group spans the whole axis. ``nf``: normal-quantile levels over
    [min, max] instead of uniform ones."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    g = n if group <= 0 else group
    pad = -n % g
    xp = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1) if pad else x
    xg = xp.unflatten(-1, (-1, g))
    if nf:
        lo = xg.amin(-1, keepdim=True).half().float()
        hi = xg.amax(-1, keepdim=True).half().float()
        mid, half = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-6)
        lv = nf_levels(bits)
        idx = ((xg - mid) / half).unsqueeze(-1).sub(lv).abs().argmin(-1)
        return (lv[idx] * half + mid).flatten(-2)[..., :n].movedim(-1, dim)
    lo = xg.amin(-1, keepdim=True).half().float()
    scale = ((xg.amax(-1, keepdim=True) - lo) / (2**bits - 1)).half().float().clamp_min(1e-6)
    q = ((xg - lo) / scale).round().clamp(0, 2**bits - 1)
    return (q * scale + lo).flatten(-2)[..., :n].movedim(-1, dim)


def rope_pairs(x: torch.Tensor) -> torch.Tensor:
    """``[heads, T, D]`` -> ``[heads * D/2, T, 2]``: channels ``i`` and ``i + D/2``, the pairs RoPE rotates together."""
    a, b = x.chunk(2, -1)
    return torch.stack([a, b], -1).transpose(1, 2).flatten(0, 1)


def pair_quantise(x: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Each RoPE channel pair of ``x`` [heads, T, D] replaced by its nearest centroid of ``books``."""
    heads, tokens, d = x.shape
    p = rope_pairs(x)
    q = torch.gather(books, 1, torch.cdist(p, books).argmin(-1)[..., None].expand(-1, -1, 2))
    q = q.view(heads, d // 2, tokens, 2).transpose(1, 2)
    return torch.cat([q[..., 0], q[..., 1]], -1)


def fit_pair_codebooks(kvs: list[torch.Tensor], bits: int, iters: int = 12, seed: int = 0) -> torch.Tensor:
    """Coupled quantisation (CQ-style): ``2**(2 * bits)`` centroids per (layer, k/v, head, RoPE
    channel pair), fit by batched Lloyd iterations on calibration documents' KV; no per-token
    metadata, so ``bits`` per value exactly."""
    g = torch.Generator().manual_seed(seed)
    n_layers, k = kvs[0].shape[0], 2 ** (2 * bits)
    books = []
    for layer in range(n_layers):
        for part in (0, 1):
            pts = torch.cat([rope_pairs(kv[layer, part]) for kv in kvs], 1)  # [heads * D/2, N, 2]
            cent = torch.gather(pts, 1, torch.randint(0, pts.shape[1], (pts.shape[0], k), generator=g)[..., None].expand(-1, -1, 2))
            for _ in range(iters):
                a = torch.cdist(pts, cent).argmin(-1)
                total = torch.zeros_like(cent).scatter_add_(1, a[..., None].expand(-1, -1, 2), pts)
                count = torch.zeros(cent.shape[:2]).scatter_add_(1, a, torch.ones(a.shape))
                cent = torch.where(count[..., None] > 0, total / count.clamp_min(1)[..., None], cent)
            books.append(cent)
    return torch.stack(books).unflatten(0, (n_layers, 2))


@dataclass
class Variant:
    """A simulated codec: ``bits`` for keys/values, group axes, and the techniques switched on."""

    name: str
    kbits: int = 4
    vbits: int = 4
    kgroup: int = 32  # tokens per key group (per channel); <= 0: the whole document
    vgroup: int = 32  # channels per value group (per token)
    rotate: bool = False  # Hadamard on head_dim before quantising (undone after)
    rotate_parts: tuple[int, ...] = (0, 1)  # which parts ``rotate`` applies to (the decoder ships keys only)
    pre_rope: bool = False  # keys quantised before RoPE
    keep_first: int = 0  # first document tokens kept exact
    layers: tuple[int, ...] | None = None  # quantise only these layers (None: all)
    parts: tuple[int, ...] = (0, 1)  # 0 keys, 1 values
    layer_bits: dict[int, int] = field(default_factory=dict)  # per-layer override (keys and values)
    key_per_token: bool = False  # keys grouped along channels per token (as values), not per channel
    nf: bool = False  # normal-quantile levels
    books: torch.Tensor | None = None  # [L, 2, heads * D/2, k, 2]: 2-D codebooks per RoPE channel pair (replaces bits)

    def apply(self, kv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        out = kv.clone()
        n_layers, _, _, tokens, d = kv.shape
        h = hadamard(d)
        for layer in range(n_layers) if self.layers is None else self.layers:
            for part in self.parts:
                x = kv[layer, part]  # [heads, T, D]
                if part == 0 and self.pre_rope:
                    cos, sin = rope
                    x = unrope(x, cos[:tokens], sin[:tokens])
                rotated = self.rotate and part in self.rotate_parts
                if rotated:
                    x = x @ h
                bits = self.layer_bits.get(layer, self.kbits if part == 0 else self.vbits)
                if self.books is not None:
                    x = pair_quantise(x, self.books[layer, part])
                elif bits < 16:
                    if part == 0 and not self.key_per_token:
                        x = quantise(x, bits, 1, self.kgroup, self.nf)
                    else:
                        x = quantise(x, bits, 2, self.vgroup if part else self.kgroup, self.nf)
                if rotated:
                    x = x @ h.T
                if part == 0 and self.pre_rope:
                    x = rope_apply(x, cos[:tokens], sin[:tokens])
                if self.keep_first:
                    x[:, : self.keep_first] = kv[layer, part, :, : self.keep_first]
                out[layer, part] = x
        return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


def rope_apply(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def unrope(x, cos, sin):
    # inverse rotation: R(-theta); rotate_half(x) * (-sin)
    return x * cos - rotate_half(x) * sin


class Source:
    def __init__(self, kvs: dict[str, torch.Tensor]):
        self.kvs = kvs

    def load_into(self, text: str, out: torch.Tensor) -> bool:
        out.copy_(self.kvs[text])
        return True

    def put(self, text: str, kv: torch.Tensor) -> None:
        raise AssertionError("every candidate is held")


def main() -> None:
    from hyperrag.rag.pipeline import Engine
    from hyperrag.rag.rerank import fuse_scores
    from hyperrag.common.settings import Settings

    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--json", default="")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--calibration-docs", type=int, default=20,
                    help="non-candidate documents the vq variant's codebooks are fit on")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "1")))
    # the keys as the model computes them: the study simulates the rotation itself
    engine = Engine.load(Settings.from_env().replace(kv_rotation=0), with_generator=False)
    rr = engine.reranker
    qs = engine.corpus.sample_queries(args.queries, engine.settings.seed)
    cands = []
    for q in qs:
        hits = engine.retrieve(q.question, args.top_k)
        cands.append(([engine.corpus.by_id[d].text for d, _ in hits], [c for _, c in hits]))
    union = list(dict.fromkeys(t for texts, _ in cands for t in texts))
    exact = dict(zip(union, rr.encode_docs(union)))
    # RoPE tables at the documents' absolute positions (they follow the fixed prefix)
    longest = max(kv.shape[3] for kv in exact.values())
    pos = (rr.runner.prefix_len + torch.arange(longest))[None]
    cos, sin = rr.decoder.body.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    rope = (cos[0], sin[0])
    w = engine.runtime.retrieval_weight
    ref = []
    for (texts, cos_), q in zip(cands, qs):
        ref.append(fuse_scores(rr.score(q.question, texts, "reuse", Source(exact)).scores, cos_, w))

    def measure(v: Variant) -> dict:
        kvs = {t: v.apply(kv, rope) for t, kv in exact.items()}
        diffs, same, top = [], 0, 0
        for (texts, cos_), q, r in zip(cands, qs, ref):
            s = fuse_scores(rr.score(q.question, texts, "reuse", Source(kvs)).scores, cos_, w)
            diffs += [abs(a - b) for a, b in zip(s, r)]
            order = sorted(range(len(s)), key=lambda j: -s[j])
            ref_order = sorted(range(len(r)), key=lambda j: -r[j])
            same += order == ref_order
            top += set(order[:3]) == set(ref_order[:3])
        n = len(qs)
        return {"variant": v.name, "max": max(diffs), "mean": sum(diffs) / len(diffs), "identical": same / n, "top3": top / n}

    L = rr.decoder.n_layers
    variants = [
        Variant("int4 k32 v32 (today)"),
        Variant("int4 keys only", parts=(0,)),
        Variant("int4 values only", parts=(1,)),
        Variant("int4 keep first 4 tokens", keep_first=4),
        Variant("int4 rotate", rotate=True),
        Variant("int4 pre-rope keys", pre_rope=True),
        Variant("int4 pre-rope + rotate", pre_rope=True, rotate=True),
        Variant("int4 pre-rope keys per-doc channel", pre_rope=True, kgroup=0),
        Variant("int4 pre-rope+rot keys per-doc, v64", pre_rope=True, rotate=True, kgroup=0, vgroup=64),
        Variant("int4 rot keys per-doc, v64", rotate=True, kgroup=0, vgroup=64),
        Variant("int2 k32 v32", kbits=2, vbits=2),
        Variant("int2 pre-rope+rot k32 v32", kbits=2, vbits=2, pre_rope=True, rotate=True),
        Variant("int2 pre-rope+rot per-doc v64", kbits=2, vbits=2, pre_rope=True, rotate=True, kgroup=0, vgroup=64),
    ]
    variants += [
        Variant("int4 rot, keys per token k32", rotate=True, key_per_token=True),
        Variant("int4 rot, keys per token k64 v64", rotate=True, key_per_token=True, kgroup=64, vgroup=64),
        Variant("int4 nf k32 v32", nf=True),
        Variant("int4 rot nf k32 v32", rotate=True, nf=True),
        Variant("int4 rot k16 v32", rotate=True, kgroup=16),
        Variant("int4 rot keys int8 k64", rotate=True, kbits=8, kgroup=64),
        Variant("int4 rot, first 10 layers int8", rotate=True, layer_bits={i: 8 for i in range(10)}),
        Variant("int4 rot, last 10 layers int8", rotate=True, layer_bits={i: 8 for i in range(20, 30)}),
        Variant("int2 rot nf k32 v32", kbits=2, vbits=2, rotate=True, nf=True),
        Variant("int2 rot k16 v16", kbits=2, vbits=2, rotate=True, kgroup=16, vgroup=16),
    ]
    variants += [  # the shipped int2 and int4 layouts, keys rotated (as the decoder does) or values too
        Variant("int2 rot keys k128 v64 (shipped)", kbits=2, vbits=2, rotate=True, rotate_parts=(0,), kgroup=128, vgroup=64),
        Variant("int2 rot k128 v64", kbits=2, vbits=2, rotate=True, kgroup=128, vgroup=64),
        Variant("int4 rot keys k32 v32 (shipped)", rotate=True, rotate_parts=(0,)),
        Variant("int4 rot k32 v32", rotate=True),
        Variant("int4 rot keys k128 v64", rotate=True, rotate_parts=(0,), kgroup=128, vgroup=64),
        Variant("int4 rot k128 v64", rotate=True, kgroup=128, vgroup=64),
    ]
    variants += [Variant(f"int4 layer {i} only", layers=(i,)) for i in range(L)]
    if not args.only or any(k.startswith("vq") for k in args.only.split(",")):  # fitting takes minutes
        others = [d.text for d in engine.corpus.docs if d.text not in exact]
        random.Random(engine.settings.seed).shuffle(others)
        calibration = rr.encode_docs(others[: args.calibration_docs])
        variants.append(Variant(f"vq4 rope pairs ({len(calibration)} calibration docs)",
                                books=fit_pair_codebooks(calibration, 4)))
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v.name in keep or any(v.name.startswith(k) for k in keep)]
    rows = []
    for v in variants:
        row = measure(v)
        rows.append(row)
        print(f"{row['variant']:<40} max {row['max']:.3f} mean {row['mean']:.4f} identical {row['identical']:.0%} top3 {row['top3']:.0%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"queries": len(qs), "top_k": args.top_k, "docs": len(union), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
