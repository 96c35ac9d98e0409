"""Fine-tune a decoder LLM as HyperRAG's doc-first reranker and reader (one LoRA), on SQuAD v1.1 train.

    python -m hyperrag.train_reranker                       # the shipped adapter's recipe (SmolLM2-135M)
    python -m hyperrag.train_reranker --model gemma3-270m --out models/gemma3-270m-lora --init-adapter ''
                                                            # any supported model (--model as the engine's)
    python -m hyperrag.train_reranker --validate-only       # redo the tuning on held-out train articles
    python -m hyperrag.train_reranker --steps 4 --articles 2 --out /tmp/lora   # a smoke run

Data (SQuAD v1.1 **train** only, never dev): ``--articles`` train articles drawn with ``--seed``;
``--val-articles`` further train articles are held out to validate and to tune the optional
retriever-score fusion weight. A later stage on new articles moves ``--first-article`` along the
same shuffle and keeps the held-out ones with ``--val-start``. Every (training) paragraph is
embedded with our own retriever (MiniLM + faiss, cached in ``--data-dir``) and each anchor
question's top-``--mine-k`` paragraphs are its hard-negative pool (same article and the rest of
the sampled corpus).

One training step is one *group*: an anchor question, its gold paragraph and ``--docs - 1``
retrieved negatives (the ``--hard`` best-ranked ones plus a random draw from the rest of the
pool), and up to ``--questions`` questions whose gold paragraph is in the group (the anchor's
paragraph's questions first, then one per negative). Every question is scored against every
document of the group; loss = listwise softmax cross-entropy (the gold against the others) +
``--bce`` x pointwise BCE on the same scores (keeps them calibrated around 0). Negatives that
contain one of the question's answer strings are left out of both (likely false negatives).

The prompt is exactly the inference one (:class:`hyperrag.model.prompts.RerankPrompt`,
``[prefix][doc + tail][question][suffix]``, score = logit(Yes) - logit(No) at the last token).
Because the document comes first, its tokens do not depend on the question: each document is
run once per step with all the group's questions packed behind it, each question in its own
attention block at the positions it would have in a full prompt (block-diagonal mask). That is
the same computation as one full prompt per pair, several times cheaper. After training the
packed forward is checked against ``Reranker.score(..., "full")`` on the merged model.

Reading: each question's block in its gold document's row also carries the reader's cue and
the answer (``[...][suffix] Answer: <span><end>``, after the scored token, so the score is
unchanged); ``--answer-weight`` x the answer tokens' cross-entropy joins the loss. One stored
document KV then serves both jobs. Training starts from ``--init-adapter`` (the reranker-only
adapter) where its layers overlap; validation also tunes the reader's decoding (span-constrained
or free) and the selection weight of its answer rule (:func:`tune_reader`).

LoRA (peft) on the attention and MLP projections (by model family, :data:`LORA_TARGETS`) of the
top ``--lora-layers`` layers: the lower layers stay frozen, so no gradient flows through them. The
packed forward is the model's own (:func:`forward_packed`), so every family the engine runs trains. ``--compute bfloat16`` runs the forward
under bf16 autocast (LoRA weights and AdamW stay fp32): 1.3x faster per step on a CPU with AMX,
where the shipped adapter was trained. Checkpoints (adapter, optimizer, RNG,
loss log) go to ``<out>/checkpoint`` every ``--save-every`` steps; a rerun with the same folder
resumes there (``--fresh`` starts over). The finished adapter is ``<out>/adapter_model.safetensors``
+ ``adapter_config.json``, with training facts and validation metrics in ``<out>/hyperrag.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


import numpy as np
import torch
import torch.nn.functional as F

from hyperrag.model.loading import ADAPTER_META, adapter_meta
from hyperrag.model.prompts import RerankPrompt, RerankTemplate

log = logging.getLogger("hyperrag.train")
# LoRA targets by model family (config.model_type): attention and MLP projections.
ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = {family: ATTENTION_MLP for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")}


def lora_targets(model_type: str) -> str:
    """The projections that get LoRA in a model of this family."""
    if model_type not in LORA_TARGETS:
        raise SystemExit(f"no LoRA targets known for model type {model_type!r} (known: "
                         f"{', '.join(sorted(LORA_TARGETS))}): pass --targets")
    return ",".join(LORA_TARGETS[model_type])


# -- data -----------------------------------------------------------------------------------------

@dataclass
class TrainData:
    texts: list[str]  # paragraphs (training articles)
    short: list[str]  # the same, as the reranker sees them after --max-doc-tokens (lower case)
    questions: list[str]
    answers: list[list[str]]
    gold: list[int]  # paragraph index of each question
    by_doc: dict[int, list[int]]  # paragraph -> its usable questions (answer inside the truncated text)
    anchors: list[int]  # usable questions in training order (seeded)
    mined: dict[int, list[int]]  # anchor -> retrieved paragraphs, best first (gold included if found)
    articles: list[str]
    val_articles: list[str]


def article_split(count: int, n: int, n_val: int, seed: int, first: int = 0,
                  val_start: int = -1) -> tuple[list[int], list[int]]:
    """Indices of the training and validation articles among ``count``, in one seeded shuffle:
    training takes ``n`` from position ``first``, validation ``n_val`` from ``val_start`` (-1:
    right after the training ones). A later stage on new articles moves ``first`` and keeps
    ``val_start``, so it is chosen on the same held-out questions as the stages before it."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    val_start = first + n if val_start < 0 else val_start
    end = max(first + n, val_start + n_val)
    if end > count:
        raise ValueError(f"articles {first}-{end - 1} asked for, but the split has only {count}: "
                         f"lower --articles or move --first-article / --val-start")
    train, val = order[first : first + n], order[val_start : val_start + n_val]
    if set(train) & set(val):
        raise ValueError(f"training articles {first}-{first + n - 1} overlap validation articles "
                         f"{val_start}-{val_start + n_val - 1}: move --first-article or --val-start")
    return train, val


def pick_articles(args) -> tuple[list[dict], list[dict]]:
    from hyperrag.data.squad import load_squad

    articles = load_squad("train", args.cache_dir)
    train, val = article_split(len(articles), args.articles, args.val_articles, args.seed,
                               args.first_article, args.val_start)
    return [articles[i] for i in train], [articles[i] for i in val]


def cut_paragraphs(articles: list[dict], per_article: int) -> list[dict]:
    if not per_article:
        return articles
    return [{**a, "paragraphs": a["paragraphs"][:per_article]} for a in articles]


def indexed_articles(articles: list[dict], name: str, key_extra: list, args, embedder):
    """SQuAD articles as a corpus folder in ``--data-dir`` (named by their titles, written once)
    and its retrieval index (cached like the engine's)."""
    from hyperrag.data.corpus import load_corpus
    from hyperrag.rag.retrieval import DenseIndex
    from hyperrag.data.squad import articles_to_corpus, write_corpus

    key = hashlib.sha256(json.dumps([a["title"] for a in articles] + key_extra).encode()).hexdigest()[:12]
    folder = Path(args.data_dir) / f"{name}-{key}"
    if not (folder / "queries.jsonl").exists():
        write_corpus(folder, *articles_to_corpus(articles))
    corpus = load_corpus(folder)
    index = DenseIndex.load_or_build(corpus, embedder, "all-minilm-l6-v2", args.cache_dir,
                                     progress=_bar(f"embed {name} paragraphs"))
    return corpus, index


def prepare_data(args, prompt: RerankPrompt, embedder) -> TrainData:
    """Sampled train articles, their paragraph index (cached) and each anchor's mined pool."""
    train_articles, val_articles = pick_articles(args)
    train_articles = cut_paragraphs(train_articles, args.paragraphs_per_article)
    corpus, index = indexed_articles(train_articles, "train", [args.paragraphs_per_article], args, embedder)
    texts = [d.text for d in corpus.docs]
    row = {d.id: i for i, d in enumerate(corpus.docs)}
    tail = len(prompt.tail_ids)
    short = [prompt.tokenizer.decode(list(prompt.doc_ids(t))[:-tail]).lower() for t in texts]
    questions, answers, gold = [], [], []
    for q in corpus.queries:
        questions.append(q.question)
        answers.append([a for a in q.answers if a.strip()])
        gold.append(row[q.doc_ids[0]])
    usable = [i for i in range(len(questions)) if any(a.lower() in short[gold[i]] for a in answers[i])]
    by_doc: dict[int, list[int]] = {}
    for i in usable:
        by_doc.setdefault(gold[i], []).append(i)
    anchors = list(usable)
    random.Random(args.seed + 1).shuffle(anchors)
    anchors = anchors[: args.pool]
    mined_file = Path(corpus.root) / f"mined-{args.mine_k}-{args.seed}-{args.pool}.json"
    if mined_file.exists():
        mined = {int(k): v for k, v in json.loads(mined_file.read_text()).items()}
    else:
        vecs = embedder.encode([questions[i] for i in anchors], normalize_embeddings=True, convert_to_numpy=True,
                               batch_size=64, show_progress_bar=False).astype(np.float32)
        _, rows = index.index.search(vecs, min(args.mine_k, len(texts)))
        id_row = {doc_id: row[doc_id] for doc_id in index.doc_ids}
        mined = {a: [id_row[index.doc_ids[r]] for r in rs if r >= 0] for a, rs in zip(anchors, rows)}
        mined_file.write_text(json.dumps(mined))
    return TrainData(texts, short, questions, answers, gold, by_doc, anchors, mined,
                     [a["title"] for a in train_articles], [a["title"] for a in val_articles])


@dataclass
class Group:
    docs: list[int]  # paragraph indices; docs[0] is the anchor's gold
    questions: list[int]  # question indices; each one's gold is among docs
    target: list[int]  # per question: position of its gold in docs
    valid: torch.Tensor  # [Q, D] bool: pair used in the loss (gold, or a negative without the answer)


def make_group(data: TrainData, step: int, args) -> Group:
    """The training group of one step: a pure function of (seed, step), so resuming is exact."""
    rng = random.Random(args.seed * 1_000_003 + step)
    anchor = data.anchors[step % len(data.anchors)]
    gold = data.gold[anchor]
    pool = [d for d in data.mined[anchor] if d != gold]
    hard = pool[: args.hard]
    rest = pool[args.hard :]
    docs = [gold] + hard + rng.sample(rest, min(len(rest), args.docs - 1 - len(hard)))
    docs = docs[: args.docs]
    own = [q for q in data.by_doc.get(gold, []) if q != anchor]
    questions = [anchor] + rng.sample(own, min(len(own), args.gold_questions - 1))
    for d in docs[1:]:
        others = data.by_doc.get(d, [])
        if others and len(questions) < args.questions:
            questions.append(rng.choice(others))
    position = {d: j for j, d in enumerate(docs)}
    target = [position[data.gold[q]] for q in questions]
    valid = torch.ones(len(questions), len(docs), dtype=torch.bool)
    for i, q in enumerate(questions):
        for j, d in enumerate(docs):
            if j != target[i] and any(a.lower() in data.short[d] for a in data.answers[q]):
                valid[i, j] = False
    return Group(docs, questions, target, valid)


# -- the packed doc-first forward -----------------------------------------------------------------

@dataclass
class Packed:
    """A packed batch: one row per document (see :func:`packed_inputs`)."""

    ids: torch.Tensor  # [D, T]
    pos: torch.Tensor  # [D, T]
    mask: torch.Tensor  # [D, 1, T, T] bool
    last: torch.Tensor  # [D, Q]: each question block's scored (last suffix) token
    answer_at: torch.Tensor  # [A, 2]: (row, column) of hidden states that predict an answer token
    answer_ids: torch.Tensor  # [A]: the answer token each of them should predict


def packed_inputs(prompt: RerankPrompt, doc_texts: Sequence[str], questions: Sequence[str],
                  answers: dict[tuple[int, int], str] | None = None) -> Packed:
    """One row per document: ``[prefix][doc + tail][q1 + suffix][q2 + suffix]...``.

    Each question block sits at the positions it has in its own full prompt and attends to the
    prefix, the document and (causally) itself only, so every block's last hidden state equals a
    full prefill of ``[prefix][doc][question][suffix]``. ``answers[(doc, question)]`` appends the
    reader's cue and that answer to the block (after the scored token, so the score is
    unchanged): the block is then the reader's prompt and its target, ``[...][suffix] Answer:
    <span><end>``, and the hidden states before each answer token are trained to predict it.
    """
    answers = answers or {}
    queries = [prompt.query(q).ids for q in questions]
    rows, blocks, lasts, positions, targets = [], [], [], [], []
    for d, text in enumerate(doc_texts):
        head = prompt.prefix_ids + list(prompt.doc_ids(text))
        ids, block, pos, last = list(head), [0] * len(head), list(range(len(head))), []
        for b, q in enumerate(queries, 1):
            first = len(ids)
            ids += q
            last.append(len(ids) - 1)
            if (d, b - 1) in answers:
                target = prompt.answer_ids(answers[(d, b - 1)])
                ids += prompt.answer_cue_ids
                targets += [(d, len(ids) - 1 + j, t) for j, t in enumerate(target)]
                ids += target[:-1]  # the end token is only predicted
            block += [b] * (len(ids) - first)
            pos += range(len(head), len(head) + len(ids) - first)
        rows.append(ids), blocks.append(block), positions.append(pos), lasts.append(last)
    width = max(len(r) for r in rows)
    n = len(rows)
    ids = torch.zeros(n, width, dtype=torch.long)
    pos = torch.zeros(n, width, dtype=torch.long)
    blk = torch.full((n, width), len(queries) + 1, dtype=torch.long)  # padding: its own block
    for r in range(n):
        k = len(rows[r])
        ids[r, :k] = torch.tensor(rows[r])
        pos[r, :k] = torch.tensor(positions[r])
        blk[r, :k] = torch.tensor(blocks[r])
    t = torch.arange(width)
    causal = t[None, :] <= t[:, None]  # [T(query), T(key)]
    same = (blk[:, None, :] == 0) | (blk[:, None, :] == blk[:, :, None])  # [D, Tq, Tk]
    mask = (causal[None] & same)[:, None]
    at = torch.tensor([(r, c) for r, c, _ in targets], dtype=torch.long).reshape(-1, 2)
    return Packed(ids, pos, mask, torch.tensor(lasts), at, torch.tensor([t for *_, t in targets], dtype=torch.long))


def packed_masks(model, packed: Packed) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed batch's attention mask as the model's own forward takes it: one bool 4D mask
    (True = attend), or, for a model with sliding-window layers (Gemma 3), one per layer type,
    the sliding one also cut to the window measured in positions (each block's distance to the
    document is what it is in its own full prompt)."""
    cfg = model.config
    if "sliding_attention" not in (getattr(cfg, "layer_types", None) or ()):
        return packed.mask
    near = (packed.pos[:, :, None] - packed.pos[:, None, :]) < cfg.sliding_window  # [D, Tq, Tk]
    return {"full_attention": packed.mask, "sliding_attention": packed.mask & near[:, None]}


def forward_packed(model, score_vec: torch.Tensor, packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [D, Q] and answer-token logits [A, vocab] of a packed batch through a (LoRA-wrapped)
    ``*ForCausalLM`` of any supported family: its own forward (embedding scale, norms, RoPE per
    layer type, q/k norms are the model's), with the block-diagonal mask and explicit positions."""
    body = model.model
    hidden = body(input_ids=packed.ids, position_ids=packed.pos, attention_mask=packed_masks(model, packed),
                  use_cache=False).last_hidden_state  # after the final norm
    picked = hidden[torch.arange(packed.ids.shape[0])[:, None], packed.last]  # [D, Q, H]
    scores = picked @ score_vec.to(picked.dtype)
    logits = model.lm_head(hidden[packed.answer_at[:, 0], packed.answer_at[:, 1]])
    return scores, logits


def group_answers(data: TrainData, group: Group) -> dict[tuple[int, int], str]:
    """The reading targets of a group: each question's first answer found in its gold document
    (as the reranker sees it), to be read from that document's row."""
    out = {}
    for i, q in enumerate(group.questions):
        d = group.target[i]
        found = [a for a in data.answers[q] if a.lower() in data.short[group.docs[d]]]
        if found:
            out[(d, i)] = found[0]
    return out


def group_loss(scores_dq: torch.Tensor, answer_logits: torch.Tensor, answer_ids: torch.Tensor, group: Group,
               args) -> tuple[torch.Tensor, dict]:
    """Relevance (listwise CE + ``--bce`` x pointwise BCE) + ``--answer-weight`` x the answer
    tokens' cross-entropy."""
    bce_weight = args.bce
    s = scores_dq.T  # [Q, D]
    target = torch.tensor(group.target)
    masked = s.masked_fill(~group.valid, float("-inf"))
    ce = F.cross_entropy(masked, target)
    labels = torch.zeros_like(s)
    labels[torch.arange(len(target)), target] = 1.0
    bce = F.binary_cross_entropy_with_logits(s[group.valid], labels[group.valid])
    loss = ce + bce_weight * bce
    info = {"ce": ce.item(), "bce": bce.item()}
    if len(answer_ids):
        read = F.cross_entropy(answer_logits, answer_ids)
        loss = loss + args.answer_weight * read
        info["read"] = read.item()
        info["read_acc"] = (answer_logits.argmax(-1) == answer_ids).float().mean().item()
    with torch.no_grad():
        info["top1"] = (masked.argmax(1) == target).float().mean().item()
    return loss, info


# -- model, checkpoints ---------------------------------------------------------------------------

def build_model(args, base_folder: Path, base_model: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # sdpa: the packed forward's bool 4D masks (eager attention would add them as numbers)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32, attn_implementation="sdpa")
    n_layers = model.config.num_hidden_layers
    k = min(args.lora_layers or n_layers, n_layers)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=list(args.targets.split(",")),
                        layers_to_transform=list(range(n_layers - k, n_layers)),
                        layers_pattern="layers", bias="none", base_model_name_or_path=base_model)
    model = get_peft_model(model, config)
    if args.init_adapter:  # warm start: an earlier adapter's LoRA weights where its layers overlap
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(Path(args.init_adapter) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise SystemExit(f"{args.init_adapter}: LoRA weights for modules this model lacks: {result.unexpected_keys[:3]}")
    return model


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(folder: Path, model, optimizer, step: int, history: list[dict], config: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "lora": trainable_state(model), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "config": config}, tmp / "state.pt")
    (tmp / "history.json").write_text(json.dumps(history))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, model, optimizer, config: dict) -> tuple[int, list[dict]]:
    state = torch.load(folder / "state.pt", weights_only=False)
    saved = {**LATER_KEYS, **state["config"]}
    changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
    if changed:
        raise SystemExit(f"{folder}: checkpoint was made with other settings {changed}; use --fresh or another --out")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state["lora"].items():
            params[k].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], json.loads((folder / "history.json").read_text())


def _bar(desc: str):
    from tqdm import tqdm

    bar: dict = {}

    def progress(done: int, total: int) -> None:
        if "b" not in bar:
            bar["b"] = tqdm(total=total, desc=desc, mininterval=5)
        bar["b"].update(done - bar["b"].n)
        if done >= total:
            bar["b"].close()

    return progress


# -- checks and validation ------------------------------------------------------------------------

def adapter_settings(args, out: Path, **changes):
    """The engine's default settings for the adapter in ``out``, on the CPU in fp32: how the
    training checks and validates what it wrote."""
    from hyperrag.common.settings import Settings

    return Settings(model=args.model, cache_dir=args.cache_dir, device="cpu", dtype="float32", adapter=str(out),
                    **changes)


def check_against_reranker(args, model, prompt: RerankPrompt, score_vec, data: TrainData, out: Path) -> dict:
    """Packed training forward (LoRA unmerged) vs ``Reranker.score(..., "full")`` on the merged
    model loaded the way the engine loads it: same tokens, same scores."""
    from hyperrag.rag.runtime import load_reranker

    reranker = load_reranker(adapter_settings(args, out, max_doc_tokens=prompt.max_doc_tokens,
                                              max_question_tokens=prompt.max_question_tokens, batch_size=4),
                             template=prompt.template)
    llm = reranker.llm
    group = make_group(data, 0, args)
    docs = [data.texts[d] for d in group.docs[:3]]
    questions = [data.questions[q] for q in group.questions[:2]]
    model.eval()
    with torch.no_grad():
        packed = forward_packed(model.get_base_model(), score_vec, packed_inputs(prompt, docs, questions))[0].T
        merged_packed = forward_packed(llm.model, score_vec, packed_inputs(prompt, docs, questions))[0].T
    full = torch.tensor([reranker.score(q, docs, "full").scores for q in questions])
    return {"pairs": full.numel(),
            "max_diff_train_forward_vs_reranker_full": (packed - full).abs().max().item(),
            "max_diff_merged_packed_vs_reranker_full": (merged_packed - full).abs().max().item()}


def validate(args, out: Path, embedder) -> dict:
    """Held-out train articles: retrieval vs the trained reranker (engine settings), and the fusion
    weight ``w`` (score + w * cosine) that maximizes MRR@10 there."""
    from hyperrag.evaluate import SystemRun, rerank_scores, retrieve, ranking_summary
    from hyperrag.kv.local import LocalKV
    from hyperrag.rag.rerank import fuse_scores
    from hyperrag.rag.runtime import load_reranker

    _, val_articles = pick_articles(args)
    corpus, index = indexed_articles(val_articles, "val", [], args, embedder)
    s = adapter_settings(args, out)
    cands = retrieve(index, corpus.sample_queries(args.val_questions, args.seed), s.top_k)
    reranker = load_reranker(s)
    kv = LocalKV()
    scores = rerank_scores(reranker, cands, corpus.by_id, "reuse", kv, progress=_bar("validate"))
    cos = [c.cosine for c in cands]
    result = {"articles": [a["title"] for a in val_articles], "paragraphs": len(corpus.docs),
              "questions": len(cands), "top_k": s.top_k,
              "retrieval": ranking_summary(SystemRun("retrieval", cos), cands),
              "trained": ranking_summary(SystemRun("trained", scores), cands)}
    grid = [0.0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 100]
    fused = {w: ranking_summary(SystemRun("f", [fuse_scores(sc, cs, w) for sc, cs in zip(scores, cos)]), cands)
             for w in grid}
    best = max(grid, key=lambda w: (fused[w]["mrr@10"], -w))
    result["fusion_grid"] = {str(w): {k: round(v, 4) for k, v in m.items()} for w, m in fused.items()}
    result["retrieval_weight"] = best
    if args.answer_weight:
        ranked = [fuse_scores(sc, c.cosine, best) for sc, c in zip(scores, cands)]
        result["reader"] = tune_reader(reranker, cands, ranked, corpus.by_id, kv, s)
    return result


SELECTION_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 1000.0)


def tune_reader(reranker, cands, ranked: list[list[float]], by_id: dict, kv, s) -> dict:
    """Span-constrained vs free decoding, and the selection weight ``w`` (ranking score + w x
    answer log-likelihood), by answer F1 on the held-out train questions: the reader reads each
    question's top-n once per decoding, and every ``w`` picks among the same candidates."""
    from hyperrag.rag.metrics import exact_match, f1_score
    from hyperrag.rag.reader import Reader, select

    grid: dict[str, dict] = {}
    for span in (True, False):
        reader = Reader(reranker.runner, max_rows=s.top_n, max_new_tokens=s.max_new_tokens, span=span, prune=False,
                        first_tokens=s.reader_first_tokens)
        readings = []
        bar = _bar(f"reader ({'span' if span else 'free'})")
        for i, (c, sc) in enumerate(zip(cands, ranked)):
            top = sorted(range(len(sc)), key=lambda j: -sc[j])[: s.top_n]
            tops = [sc[j] for j in top]
            readings.append((reader.read(c.question, [by_id[c.doc_ids[j]].text for j in top], tops, "kv", kv).candidates,
                             tops))
            bar(i + 1, len(cands))
        for w in SELECTION_GRID:
            answers = [cs[select(cs, tops, w)].text if cs else "" for cs, tops in readings]
            grid[f"{'span' if span else 'free'} w={w:g}"] = {
                "span": span, "weight": w,
                "f1": sum(f1_score(a, c.answers) for a, c in zip(answers, cands)) / len(cands),
                "em": sum(exact_match(a, c.answers) for a, c in zip(answers, cands)) / len(cands)}
    best = max(grid.values(), key=lambda r: (r["f1"], r["span"], -r["weight"]))
    return {"questions": len(cands), "top_n": s.top_n, "grid": grid, "span": best["span"],
            "selection_weight": best["weight"], "f1": best["f1"], "em": best["em"]}


# -- main -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from hyperrag.common.settings import REPO_ROOT, SHIPPED_ADAPTER, default_cache_dir

    p = argparse.ArgumentParser(prog="python -m hyperrag.train_reranker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(SHIPPED_ADAPTER),
                   help="adapter folder (checkpoints in <out>/checkpoint; default: the shipped one)")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="model and SQuAD cache (as the engine's)")
    p.add_argument("--data-dir", default="",
                   help="mined training data and indexes (default <cache-dir>/train-reranker)")
    p.add_argument("--model", default="smollm2-135m",
                   help="base model: a packaged id (hyperrag.model.loading.MODELS), a Hugging Face folder, "
                        "a .gguf file or a Hub id where the network allows it")
    p.add_argument("--seed", type=int, default=0, help="seeds article choice, data order, LoRA init")
    d = p.add_argument_group("data")
    d.add_argument("--articles", type=int, default=48, help="SQuAD train articles to train on")
    d.add_argument("--paragraphs-per-article", type=int, default=0, help="cap per article (0 = all; for tiny runs)")
    d.add_argument("--first-article", type=int, default=0,
                   help="train on the shuffled articles from this one on (a later stage on new articles)")
    d.add_argument("--val-articles", type=int, default=3, help="further train articles held out for validation")
    d.add_argument("--val-start", type=int, default=-1,
                   help="the held-out articles' first position in the shuffle (-1: right after the training ones)")
    d.add_argument("--val-questions", type=int, default=80, help="validation questions (0 = skip validation)")
    d.add_argument("--pool", type=int, default=600, help="anchor questions mined (one anchor per step)")
    d.add_argument("--mine-k", type=int, default=30, help="retrieved paragraphs per anchor (negative pool)")
    d.add_argument("--docs", type=int, default=4, help="documents per group: the gold + docs-1 negatives")
    d.add_argument("--hard", type=int, default=2, help="of which the retriever's best-ranked non-gold ones")
    d.add_argument("--questions", type=int, default=8, help="questions per group (each scored on every doc)")
    d.add_argument("--gold-questions", type=int, default=4, help="of which questions of the anchor's paragraph")
    d.add_argument("--max-doc-tokens", type=int, default=256, help="document truncation in training")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps (one group each)")
    t.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (AdamW; warmup then cosine to 10%%)")
    t.add_argument("--warmup", type=int, default=10, help="warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--rank", type=int, default=16, help="LoRA rank")
    t.add_argument("--alpha", type=float, default=32, help="LoRA alpha")
    t.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    t.add_argument("--lora-layers", type=int, default=20, help="LoRA on the top N layers (0 = all)")
    t.add_argument("--answer-weight", type=float, default=1.0,
                   help="weight of the reading loss (answer tokens after the answer cue, gold document); "
                        "0 trains the reranker alone")
    t.add_argument("--init-adapter", default=str(REPO_ROOT / "models" / "reranker-lora"),
                   help="start from this adapter's LoRA weights where its layers overlap ('' = fresh init)")
    t.add_argument("--targets", default="", help="projections that get LoRA (default: by model family, LORA_TARGETS)")
    t.add_argument("--bce", type=float, default=0.5, help="weight of the pointwise BCE term")
    t.add_argument("--save-every", type=int, default=5, help="checkpoint every N steps")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    t.add_argument("--compute", choices=("float32", "bfloat16"), default="float32",
                   help="forward precision: bfloat16 autocast (LoRA weights and optimizer stay fp32); 1.3x "
                        "faster per step on a CPU that multiplies bf16 in hardware (AMX), measured")
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--no-check", action="store_true", help="skip the train-vs-reranker score check")
    t.add_argument("--validate-only", action="store_true",
                   help="no training: validate the adapter in --out and update its hyperrag.json "
                        "(fusion weight, reader decoding and selection weight)")
    return p


# Settings a checkpoint must agree with to be resumed (--steps may grow: train longer).
CONFIG_KEYS = ("seed", "articles", "paragraphs_per_article", "pool", "mine_k", "docs", "hard", "questions",
               "gold_questions", "max_doc_tokens", "lr", "warmup", "weight_decay", "rank", "alpha",
               "dropout", "lora_layers", "targets", "bce", "model", "answer_weight", "init_adapter",
               "first_article", "compute")
# Keys added after checkpoints already existed, with the value those checkpoints were made with.
LATER_KEYS = {"first_article": 0, "compute": "float32"}


def main(argv: Sequence[str] | None = None) -> dict:
    from hyperrag.model.loading import load_embedder
    from hyperrag.common.settings import existing_folder

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.data_dir = args.data_dir or str(Path(args.cache_dir) / "train-reranker")
    out = Path(args.out)
    if args.validate_only:
        return record_validation(args, out, {**adapter_meta(out)}, load_embedder("all-minilm-l6-v2", args.cache_dir, "cpu"))
    if args.init_adapter:  # its default is a checkout's folder: say so now, not at the LoRA load
        existing_folder(args.init_adapter, "--init-adapter", "an adapter folder to start from, or '' for a fresh LoRA init")
    ckpt = out / "checkpoint"
    t_start = time.perf_counter()

    source, base_model, model_hash = base_model_source(args)
    config = {k: getattr(args, k) for k in CONFIG_KEYS}  # what a resumed checkpoint must match
    model = build_model(args, source.folder, base_model)
    template, prompt, score_vec = score_head(model, source.folder, args)

    embedder = load_embedder("all-minilm-l6-v2", args.cache_dir, "cpu")
    t_data = time.perf_counter()
    data = prepare_data(args, prompt, embedder)
    data_s = time.perf_counter() - t_data
    log.info("data: %d articles, %d paragraphs, %d usable questions, %d anchors mined (%.0fs)",
             len(data.articles), len(data.texts), sum(len(v) for v in data.by_doc.values()), len(data.anchors), data_s)

    params, optimizer, step, history, resumed_from = resume_optimizer(args, model, ckpt, config)
    step = train_steps(args, model, prompt, score_vec, data, params, optimizer, step, history, ckpt, config)
    train_s = sum(r["seconds"] for r in history)
    save_adapter(model, out, base_model)
    summary = {
        "base_model": base_model, "engine_model_id": args.model,
        "model_hash": model_hash, "license": source.license or "see the base model",
        "data": "SQuAD v1.1 train (CC BY-SA 4.0)", "train_articles": data.articles,
        "train_paragraphs": len(data.texts), "val_articles": data.val_articles,
        "hyperparameters": {**config, "steps": args.steps}, "steps": step, "resumed_from_step": resumed_from,
        "train_seconds": round(train_s, 1), "data_seconds": round(data_s, 1),
        "pairs_seen": sum(r["pairs"] for r in history),
        "questions_seen": sum(r.get("questions", args.questions) for r in history),
        "loss_curve": loss_curve(history), "template_digest": template.digest,
    }
    if not args.no_check:
        summary["check"] = check_against_reranker(args, model, prompt, score_vec, data, out)
        log.info("check: %s", summary["check"])
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return record_validation(args, out, summary, embedder)


def base_model_source(args):
    """The base model's folder, public name and weights hash, refused early when it cannot be
    trained (an init adapter made for other weights, a final logit soft cap); fills in the LoRA
    targets of its family when ``--targets`` is not given."""
    from hyperrag.model.loading import check_adapter, resolve_model, weights_hash

    source = resolve_model(args.model, args.cache_dir)
    base_model = source.base_model or args.model
    model_hash = weights_hash(source.folder, args.cache_dir)
    if args.init_adapter:
        check_adapter(args.init_adapter, source, model_hash)
    model_config = json.loads((source.folder / "config.json").read_text())
    if model_config.get("final_logit_softcapping"):  # the score is a difference of two linear logits
        raise SystemExit(f"{args.model}: training a model with a final logit soft cap is not supported")
    args.targets = args.targets or lora_targets(model_config["model_type"])
    return source, base_model, model_hash


def score_head(model, folder: Path, args) -> tuple[RerankTemplate, RerankPrompt, torch.Tensor]:
    """The reranker's template and prompt for this tokenizer, and the score direction: the LM
    head's Yes row minus its No row (the score is logit(yes) - logit(no))."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = RerankTemplate.for_tokenizer(tokenizer)
    prompt = RerankPrompt(tokenizer, template, args.max_doc_tokens, 64)
    lm = model.get_base_model()
    head = lm.lm_head.weight.detach()
    score_vec = (head[prompt.yes_id] - head[prompt.no_id]).clone()
    return template, prompt, score_vec


def resume_optimizer(args, model, ckpt: Path, config: dict):
    """The trainable LoRA parameters and their optimizer, at the checkpoint's step when there is
    one (``--fresh`` removes it first): (params, optimizer, step, history, resumed_from)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    step, history, resumed_from = 0, [], 0
    if args.fresh:
        shutil.rmtree(ckpt, ignore_errors=True)
    if (ckpt / "state.pt").exists():
        step, history = load_checkpoint(ckpt, model, optimizer, config)
        resumed_from = step
        log.info("resumed from %s at step %d", ckpt, step)
    n_params = sum(p.numel() for p in params)
    log.info("LoRA: %d trainable parameters (rank %d, top %s layers)", n_params, args.rank, args.lora_layers or "all")
    return params, optimizer, step, history, resumed_from


def train_steps(args, model, prompt: RerankPrompt, score_vec: torch.Tensor, data: TrainData, params, optimizer,
                step: int, history: list[dict], ckpt: Path, config: dict) -> int:
    """Optimizer steps from ``step`` to ``--steps``, one group each, appending a record per step
    to ``history`` and checkpointing every ``--save-every`` steps; returns the last step."""
    from tqdm import tqdm

    lm = model.get_base_model()
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=5)
    while step < args.steps:
        t0 = time.perf_counter()
        group = make_group(data, step, args)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args)
        inputs = packed_inputs(prompt, [data.texts[d] for d in group.docs],
                               [data.questions[q] for q in group.questions],
                               group_answers(data, group) if args.answer_weight else None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.compute == "bfloat16"):
            scores, answer_logits = forward_packed(lm, score_vec, inputs)
        loss, info = group_loss(scores.float(), answer_logits.float(), inputs.answer_ids, group, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        optimizer.step()
        step += 1
        record = {"step": step, "loss": loss.item(), **info, "lr": lr_at(step - 1, args), "grad_norm": grad_norm,
                  "pairs": int(group.valid.sum()), "questions": len(group.questions),
                  "tokens": int(inputs.ids.numel()), "answer_tokens": len(inputs.answer_ids), "seconds": time.perf_counter() - t0}
        history.append(record)
        recent = history[-10:]
        bar.set_postfix(loss=f"{sum(r['loss'] for r in recent) / len(recent):.3f}",
                        top1=f"{sum(r['top1'] for r in recent) / len(recent):.2f}")
        bar.update(1)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(ckpt, model, optimizer, step, history, config)
    bar.close()
    return step


def save_adapter(model, out: Path, base_model: str) -> None:
    """The adapter itself (merged by hyperrag.model.loading.load_llm at inference), beside our own
    model card."""
    model.eval()
    card = (out / "README.md").read_bytes() if (out / "README.md").exists() else None
    model.save_pretrained(out)
    if card is not None:  # peft writes a generic card; keep ours
        (out / "README.md").write_bytes(card)
    config_file = out / "adapter_config.json"  # name the public base model, not this machine's cache path
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": base_model}, indent=2, sort_keys=True))


def record_validation(args, out: Path, summary: dict, embedder) -> dict:
    """Validate (when asked) and write the adapter's ``hyperrag.json``: the tuned fusion weight,
    the reader's decoding and selection weight are read from it by the engine."""
    if args.val_questions and args.val_articles:
        summary["validation"] = validation = validate(args, out, embedder)
        summary["retrieval_weight"] = validation["retrieval_weight"]
        if "reader" in validation:
            summary["selection_weight"] = validation["reader"]["selection_weight"]
            summary["reader_span"] = validation["reader"]["span"]
        log.info("validation: retrieval %s | trained %s | best fusion w=%s | reader %s",
                 validation["retrieval"], validation["trained"], summary["retrieval_weight"],
                 {k: v for k, v in validation.get("reader", {}).items() if k != "grid"})
    (out / ADAPTER_META).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("train_articles", "loss_curve")}, indent=1))
    return summary


def loss_curve(history: list[dict], points: int = 12) -> list[dict]:
    """Mean loss / CE / top-1 over consecutive windows of steps (the model card's curve)."""
    if not history:
        return []
    size = max(1, math.ceil(len(history) / points))
    out = []
    for start in range(0, len(history), size):
        w = history[start : start + size]
        out.append({"steps": f"{w[0]['step']}-{w[-1]['step']}",
                    **{k: round(sum(r.get(k, 0.0) for r in w) / len(w), 4)
                       for k in ("loss", "ce", "bce", "top1", "read", "read_acc")}})
    return out


if __name__ == "__main__":
    main()
