"""Answer generation: greedy decoding over the top-n documents with a short answer prompt."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from hyperrag.decoder import Decoder
from hyperrag.models import LLM
from hyperrag.prompts import GenerateTemplate, generation_ids


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float


class Generator:
    """Greedy decoder with one preallocated KV buffer (thread-safe: one answer at a time)."""

    def __init__(self, llm: LLM, max_new_tokens: int = 24, max_doc_tokens: int = 448,
                 template: GenerateTemplate | None = None, max_prompt_tokens: int = 2048):
        self.llm = llm
        self.decoder = Decoder(llm.model)
        self.template = template or GenerateTemplate()
        self.max_new_tokens = max_new_tokens
        self.max_doc_tokens = max_doc_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.kv = self.decoder.new_kv(1, max_prompt_tokens + max_new_tokens)
        tok = llm.tokenizer
        self.stop_ids = {tok.eos_token_id, *tok.encode("\n", add_special_tokens=False)}
        self._lock = threading.Lock()

    def answer(self, question: str, docs: list[str]) -> Generation:
        ids = generation_ids(self.llm.tokenizer, self.template, question, docs, self.max_doc_tokens)
        ids = ids[-self.max_prompt_tokens :]
        t0 = time.perf_counter()
        with self._lock:
            new = self._greedy(ids)
        text = self.llm.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generation(text, len(ids), len(new), time.perf_counter() - t0)

    def _greedy(self, ids: list[int]) -> list[int]:
        device = self.decoder.device
        n = len(ids)
        hidden = self.decoder.forward(torch.tensor([ids], device=device), torch.arange(n, device=device)[None],
                                      self.kv, start=0, out_index=torch.tensor([n - 1], device=device))
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
