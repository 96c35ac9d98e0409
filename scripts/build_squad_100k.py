"""A 100,000-passage corpus from all of SQuAD v1.1, made the way a user's own files are.

Every dev, then train, article is written as a .txt file (paragraphs apart by a blank line) and
``python -m hyperrag.ingest`` cuts the files into passages of ``--max-tokens`` reranker tokens;
ingest stops at the corpus limit of 100,000 passages. SQuAD's text alone is ~3.4M tokens, so
100,000 passages means short ones (sentence-sized at 40 tokens). ``--questions`` dev questions,
drawn with a seed, become ``queries.jsonl``: a question's gold passages are those whose source
span holds its whole answer. Every passage's source span is checked to slice back to its text.

    ./run.sh python scripts/build_squad_100k.py            # -> corpora/squad-100k
    ./run.sh bench --corpus corpora/squad-100k --queries 40 --no-zero-shot
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from hyperrag.data.ingest import ingest, load_tokenizer
from hyperrag.common.memory import peak_resident_bytes
from hyperrag.common.settings import Settings, corpus_out
from hyperrag.data.squad import load_squad


def write_articles(folder: Path, cache_dir: str) -> list[dict]:
    """One .txt file per article; returns every dev question with its answers' offsets in its file."""
    questions = []
    for split in ("dev", "train"):
        for n, article in enumerate(load_squad(split, cache_dir)):
            name, text = f"{split}-{n:03d}.txt", ""
            for para in article["paragraphs"]:
                offset = len(text)
                text += para["context"] + "\n\n"
                questions += [{"id": qa["id"], "question": qa["question"].strip(), "file": name,
                               "spans": [(offset + a["answer_start"], offset + a["answer_start"] + len(a["text"]), a["text"].strip())
                                         for a in qa["answers"]]}
                              for qa in para["qas"] if split == "dev"]
            (folder / name).write_text(text, encoding="utf-8")
    return questions


def gold_queries(questions: list[dict], passages: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` questions whose answer lies whole inside at least one passage, with those passages as gold."""
    by_file: dict[str, list[dict]] = {}
    for p in passages:
        by_file.setdefault(p["source"]["file"], []).append(p)
    out = []
    for q in random.Random(seed).sample(questions, len(questions)):
        gold = [p["id"] for p in by_file.get(q["file"], [])
                if any(p["source"]["start"] <= s and e <= p["source"]["end"] for s, e, _ in q["spans"])]
        if gold:
            out.append({"id": q["id"], "question": q["question"], "answers": list(dict.fromkeys(a for *_, a in q["spans"])),
                        "doc_ids": gold})
        if len(out) == n:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(corpus_out("squad-100k")))
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = Settings.from_env()
    with tempfile.TemporaryDirectory(prefix="squad-articles-") as tmp:
        questions = write_articles(Path(tmp), settings.cache_dir)
        t0 = time.perf_counter()
        report = ingest([tmp], args.out, load_tokenizer(settings.model, settings.cache_dir), args.max_tokens)
        seconds = time.perf_counter() - t0
        texts = {f.name: f.read_text(encoding="utf-8") for f in Path(tmp).iterdir()}
    wrong = [p["id"] for p in report.passages
             if texts[p["source"]["file"]][p["source"]["start"] : p["source"]["end"]] != p["text"]]
    queries = gold_queries(questions, report.passages, args.questions, args.seed)
    with open(Path(args.out) / "queries.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in queries)
    print(json.dumps({"passages": len(report.passages), "files": report.files, "ingest_s": round(seconds, 1),
                      "peak_rss_gb": round(peak_resident_bytes() / 2**30, 2), "queries": len(queries), "source_spans_wrong": len(wrong),
                      "max_tokens": args.max_tokens, "errors": report.errors}, indent=1))


if __name__ == "__main__":
    main()
