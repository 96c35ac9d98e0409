"""Does HyperRAG's decoder run a real model exactly? For any supported model (packaged id, folder, .gguf):

- the decoder's logits against transformers' own forward on a prompt longer than the model's
  sliding window (so its sliding layers cut keys), fp32;
- reranker scores with stored document KV (reuse) against full prefill, on shipped paragraphs
  of very different lengths, the longest (two joined) again past the window.

    python scripts/check_decoder.py --model gemma3-270m [--tokens 600]

Prints both differences as JSON and exits 1 when one passes its bound (1e-4, the fp32 score
bound of :mod:`hyperrag.rag.rerank`; logits the same). Tiny random models of every family are
checked the same way by tests/test_families.py; this is the check on real weights.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from hyperrag.common.settings import SHIPPED_CORPUS, Settings
from hyperrag.kv.local import LocalKV
from hyperrag.model.decoder import Decoder
from hyperrag.model.loading import load_llm
from hyperrag.rag.rerank import FP32_SCORE_BOUND, Reranker

QUESTION = "Which leader of the Norse raiders agreed to swear fealty to the king of West Francia?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="packaged id, Hugging Face folder or .gguf file")
    parser.add_argument("--tokens", type=int, default=600, help="prompt tokens of the logits check")
    args = parser.parse_args()
    llm = load_llm(args.model, Settings.from_env().cache_dir, device="cpu", dtype="float32", adapter="")
    docs = sorted((json.loads(line)["text"] for line in (SHIPPED_CORPUS / "docs.jsonl").read_text().splitlines()),
                  key=len)
    ids = llm.tokenizer(" ".join(docs[-4:])).input_ids[: args.tokens]
    dec = Decoder(llm.model)  # F.linear, as transformers: the forward itself, not the kernels' rounding
    hidden = dec.forward(torch.tensor([ids]), torch.arange(len(ids))[None], dec.new_kv(1, len(ids)), start=0)
    with torch.no_grad():
        expected = llm.model(torch.tensor([ids])).logits[0]
    logits_diff = (dec.logits(hidden)[0] - expected).abs().max().item()
    reranker = Reranker(llm, max_doc_tokens=args.tokens, batch_size=6)
    candidates = [" ".join(docs[-2:]), docs[-3], docs[len(docs) // 2], docs[10], docs[-5], docs[len(docs) // 3]]
    full = reranker.score(QUESTION, candidates, "full")
    source = LocalKV()
    reranker.score(QUESTION, candidates, "reuse", source)  # encodes and stores the documents
    reuse = reranker.score(QUESTION, candidates, "reuse", source).scores
    rank = lambda s: sorted(range(len(s)), key=lambda i: -s[i])
    report = {"model": args.model, "fingerprint": llm.fingerprint, "logits_prompt_tokens": len(ids),
              "rerank_prompt_tokens": full.prompt_tokens,
              "windows": sorted({w for w in dec.arch.windows if w}), "max_logit_diff": logits_diff,
              "max_score_diff_reuse_vs_full": max(abs(a - b) for a, b in zip(full.scores, reuse)),
              "same_ranking": rank(full.scores) == rank(reuse)}
    print(json.dumps(report, indent=1))
    ok = report["max_logit_diff"] <= FP32_SCORE_BOUND and report["max_score_diff_reuse_vs_full"] <= FP32_SCORE_BOUND
    return 0 if ok and report["same_ranking"] else 1


if __name__ == "__main__":
    sys.exit(main())
