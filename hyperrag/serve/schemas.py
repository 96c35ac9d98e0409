"""Request and response bodies of the HTTP service (pydantic: the 422 messages and /docs come from them).

The rerank bodies follow the schemas RAG stacks already send: Cohere v1/v2, Jina and vLLM
(``query``, ``documents`` as strings or ``{"text"}`` objects, ``top_n``, ``return_documents``)
and TEI (``query``, ``texts``, ``return_text``, ``raw_scores``). Fields those clients add that
the service has no use for (``model``, ``max_tokens_per_doc``, ``truncate``...) are accepted and
ignored, so a stock client works unchanged.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("query", check_fields=False)
    @classmethod
    def _query_not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("the query is empty")
        return query


class Document(BaseModel):
    text: str


class RerankRequest(_Body):
    query: str = Field(min_length=1, description="the question the documents are ranked for")
    documents: list[str | Document] = Field(min_length=1, description="texts, or objects with a text field")
    top_n: int | None = Field(None, ge=1, description="return only the best top_n (default: all)")
    return_documents: bool = Field(False, description="echo each document's text in its result")
    model: str | None = Field(None, description="accepted for client compatibility; the loaded model answers")

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Document | None = None


class KVMeta(BaseModel):
    kv_reused: int = Field(description="documents whose KV came from the store (or a request batched with this one)")
    kv_computed: int = Field(description="documents encoded for this request and stored for the next")
    truncated: list[int] = Field(description="documents cut at max_doc_tokens (scored on their first tokens)")


class RerankMeta(KVMeta):
    timings_ms: dict[str, float] = Field(description="queue, kv_load, rerank (model time), total (in the service)")
    warnings: list[str] = []


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult]
    meta: RerankMeta


class TEIRequest(_Body):
    query: str = Field(min_length=1)
    texts: list[str] = Field(min_length=1)
    return_text: bool = False
    raw_scores: bool = Field(False, description="logit(yes) - logit(no) instead of its sigmoid")


class TEIResult(BaseModel):
    index: int
    score: float
    text: str | None = None


class AnswerRequest(_Body):
    query: str = Field(min_length=1)
    documents: list[str | Document] | None = Field(
        None, description="read these; without them the service's corpus is searched (retrieve -> rerank -> read)")
    top_n: int | None = Field(None, ge=1, description="best-ranked documents the reader reads (default: the setting)")

    def texts(self) -> list[str] | None:
        return None if self.documents is None else [d if isinstance(d, str) else d.text for d in self.documents]


class Source(BaseModel):
    index: int | None = Field(None, description="the sent document the answer was read from")
    doc_id: str | None = Field(None, description="the corpus document the answer was read from")
    start: int = Field(description="character span of the answer in that document (-1: not found verbatim)")
    end: int
    file: str | None = None
    page: int | None = None


class Ranked(BaseModel):
    index: int | None = None
    doc_id: str | None = None
    score: float = Field(description="the ranking score: reranker logit(yes) - logit(no), over the corpus plus "
                                     "the retrieval weight x cosine")


class AnswerResponse(BaseModel):
    model_config = ConfigDict(extra="allow")  # a reader that says found / confidence adds them

    answer: str
    source: Source | None
    ranking: list[Ranked]
    meta: KVMeta | None = Field(None, description="over sent documents: their KV reuse")
    warnings: list[str] = []
    timings_ms: dict[str, float]
