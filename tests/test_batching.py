"""Concurrent requests batched: grouped into shared model calls, answered as if alone."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

from hyperrag.workbench.batcher import Batcher, Busy
from hyperrag.rag.pipeline import QuestionError


def test_concurrent_requests_share_calls_and_answer_as_alone(tiny_engine):
    questions = [q.question for q in tiny_engine.corpus.queries][:4]
    alone = [tiny_engine.ask(q, "reader_kv") for q in questions]
    batcher = Batcher(window_ms=200, max_group=4)
    try:
        with cf.ThreadPoolExecutor(len(questions)) as pool:
            together = list(pool.map(lambda q: batcher.ask(tiny_engine, q, "reader_kv"), questions))
    finally:
        batcher.close()
    assert batcher.stats.groups < len(questions)  # some requests shared a call
    for a, b in zip(alone, together):
        assert (b.question, b.answer, b.ranked_ids) == (a.question, a.answer, a.ranked_ids)
        assert b.timings["queue"] >= 0 and b.timings["total"] >= b.timings["queue"] + b.timings["rerank"]


def test_groups_by_mode_and_bounded(tiny_engine):
    batcher = Batcher(window_ms=0, max_group=2)
    try:
        requests = [batcher_request(tiny_engine, q, m) for q, m in
                    [("a?", "reuse"), ("b?", "retrieval"), ("c?", "reuse"), ("d?", "reuse")]]
        groups = batcher._groups(requests)
        assert [[r.item for r in g] for g in groups] == [["a?", "c?"], ["b?"], ["d?"]]
    finally:
        batcher.close()


def batcher_request(engine, question, mode):
    from hyperrag.workbench.batcher import question_job

    return question_job(engine, question, mode, None, None, False)


def test_bad_question_fails_alone_and_a_full_queue_says_busy(tiny_engine):
    entered, release = threading.Event(), threading.Event()

    class Slow:  # an engine whose answers wait for the test, so the queue fills up
        runtime, corpus, index = tiny_engine.runtime, tiny_engine.corpus, tiny_engine.index

        def ask_many(self, questions, *args):
            entered.set()
            release.wait(30)
            return tiny_engine.ask_many(questions, "retrieval", generate=False)

    batcher = Batcher(window_ms=0, max_group=1, queue_size=1)
    try:
        with pytest.raises(QuestionError, match="empty"):
            batcher.ask(tiny_engine, "   ")
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(batcher.ask, Slow(), "first?")
            assert entered.wait(30)  # the worker holds the first request
            second = pool.submit(batcher.ask, Slow(), "second?")  # fills the queue of one
            for _ in range(3000):
                if batcher._queue.full():
                    break
                time.sleep(0.01)
            with pytest.raises(Busy, match="busy: 1 questions are waiting"):
                batcher.ask(Slow(), "third?")
            release.set()
            assert first.result().question == "first?" and second.result().question == "second?"
    finally:
        release.set()
        batcher.close()


def test_an_error_reaches_every_request_of_its_group(tiny_engine):
    batcher = Batcher(window_ms=0)
    try:
        with pytest.raises(ValueError, match="unknown mode"):
            batcher.ask(tiny_engine, "Who?", "no-such-mode")
        assert batcher.ask(tiny_engine, "Who?", "retrieval", generate=False).docs  # the worker lives on
    finally:
        batcher.close()
