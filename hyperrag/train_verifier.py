"""Train the answer check: a second LoRA that reads a stored document's KV and says whether it answers.

    python -m hyperrag.train_verifier                      # the shipped check's recipe (SmolLM2-135M adapter)
    python -m hyperrag.train_verifier --articles 2 --max-docs 6 --out /tmp/check   # a smoke run

Why: the reranker's score orders passages, but a question whose answer is not in the corpus
still finds same-article paragraphs that score high, and the reader reads an answer from them
(:mod:`hyperrag.rag.calibration`). The check is trained on exactly that confusion: a passage with
the answer against the passages retrieval ranks highest among those without it.

What it is: LoRA (rank ``--rank``) on the top ``--layers`` layers of the engine's merged model,
applied to the question's tokens only. The prompt is the reranker's,
``[prefix][document][question][suffix]`` scored by logit(Yes) - logit(No) at the last token, and
the prefix and document run *without* the check's LoRA: their KV is the stored KV the reranker
and reader already use, so the check costs one more run of the question's tokens over the
documents read, and no stored byte changes. Loss: binary cross-entropy, the label "a SQuAD answer
string of the question is in the passage".

Data: SQuAD v1.1 **train** articles that no adapter, calibration or experiment of this repo has
used (``--articles`` of them, drawn with ``--seed``). Each usable question gives its gold paragraph
(positive) and its ``--negatives`` nearest paragraphs by the engine's retriever among the sampled
articles' paragraphs that hold none of its answers. Pairs are grouped by paragraph, so each
paragraph's KV runs once for all its questions. Checkpoints go to ``<out>/checkpoint`` every
``--save-every`` paragraphs and a rerun resumes there. The result: ``<out>/adapter_model.safetensors``
+ ``adapter_config.json`` (PEFT) and ``<out>/hyperrag.json`` (data, steps, loss).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hyperrag.common.settings import Settings
from hyperrag.model.loading import ADAPTER_META, adapter_hash, adapter_meta

log = logging.getLogger("hyperrag.train_verifier")
USED_CORPORA = ("corpora/trust-heldout8", "corpora/probe-train")  # train articles experiments read


def used_titles(adapters: Sequence[str], corpora: Sequence[str] = USED_CORPORA) -> set[str]:
    """Every SQuAD train article an adapter trained or validated on, a calibration was fitted on
    or a local experiment corpus holds: the check must learn on articles none of them saw."""
    titles: set[str] = set()

    def walk(node, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            if key.endswith("articles") and all(isinstance(v, str) for v in node):
                titles.update(node)
            for v in node:
                walk(v)

    for adapter in adapters:
        walk(adapter_meta(adapter))
    for folder in corpora:
        path = Path(folder) / "docs.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                title = json.loads(line).get("title")
                if title:
                    titles.add(title)
    return {t.replace(" ", "_") for t in titles}


def pick_articles(cache_dir: str, exclude: set[str], n: int, seed: int) -> list[dict]:
    from hyperrag.data.squad import load_squad

    fresh = [a for a in load_squad("train", cache_dir) if a["title"].replace(" ", "_") not in exclude]
    random.Random(seed).shuffle(fresh)
    if len(fresh) < n:
        raise SystemExit(f"only {len(fresh)} unused SQuAD train articles, {n} asked for")
    return fresh[:n]


def make_pairs(articles: list[dict], embedder, negatives: int, seed: int) -> tuple[list[str], list[tuple[int, str, int]]]:
    """The articles' paragraphs and (paragraph, question, label) pairs: each question with its
    gold paragraph (1) and its ``negatives`` nearest paragraphs holding none of its answers (0)."""
    texts, questions = [], []
    for article in articles:
        for para in article["paragraphs"]:
            texts.append(para["context"])
            for qa in para["qas"]:
                answers = [a["text"].strip() for a in qa["answers"] if a["text"].strip()]
                if answers and any(a in para["context"] for a in answers):
                    questions.append((len(texts) - 1, qa["question"], answers))
    lower = [t.lower() for t in texts]
    enc = dict(normalize_embeddings=True, convert_to_numpy=True, batch_size=64, show_progress_bar=False)
    doc_vecs = embedder.encode(texts, **enc).astype(np.float32)
    q_vecs = embedder.encode([q for _, q, _ in questions], **enc).astype(np.float32)
    pairs = []
    for (gold, question, answers), vec in zip(questions, q_vecs):
        pairs.append((gold, question, 1))
        order = np.argsort(-(doc_vecs @ vec))
        wrong = [int(d) for d in order if not any(a.lower() in lower[d] for a in answers)][:negatives]
        pairs += [(d, question, 0) for d in wrong]
    random.Random(seed).shuffle(pairs)
    return texts, pairs


def by_paragraph(pairs: list[tuple[int, str, int]], per_doc: int) -> list[tuple[int, list[tuple[str, int]]]]:
    """Pairs grouped by paragraph, at most ``per_doc`` per group (a paragraph with more comes back
    in several groups), in the shuffled pairs' order."""
    groups: dict[int, list[tuple[str, int]]] = {}
    for doc, question, label in pairs:
        groups.setdefault(doc, []).append((question, label))
    return [(doc, qs[i : i + per_doc]) for doc, qs in groups.items() for i in range(0, len(qs), per_doc)]


def build_model(settings: Settings, layers: int, rank: int, alpha: float):
    """The engine's model with the reranker adapter merged, and the check's fresh LoRA on top."""
    from peft import LoraConfig, get_peft_model

    from hyperrag.model.loading import load_llm
    from hyperrag.train_reranker import lora_targets

    llm = load_llm(settings.model, settings.cache_dir, device="cpu", dtype="float32", adapter=str(settings.folder("adapter")))
    model = llm.model
    n = model.config.num_hidden_layers
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=lora_targets(model.config.model_type).split(","),
                        layers_to_transform=list(range(n - layers, n)), layers_pattern="layers")
    return llm, get_peft_model(model, config)


def check_scores(model, prompt, score_vec: torch.Tensor, doc: str, questions: Sequence[str]) -> torch.Tensor:
    """The check's scores of ``questions`` over one paragraph: the prefix and paragraph run once,
    without the check's LoRA (the stored KV), the questions as a right-padded batch with it."""
    prefix = torch.tensor([prompt.prefix_ids + list(prompt.doc_ids(doc))])
    with torch.no_grad(), model.disable_adapter():
        cache = model(prefix, use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(questions))
    queries = [prompt.query(q).ids for q in questions]
    width = max(len(q) for q in queries)
    ids = torch.tensor([q + [q[-1]] * (width - len(q)) for q in queries])
    pos = prefix.shape[1] + torch.arange(width)[None].expand(len(queries), -1)
    body = model.get_base_model().model  # final-normed hidden states, no vocabulary-wide logits
    hidden = body(ids, position_ids=pos, past_key_values=cache).last_hidden_state
    return hidden[torch.arange(len(queries)), torch.tensor([len(q) - 1 for q in queries])] @ score_vec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/smollm2-135m-check", help="output folder (checkpoints under it)")
    p.add_argument("--articles", type=int, default=30, help="unused SQuAD train articles to learn on")
    p.add_argument("--negatives", type=int, default=2, help="passages without the answer per question")
    p.add_argument("--per-doc", type=int, default=12, help="questions run over one paragraph's KV at once")
    p.add_argument("--max-docs", type=int, default=0, help="stop after this many paragraph groups (0: all)")
    p.add_argument("--layers", type=int, default=8, help="top layers that get the check's LoRA")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="paragraph groups between checkpoints")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    out = Path(args.out)
    ckpt = out / "checkpoint"
    torch.manual_seed(args.seed)
    t0 = time.time()
    from hyperrag.model.loading import load_embedder
    from hyperrag.model.prompts import RerankPrompt, RerankTemplate

    llm, model = build_model(settings, args.layers, args.rank, args.alpha)
    tokenizer = llm.tokenizer
    prompt = RerankPrompt(tokenizer, RerankTemplate.for_tokenizer(tokenizer), settings.max_doc_tokens,
                          settings.max_question_tokens)
    head = model.get_base_model().lm_head.weight.detach()
    score_vec = (head[prompt.yes_id] - head[prompt.no_id]).clone()
    exclude = used_titles([str(settings.folder("adapter")), "hyperrag/shipped/gemma3-270m-lora"])
    articles = pick_articles(settings.cache_dir, exclude, args.articles, args.seed)
    texts, pairs = make_pairs(articles, load_embedder(settings.embedder, settings.cache_dir, "cpu"),
                              args.negatives, args.seed)
    groups = by_paragraph(pairs, args.per_doc)
    if args.max_docs:
        groups = groups[: args.max_docs]
    log.info("%d articles, %d paragraphs, %d pairs (%d positive), %d groups; data %.0f s", len(articles), len(texts),
             len(pairs), sum(label for *_, label in pairs), len(groups), time.time() - t0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / len(groups)))
    start, history = 0, []
    if (ckpt / "state.pt").exists() and not args.fresh:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, history = state["step"], state["history"]
        log.info("resumed at group %d", start)
    model.train()
    t1 = time.time()
    for step in range(start, len(groups)):
        doc, questions = groups[step]
        scores = check_scores(model, prompt, score_vec, texts[doc], [q for q, _ in questions])
        loss = F.binary_cross_entropy_with_logits(scores, torch.tensor([float(y) for _, y in questions]))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        if (step + 1) % args.save_every == 0 or step + 1 == len(groups):
            from peft import get_peft_model_state_dict
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1, "history": history}, ckpt / "state.pt")
            log.info("group %d/%d loss %.4f (last %d) %.2f s/group", step + 1, len(groups),
                     float(np.mean(history[-args.save_every:])), args.save_every, (time.time() - t1) / (step + 1 - start))
    model.save_pretrained(out)
    meta = {
        "engine_model_id": settings.model, "adapter_hash": adapter_hash(settings.folder("adapter")),
        "data": "SQuAD v1.1 train (CC BY-SA 4.0)", "articles": [a["title"] for a in articles],
        "pairs": len(pairs), "groups": len(groups), "hyperparameters": {k: v for k, v in vars(args).items() if k != "out"},
        "loss_curve": [round(float(np.mean(history[i : i + 50])), 4) for i in range(0, len(history), 50)],
        "train_seconds": round(time.time() - t1), "total_seconds": round(time.time() - t0),
    }
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=1))
    return meta


if __name__ == "__main__":
    main()
