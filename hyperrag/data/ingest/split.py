"""Passages sized in the reranker's own tokenizer, cut by semantic-text-splitter.

The splitter counts a chunk on its own; the engine counts ``"\n" + chunk`` and cuts at
``max_doc_tokens``. A small margin covers the difference, and every passage is counted again the
engine's way: if one is still over, the capacity shrinks by the excess and the text is cut again.
"""
from __future__ import annotations

MARGIN = 4  # tokens kept free under max_tokens


class Splitter:
    """Cuts text at paragraph, then sentence, then word boundaries into passages that fit the reranker."""

    def __init__(self, tokenizer, max_tokens: int, overlap: int):
        from tokenizers import Tokenizer

        if max_tokens < 4 * MARGIN or not 0 <= overlap < max_tokens // 2:
            raise ValueError(f"need max_tokens >= {4 * MARGIN} and 0 <= overlap < max_tokens/2, got {max_tokens}, {overlap}")
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers wraps a tokenizers.Tokenizer
        self.tokenizer = Tokenizer.from_str(backend.to_str())  # a copy, so truncation/padding can be off
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_tokens, self.overlap = max_tokens, overlap
        self._splitters: dict[tuple[bool, int], object] = {}

    def count(self, text: str) -> int:
        """Tokens exactly as the engine counts a document: ``"\\n" + text``, no special tokens."""
        return len(self.tokenizer.encode("\n" + text, add_special_tokens=False).ids)

    def split(self, text: str, markdown: bool = False) -> list[tuple[int, int, str]]:
        """(start, end, passage) with ``text[start:end] == passage``; capacity shrinks until all fit."""
        from semantic_text_splitter import MarkdownSplitter, TextSplitter

        capacity = self.max_tokens - MARGIN
        while True:
            key = (markdown, capacity)
            if key not in self._splitters:
                kind = MarkdownSplitter if markdown else TextSplitter
                self._splitters[key] = kind.from_huggingface_tokenizer(self.tokenizer, capacity, min(self.overlap, capacity // 2))
            chunks = self._splitters[key].chunk_indices(text)
            over = max((self.count(c) for _, c in chunks), default=0) - self.max_tokens
            if over <= 0:
                return [(start, start + len(chunk), chunk) for start, chunk in chunks]
            capacity -= over
            if capacity < MARGIN:
                raise ValueError(f"cannot cut text into passages of {self.max_tokens} tokens")

