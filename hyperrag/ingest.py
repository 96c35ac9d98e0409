"""The command line: ``python -m hyperrag.ingest PATH... [--out DIR]``; exit 0 with passages, 2 without.

Without ``--out`` the corpus goes to ``corpora/<first path's name>`` (:func:`hyperrag.common.settings.corpus_out`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from hyperrag.data.corpus import MAX_FILE_BYTES
from hyperrag.data.ingest import ingest, load_tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from hyperrag.common.settings import Settings, default_cache_dir, corpus_out

    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="python -m hyperrag.ingest",
                                     description="Files, folders or .zip archives in; a passage corpus (DIR/docs.jsonl) out.")
    parser.add_argument("paths", nargs="+", help="files, folders or .zip archives")
    parser.add_argument("--out", default=None, help="corpus folder to write docs.jsonl into (default: corpora/<first path's name>)")
    parser.add_argument("--max-tokens", type=int, default=settings.max_doc_tokens, help="passage size limit in reranker tokens")
    parser.add_argument("--overlap", type=int, default=None, help="tokens shared by neighbouring passages (default: max-tokens/10)")
    parser.add_argument("--max-file-mb", type=float, default=MAX_FILE_BYTES / 2**20, help="larger files are refused")
    parser.add_argument("--model", default=settings.model, help="whose tokenizer sizes the passages (any --model form: packaged id, folder, .gguf)")
    parser.add_argument("--cache-dir", default=default_cache_dir())
    args = parser.parse_args(argv)
    args.out = args.out or corpus_out(Path(args.paths[0]).stem)
    tokenizer = load_tokenizer(args.model, args.cache_dir)
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings name no file; our errors do
    with tqdm(total=0, unit="file", desc="ingest", file=sys.stderr) as bar:
        def progress(done: int, total: int, label: str) -> None:
            bar.total = total
            bar.set_postfix_str(label[-40:], refresh=False)
            bar.update(done - bar.n)

        report = ingest(args.paths, args.out, tokenizer, args.max_tokens, args.overlap, progress,
                        max_file_bytes=int(args.max_file_mb * 2**20))
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    if not report.passages:
        print("no passages made: nothing written", file=sys.stderr)
        return 2
    print(f"{len(report.passages)} passages from {report.files} files -> {report.out}"
          f" ({len(report.errors)} errors, {len(report.notes)} notes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
