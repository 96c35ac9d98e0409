"""The app's model picker: the workbench makes another model the live one (a tiny random Llama
saved as a Hugging Face folder, zero-shot), answers with it and says so; its document KV is its
own (nothing served across, nothing deleted: switching back to the packaged model, with its
shipped adapter, finds its entries); a model that cannot be loaded is the loader's clear message
and the previous model stays live and answering; the page has the picker and wires it."""
from __future__ import annotations

import shutil
import weakref
from pathlib import Path

import gradio as gr
import pytest

from hyperrag import ui
from hyperrag.common.settings import SHIPPED_ADAPTER, Settings
from hyperrag.model.loading import MODELS
from hyperrag.workbench.config import AppConfig
from hyperrag.workbench.operations import DEFAULT_KEY, SWITCH_STAGES, UserError, Workbench
from tests.test_model_loading import save, smollm2_tokenizer, tiny_llama, tokenizer  # noqa: F401 (fixtures)

QUESTION = "Who led the Norse raiders?"


def quick_settings(cache_dir: str, **changes) -> Settings:
    """The tiny corpus, small answers, no kernel or stream timing (aten kernels, one thread per stream)."""
    return Settings.from_env(cache_dir=cache_dir, dtype="float32", top_k=3, top_n=1, batch_size=4, max_new_tokens=4,
                             cpu_linear="aten", cpu_stream_threads=1, **changes)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    return save(tmp_path_factory.mktemp("picker") / "tiny-llama", tiny_llama(tokenizer, 0), tokenizer)


@pytest.fixture(scope="module")
def wb(tiny_corpus_dir, cache_dir, tmp_path_factory):
    """The app's workbench as it starts by default (SmolLM2 with its shipped adapter), fs:// store."""
    store = tmp_path_factory.mktemp("picker-kv")
    workbench = Workbench(quick_settings(cache_dir, corpus=str(tiny_corpus_dir), store_url=f"fs://{store}"),
                          AppConfig(tmp_path_factory.mktemp("picker-data")))
    workbench.load()
    yield workbench
    workbench.close()


def stored(wb) -> dict[str, int]:
    """The store folder's entries: name -> modification time."""
    folder = Path(wb.settings.store_url.removeprefix("fs://"))
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def last(generator):
    out = None
    for out in generator:
        pass
    return out


def test_switch_to_a_folder_model_and_back(wb, tiny_folder):
    app = ui.Callbacks(wb)
    entry = wb.entry(DEFAULT_KEY)
    assert wb.prepare(entry) == [] and entry.report.encoded == len(entry.corpus)
    smollm2_entries = stored(wb)
    assert len(smollm2_entries) >= len(entry.corpus)
    smollm2 = wb.wait_ready()
    embedder, index, identity = smollm2.runtime.embedder, smollm2.index, smollm2.store.identity
    freed = weakref.ref(smollm2.reranker.llm.model)
    del smollm2

    stages: list[tuple[int, int]] = []
    notes = wb.switch_model(str(tiny_folder), "", progress=lambda done, total: stages.append((done, total)))
    n = len(SWITCH_STAGES)
    assert stages == [(i, n) for i in range(n + 1)]
    assert notes[0].startswith(f"{tiny_folder} is live (llama@") and "no adapter" in notes[0]
    status = wb.status()
    assert (status["state"], status["model"], status["adapter"], status["reader"]) == ("ready", str(tiny_folder), "",
                                                                                       False)
    assert status["weights"].startswith("llama@") and status["device"] == "cpu"
    shown = ui.status_markdown(status)
    assert str(tiny_folder) in shown and "zero-shot" in shown and status["weights"] in shown
    live = wb.wait_ready()
    assert freed() is None  # the replaced model's memory went back
    assert live.reranker.llm.fingerprint.startswith("llama@") and live.store.identity != identity
    assert live.runtime.embedder is embedder and live.index is index  # the retriever stays
    assert wb.modes() == ("retrieval", "baseline", "prefix", "reuse")  # no adapter, no reader
    with pytest.raises(UserError, match="'reader_kv' needs an adapter"):
        wb.ask(wb.entry(DEFAULT_KEY), QUESTION, "reader_kv", 3, 1)

    # Its own document KV: nothing of SmolLM2's served to it, nothing of SmolLM2's touched.
    entry = wb.entry(DEFAULT_KEY)
    assert entry.report is None and wb.prepare(entry) == []
    assert (entry.report.encoded, entry.report.skipped) == (len(entry.corpus), 0)
    now = stored(wb)
    assert all(now.get(name) == mtime for name, mtime in smollm2_entries.items()) and len(now) > len(smollm2_entries)

    # It answers; the Ask tab's columns are the generator's over the same three rankings.
    result = wb.ask(entry, QUESTION, "reuse", 3, 1)
    assert len(result.docs) == 3 and result.reading is None
    assert app.compare_modes() == ui.GENERATOR_COMPARE_MODES
    out = last(app.cb_compare(QUESTION, 3, 1, DEFAULT_KEY))
    assert "faster than full prefill" in out[0] and "the generator gave" in out[0]
    assert all(answer.startswith("**Answer:**") for answer in out[2::3])
    view = app.model_view()
    assert list(view[:3]) == [ui.column_title(m) for m in ui.GENERATOR_COMPARE_MODES]
    assert view[3]["value"] == list(ui.GENERATOR_COMPARE_MODES) and view[4]["value"] is None
    assert list(view[5:]) == [str(tiny_folder), ""]

    # Back to the packaged model through the page's callback: its shipped adapter, its stored KV found.
    status_md, notes_md, info, warn, *view = app.cb_switch_model("smollm2-135m", "", "", DEFAULT_KEY, progress=None)
    assert "smollm2-135m is live" in notes_md and "adapter hyperrag-lora" in notes_md
    assert "`smollm2-135m` + hyperrag-lora" in status_md and "Storage estimate" in info and not warn["visible"]
    assert view[:3] == [ui.column_title(m) for m in ui.COMPARE_MODES] and view[4:] == [{"value": "smollm2-135m",
                                                                                       "__type__": "update"}, "", ""]
    assert wb.settings.adapter == str(SHIPPED_ADAPTER) and "reader_kv" in wb.modes()
    entry = wb.entry(DEFAULT_KEY)
    wb.prepare(entry)
    assert (entry.report.encoded, entry.report.skipped) == (0, len(entry.corpus))
    assert wb.ask(entry, QUESTION, "reader_kv", 3, 1).reading is not None
    assert wb.switch_model("smollm2-135m") == ["smollm2-135m is already the live model"]


def gpt2_folder(folder: Path, tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    return save(folder, model, tokenizer)


@pytest.mark.parametrize("case, message", [
    ("no weights", r"model folder '.*no-weights' has no weights"),
    ("no tokenizer", r"model folder '.*no-tokenizer' has no tokenizer"),
    ("unknown id", r"unknown model 'no-such-model': give a packaged id"),
    ("hub id", r"'someorg/somemodel' is not a packaged id .* does not download Hub models"),
    ("unsupported", r"model '.*gpt2' is not supported: .*'gpt2' is not supported"),
    ("adapter of another model",
     r"adapter '.*hyperrag-lora' does not fit model '.*tiny-llama'.*trained on 'smollm2-135m'"),
    ("missing adapter", r"adapter folder '.*nowhere' does not exist"),
])
def test_a_bad_model_leaves_the_live_one(wb, tiny_folder, tokenizer, tmp_path, case, message):
    if case == "no weights":
        model = shutil.copytree(tiny_folder, tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    elif case == "no tokenizer":
        model = shutil.copytree(tiny_folder, tmp_path / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    else:
        model = {"unknown id": "no-such-model", "hub id": "someorg/somemodel",
                 "unsupported": gpt2_folder(tmp_path / "gpt2", tokenizer)}.get(case, tiny_folder)
    adapter = {"adapter of another model": str(SHIPPED_ADAPTER),
               "missing adapter": str(tmp_path / "nowhere")}.get(case, "")
    live, settings = wb.wait_ready(), wb.settings
    with pytest.raises(UserError, match=message):
        wb.switch_model(str(model), adapter)
    assert wb.wait_ready() is live and wb.settings is settings and wb.status()["state"] == "ready"
    if case == "no weights":  # the page shows the same message, and the live model still answers
        with pytest.raises(gr.Error, match=message):
            ui.Callbacks(wb).cb_switch_model("smollm2-135m", str(model), "", DEFAULT_KEY, progress=None)
        assert wb.ask(wb.entry(DEFAULT_KEY), QUESTION, "reuse", 3, 1).docs


def test_the_page_has_the_model_picker(cache_dir, tiny_corpus_dir, tmp_path, tiny_folder):
    """Built without loading anything: the picker's widgets, their start values (a folder model,
    zero-shot: the Ask tab's columns are the generator's), and the switch event's outputs as many
    as its callback returns."""
    settings = quick_settings(cache_dir, corpus=str(tiny_corpus_dir), model=str(tiny_folder), adapter="")
    wb = Workbench(settings, AppConfig(tmp_path / "data"))
    demo = ui.build_app(wb)
    blocks = list(demo.blocks.values())

    def one(kind, label):
        found = [b for b in blocks if isinstance(b, kind) and b.label == label]
        assert len(found) == 1, (kind, label)
        return found[0]

    packaged = one(gr.Dropdown, "Packaged model")
    assert [value for _, value in packaged.choices] == list(MODELS) and packaged.value is None
    assert one(gr.Textbox, "…or a model on this machine").value == str(tiny_folder)
    assert one(gr.Textbox, "LoRA adapter folder (optional)").value == ""
    assert any(isinstance(b, gr.Button) and b.value == ui.SWITCH_BUTTON for b in blocks)
    titles = {b.value for b in blocks if isinstance(b, gr.Markdown)}
    assert {ui.column_title(m) for m in ui.GENERATOR_COMPARE_MODES} <= titles
    assert not {ui.column_title(m) for m in ui.COMPARE_MODES} & titles
    view = len(ui.Callbacks(wb).model_view())
    assert len(next(fn for fn in demo.fns.values() if fn.api_name == "switch_model").outputs) == 4 + view
    assert len(next(fn for fn in demo.fns.values() if fn.name == "on_load").outputs) == 3 + view
