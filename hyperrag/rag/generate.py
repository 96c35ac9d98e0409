"""Answer generation: greedy decoding over the top-n documents with a short answer prompt."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from hyperrag.model.decoder import Decoder, LayerSync, causal_mask
from hyperrag.model.loading import LLM
from hyperrag.model.prompts import GenerateTemplate, GenerationPrompt


MIN_CHUNK_TOKENS = 64  # shorter prompts prefill in one piece: two threads would not pay


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float


class Generator:
    """Greedy decoder with one preallocated KV buffer (thread-safe: one answer at a time).

    The prompt's fixed head (instructions and worked examples) is computed once and stays in
    the buffer's first columns; each answer prefills only its documents and question."""

    def __init__(self, llm: LLM, max_new_tokens: int = 24, max_doc_tokens: int = 448,
                 template: GenerateTemplate | None = None, max_prompt_tokens: int = 2048, streams: int = 2):
        self.llm = llm
        self.decoder = Decoder(llm.model, llm.linear, llm.head_linear)
        self.prompt = GenerationPrompt(llm.tokenizer, template or GenerateTemplate(), max_doc_tokens)
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.kv = self.decoder.new_kv(1, max_prompt_tokens + max_new_tokens)
        head = self.prompt.head_ids
        self.head_len = len(head)
        self.decoder.forward(torch.tensor([head], device=self.decoder.device),
                             torch.arange(self.head_len, device=self.decoder.device)[None], self.kv, start=0)
        tok = llm.tokenizer
        self.stop_ids = {tok.eos_token_id, *tok.encode("\n", add_special_tokens=False)}
        self._lock = threading.Lock()
        # On CPU a long prompt prefills as two chunks at once (see LayerSync); one on GPU. The
        # first chunk gets a thread of its own: in a shared pool it could queue behind the chunk
        # that waits for it.
        cpu = self.decoder.device.type == "cpu" and streams > 1
        self._helper = cf.ThreadPoolExecutor(1, "hyperrag-prefill") if cpu else None

    def answer(self, question: str, docs: list[str]) -> Generation:
        ids = self.prompt.question_ids(question, docs)[-(self.max_prompt_tokens - self.head_len) :]
        t0 = time.perf_counter()
        with self._lock:
            new = self._greedy(ids)
        text = self.llm.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generation(text, self.head_len + len(ids), len(new), time.perf_counter() - t0)

    def _greedy(self, ids: list[int]) -> list[int]:
        """Prefill ``ids`` after the cached head, then decode greedily until a stop token."""
        device = self.decoder.device
        h, m = self.head_len, len(ids)
        hidden = self._prefill(ids, h)
        n = h + m
        new: list[int] = []
        for step in range(self.max_new_tokens):
            token = int(self.decoder.logits(hidden).argmax(-1))
            if token in self.stop_ids:
                break
            new.append(token)
            if step + 1 == self.max_new_tokens:
                break
            pos = torch.tensor([[n + step]], device=device)
            hidden = self.decoder.forward(torch.tensor([[token]], device=device), pos, self.kv, start=n + step)[:, -1]
        return new

    def _prefill(self, ids: list[int], start: int) -> torch.Tensor:
        """Run ``ids`` after column ``start``; the final hidden state of the last token. A long
        prompt runs as two chunks in two threads, the second attending over the first's K/V."""
        if self._helper is None or len(ids) < 2 * MIN_CHUNK_TOKENS:
            return self._run_chunk(ids, start)
        half = len(ids) // 2
        sync = LayerSync(self.decoder.n_layers)

        def first_chunk() -> None:
            try:
                self._run_chunk(ids[:half], start, sync.written)
            except BaseException:
                sync.fail()
                raise

        first = self._helper.submit(first_chunk)
        try:
            return self._run_chunk(ids[half:], start + half, sync.wait)
        finally:
            first.result()

    def _run_chunk(self, ids: list[int], start: int, after_kv: Callable[[int], None] | None = None) -> torch.Tensor:
        device, m = self.decoder.device, len(ids)
        return self.decoder.forward(torch.tensor([ids], device=device), torch.arange(start, start + m, device=device)[None],
                                    self.kv, start, causal_mask(m, start, device),
                                    out_index=torch.tensor([m - 1], device=device), after_kv=after_kv)
