"""Prompt templates as token segments.

The reranker reads ``[prefix][document + tail][question][suffix]``. Everything fixed is put
before the question, so it lands in a cached KV: the prefix (instruction) is shared by all
documents and stored once; the tail (``"\\nQuestion:"``) is stored with each document. Only
``[question][suffix]`` is run per (question, document) pair, so the suffix is kept short.
Segments are tokenized separately and joined as ids, so both modes see identical tokens.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache

SYSTEM = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class RerankTemplate:
    """The reranker's prompt; its hash is part of every stored document KV's key."""

    instruction: str = "Does the document contain the answer to the question? Answer Yes or No."
    prefix: str = SYSTEM + "Document:"
    doc: str = "\n{text}"
    doc_tail: str = "\nQuestion:"
    question: str = " {question}"
    suffix: str = ASSISTANT
    yes: str = "Yes"
    no: str = "No"
    # The reader's prompt is the reranker's plus this cue: ``[prefix][doc][question][suffix]
    # Answer:`` -> `` <span><|im_end|>``. Sharing everything up to the suffix means one stored
    # document KV (and one adapter) serves both jobs; the answer starts with a space, as the
    # same words do inside the document, so a span of the document has the same tokens.
    answer_cue: str = "Answer:"
    answer_end: str = "<|im_end|>"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


EXAMPLE_DOC = ("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the "
               "company of Gustave Eiffel and completed in 1889 for the World's Fair.")


@dataclass(frozen=True)
class GenerateTemplate:
    """Answer prompt. Two worked examples teach a 135M model to answer with a short span
    (measured on 25 SQuAD questions with the gold paragraph: F1 0.13 -> 0.21, EM 0 -> 0.08)."""

    system: str = "Answer with a few words copied exactly from the documents."
    doc: str = "Document {i}: {text}\n"
    question: str = "Question: {question}"
    examples: tuple[tuple[str, str, str], ...] = (
        (EXAMPLE_DOC, "When was the Eiffel Tower completed?", "1889"),
        (EXAMPLE_DOC, "Who designed the Eiffel Tower?", "the company of Gustave Eiffel"),
    )


@dataclass(frozen=True)
class QueryTokens:
    ids: list[int]  # question + suffix
    truncated: bool  # the question was cut to the token limit


class RerankPrompt:
    """Token segments of a :class:`RerankTemplate` for one tokenizer, with length limits."""

    def __init__(self, tokenizer, template: RerankTemplate, max_doc_tokens: int, max_question_tokens: int):
        self.tokenizer = tokenizer
        self.template = template
        self.max_doc_tokens = max_doc_tokens
        self.max_question_tokens = max_question_tokens
        self.prefix_ids = self._encode(template.prefix.format(template.instruction))
        self.tail_ids = self._encode(template.doc_tail)
        self.suffix_ids = self._encode(template.suffix)
        yes, no = self._encode(template.yes), self._encode(template.no)
        if len(yes) != 1 or len(no) != 1:
            raise ValueError(f"yes/no words must be single tokens, got {yes} and {no}")
        self.yes_id, self.no_id = yes[0], no[0]
        self.answer_cue_ids = self._encode(template.answer_cue)
        end = self._encode(template.answer_end)
        if len(end) != 1:
            raise ValueError(f"the answer end must be a single token, got {end}")
        self.answer_end_id = end[0]
        self.doc_ids = lru_cache(maxsize=65536)(self._doc_ids)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def doc_truncated(self, text: str) -> bool:
        """Whether :meth:`doc_ids` cuts ``text`` at ``max_doc_tokens`` (a service says so)."""
        return len(self._encode(self.template.doc.format(text=text))) > self.max_doc_tokens

    def _doc_ids(self, text: str) -> tuple[int, ...]:
        """Document + tail tokens (the cached segment), the document cut to ``max_doc_tokens``."""
        body = self._encode(self.template.doc.format(text=text))[: self.max_doc_tokens]
        return tuple(body + self.tail_ids)

    def query(self, question: str) -> QueryTokens:
        ids = self._encode(self.template.question.format(question=question))
        truncated = len(ids) > self.max_question_tokens
        return QueryTokens(ids[: self.max_question_tokens] + self.suffix_ids, truncated)

    def read_query(self, question: str) -> QueryTokens:
        """The reader's run after the stored document: question, suffix and the answer cue."""
        query = self.query(question)
        return QueryTokens(query.ids + self.answer_cue_ids, query.truncated)

    def answer_ids(self, answer: str) -> list[int]:
        """A target answer as the reader emits it: `` {answer}`` then the end token."""
        return self._encode(" " + answer.strip()) + [self.answer_end_id]


class GenerationPrompt:
    """Token segments of the answer prompt: a fixed head (system + worked examples), the same
    for every question and so computed once, then the documents and the question."""

    def __init__(self, tokenizer, template: GenerateTemplate, max_doc_tokens: int):
        self.tokenizer = tokenizer
        self.template = template
        self.max_doc_tokens = max_doc_tokens
        head = "<|im_start|>system\n" + template.system + "<|im_end|>\n"
        head += "".join("<|im_start|>user\n" + self._body([d], q) + ASSISTANT + a + "<|im_end|>\n"
                        for d, q, a in template.examples)
        self.head_ids = self._encode(head + "<|im_start|>user\n")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _body(self, docs: list[str], question: str) -> str:
        listed = "".join(self.template.doc.format(i=i, text=t) for i, t in enumerate(docs, 1))
        return listed + self.template.question.format(question=question)

    def question_ids(self, question: str, docs: list[str]) -> list[int]:
        """Everything after the head: documents (each cut to ``max_doc_tokens``) and question."""
        cut = [self.tokenizer.decode(self._encode(t)[: self.max_doc_tokens]) for t in docs]
        return self._encode(self._body(cut, question) + ASSISTANT)
