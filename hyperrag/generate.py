"""Answer generation: greedy decoding over the top-n documents with a short answer prompt."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from hyperrag.decoder import Decoder, causal_mask
from hyperrag.models import LLM
from hyperrag.prompts import GenerateTemplate, GenerationPrompt


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
                 template: GenerateTemplate | None = None, max_prompt_tokens: int = 2048):
        self.llm = llm
        self.decoder = Decoder(llm.model)
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
        hidden = self.decoder.forward(torch.tensor([ids], device=device), torch.arange(h, h + m, device=device)[None],
                                      self.kv, start=h, mask=causal_mask(m, h, device),
                                      out_index=torch.tensor([m - 1], device=device))
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
