from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from d2l_memory import MemoryEngine
from d2l_memory.evaluation.distill import DistillConfig, context_distill, document_probes
from d2l_memory.evaluation.harness import MODES, EvalConfig, run_eval
from d2l_memory.evaluation.metrics import contains_match, exact_match, normalise, states_other_fact, token_f1
from d2l_memory.evaluation.report import chunking_words, markdown, plot, verdict
from d2l_memory.lora import lora_scope
from d2l_memory.reporting import replace_section
from d2l_memory.training.synth import make_sample


def test_metrics() -> None:
    assert normalise("The  City of Brakmoor!") == "city of brakmoor"
    assert contains_match("Orvane lives in Brakmoor.", "Brakmoor")
    assert not contains_match("Brakmoorton", "Brakmoor")  # whole words only
    assert not contains_match("anything", "")
    assert exact_match("the teal.", "Teal") and not exact_match("teal blue", "teal")
    assert token_f1("teal blue", "teal") == pytest.approx(2 / 3)
    assert token_f1("", "teal") == 0.0


def test_a_wrong_answer_naming_another_fact_of_the_document_is_told_apart() -> None:
    answers = ["Brakmoor", "1999", "teal", "Brakmoor", "Orvane Lisk"]
    question = "Where does Orvane Lisk live?"
    assert states_other_fact("She was born in 1999.", "Brakmoor", question, answers)
    assert not states_other_fact("She lives in Brakmoor.", "Brakmoor", question, answers)  # right, not "other"
    assert not states_other_fact("She was born in 1998.", "1999", question, answers)  # a value the document lacks
    assert not states_other_fact("In Brakmoor.", "Brakmoor.", question, answers)  # the same fact asked twice
    # Echoing the entity the question names is not recalling another fact.
    assert not states_other_fact("Orvane Lisk lives far away.", "Brakmoor", question, answers)


def test_probes_never_use_questions() -> None:
    probes = document_probes("Alice lives in Paris and bakes. Bob plays the cello on Sundays.", 10)
    assert [p[1] for p in probes] == [" Paris and bakes.", " cello on Sundays."]


def test_context_distillation_trains_a_lora_that_changes_outputs(engine: MemoryEngine) -> None:
    doc = "Alice lives in Paris and works as a baker since 1999. Bob likes teal and plays the cello."
    memory = context_distill(engine, doc, DistillConfig(steps=5, rank=2, probes_per_step=2))
    assert memory.rank == 2 and all(b.abs().sum() > 0 for _, b in memory.weights.values())
    import torch

    ids = torch.tensor([engine.tokenizer.encode("Where does Alice live?")])
    with torch.no_grad():
        plain = engine.model(ids).logits
        with lora_scope(engine.model, memory):
            assert not torch.allclose(engine.model(ids).logits, plain)


def test_harness_runs_every_mode_and_reports(engine: MemoryEngine, tmp_path: Path) -> None:
    cfg = EvalConfig(docs={"facts": 2, "conversation": 1, "tool": 1}, questions_per_doc=2, needle_tokens=(64, 900),
                     needle_depths=(0.5,), distill_docs=1, distill=DistillConfig(steps=2, rank=2),
                     max_new_tokens=3, batch_size=4)
    result = run_eval(engine, cfg, progress=False)
    summary = result["summary"]
    assert set(summary) == set(cfg.modes)
    assert summary["adapter"]["short_docs"]["all"]["n"] == 2 * 2 + 2 + 2
    # The 900-token needle does not fit the tiny model's 512-token window: in-context skips it.
    # Needles are grouped by the length they were cut to, not by their exact token counts.
    assert set(summary["in_context"]["needle_by_length"]) == {"64"}
    assert set(summary["adapter"]["needle_by_length"]) == {"64", "900"}
    assert summary["distill"]["short_docs"]["all"]["n"] == 2
    # 16-token chunks: every needle has more than recall_chunks chunks, so recall picks among them.
    assert set(summary["adapter_recall"]["needle_by_length"]) == {"64", "900"}
    for mode, cells in ((m, summary[m]["wrong_answers"]) for m in ("none", "adapter")):
        mode_rows = [r for r in result["rows"] if r["mode"] == mode and r["domain"] != "needle"]
        assert sum(c["n"] for c in cells.values()) == len(mode_rows)
        assert sum(c["wrong"] for c in cells.values()) == sum(not r["contains"] for r in mode_rows)
        assert sum(c["other_fact"] for c in cells.values()) == sum(r["other_fact"] for r in mode_rows)
    text = markdown(result, "d2l-memory eval --quick")
    assert "state another fact of the same document" in text
    assert result["chunking"] == asdict(engine.chunking)  # the tiny engine: 16-token chunks, finest 16
    assert "as few even chunks of at most 16 tokens as hold them" in text
    assert "| adapter |" in text and "| adapter_recall |" in text and ("MISSED" in text or "met" in text)
    # The needle verdicts need lengths beyond the 8K window: one line per adapter mode that ran there.
    cell = lambda v: {"n": 3, "contains": v, "exact": v, "f1": v}  # noqa: E731
    beyond = {"none": {"needle_by_length": {"12288": cell(0.0)}}, "adapter": {"needle_by_length": {"12288": cell(0.0)}},
              "adapter_recall": {"needle_by_length": {"12288": cell(2 / 3)}}}
    lines = verdict(beyond)
    assert any("all chunk adapters" in line and "MISSED" in line for line in lines)
    assert any(
        "recall-picked chunk adapters" in line and "adapter_recall 67%" in line and "| met |" in line
        for line in lines
    )
    # 40 of 95 against 2 of 95 is exactly 40 points, though the float difference is a hair below 0.4.
    facts = lambda v: {"by_domain": {"facts": cell(v)}}  # noqa: E731
    exact_margin = {"adapter": facts(40 / 95), "none": facts(2 / 95), "wrong_adapter": facts(3 / 95)}
    lines = verdict(exact_margin)
    assert any("no context by ≥ 40 points" in line and "+40.0 pts | met |" in line for line in lines)
    assert any("wrong-document control" in line and "+38.9 pts | MISSED |" in line for line in lines)
    assert plot(result, tmp_path / "eval.png").stat().st_size > 1000
    bench = tmp_path / "BENCHMARKS.md"
    replace_section(bench, "eval", "first")
    replace_section(bench, "other", "keep me")
    replace_section(bench, "eval", "second")
    content = bench.read_text()
    assert "second" in content and "first" not in content and "keep me" in content


def test_the_report_says_how_documents_were_chunked() -> None:
    fine = {"chunk_tokens": 512, "min_chunk_tokens": 32, "short_document_chunks": 8}
    assert chunking_words(fine) == ("documents cut into even chunks of at most 32 tokens, up to 8 of them, longer "
                                   "documents into 8 or more chunks of at most 512 tokens")
    assert chunking_words({**fine, "min_chunk_tokens": 512}) == ("documents cut into as few even chunks of at most "
                                                                 "512 tokens as hold them")
    assert chunking_words(None) == "fixed 512-token chunks"  # results from before the chunking was recorded


def test_a_second_checkpoint_can_reuse_the_hypernet_free_rows(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from d2l_memory.errors import IncomparableEvaluationError
    from d2l_memory.evaluation import harness

    cfg = EvalConfig(
        docs={"facts": 2, "conversation": 1}, questions_per_doc=2, needle_tokens=(64,), needle_depths=(0.5,),
        distill_docs=1, distill=DistillConfig(steps=2, rank=2), max_new_tokens=3, batch_size=4
    )
    first = json.loads(json.dumps(run_eval(engine, cfg, progress=False), default=str))  # as eval.json stores it

    def no_distillation(*args: object, **kwargs: object) -> None:
        raise AssertionError("reused modes must not be recomputed")

    monkeypatch.setattr(harness, "context_distill", no_distillation)
    second = run_eval(engine, cfg, progress=False, reuse=first)
    assert second["reused"]["modes"] == ["none", "in_context", "rag", "distill"]
    assert set(second["mode_seconds"]) == {"adapter", "adapter_recall", "hybrid", "wrong_adapter"}
    assert set(first["summary"]) == set(MODES)
    for mode in MODES:  # same engine, greedy decoding: the recomputed modes agree too
        assert second["summary"][mode] == first["summary"][mode], mode
    # recall_chunks only changes hypernetwork rows: an evaluation with another budget still reuses.
    third = run_eval(engine, dataclasses.replace(cfg, recall_chunks=3, modes=("none", "adapter_recall")),
                     progress=False, reuse=first)
    assert third["reused"]["modes"] == ["none"] and set(third["mode_seconds"]) == {"adapter_recall"}
    assert "reused from an earlier run" in markdown(second, "d2l-memory eval --reuse-baselines eval.json")
    # Results saved before rows carried ``other_fact`` are completed from the documents when reused.
    legacy_rows = [{k: v for k, v in r.items() if k != "other_fact"} for r in first["rows"]]
    fourth = run_eval(engine, dataclasses.replace(cfg, modes=("none", "rag")), progress=False,
                      reuse={**first, "rows": legacy_rows})
    assert fourth["mode_seconds"] == {}
    for mode in ("none", "rag"):
        assert fourth["summary"][mode] == first["summary"][mode], mode
    # ... and the completed field is computed, not defaulted: a saved answer naming another fact counts.
    asked = next(r for r in legacy_rows if r["mode"] == "none" and r["domain"] == "facts")
    other = next(qa.answer for qa in make_sample(cfg.seed, "test", 0, "facts").qas
                 if qa.answer != asked["gold"] and not contains_match(asked["question"], qa.answer))
    assert asked["doc"] == "test-facts-0-0"
    asked["answer"] = f"It is {other}."
    fifth = run_eval(engine, dataclasses.replace(cfg, modes=("none",)), progress=False,
                     reuse={**first, "rows": legacy_rows})
    assert fifth["summary"]["none"]["wrong_answers"]["facts"]["other_fact"] == 1 + first["summary"]["none"][
        "wrong_answers"]["facts"]["other_fact"]

    with pytest.raises(IncomparableEvaluationError, match="max_new_tokens"):
        run_eval(engine, dataclasses.replace(cfg, max_new_tokens=4), progress=False, reuse=first)
    with pytest.raises(IncomparableEvaluationError, match="base model"):
        run_eval(engine, cfg, progress=False, reuse={**first, "base_model": "llama-other"})
    edited_rows = [{**r, "question": r["question"] + "?"} if r["mode"] == "none" else r for r in first["rows"]]
    tampered = {**first, "rows": edited_rows}
    with pytest.raises(IncomparableEvaluationError, match="questions differ"):
        run_eval(engine, cfg, progress=False, reuse=tampered)


def test_recall_mode_applies_the_chunks_whose_text_matches_the_question(engine: MemoryEngine) -> None:
    from d2l_memory.chunking import span_texts
    from d2l_memory.evaluation.harness import recalled_chunks

    text = ("Bees make honey in the summer meadow. " * 3 + "The special magic number for Orvel is 4417. "
            + "Rivers carry silt to the quiet sea. " * 3)
    memory = engine.internalize(text, progress=False)
    texts = span_texts(text, engine.tokenizer, memory.chunk_spans)
    assert memory.n_chunks > 3 and "".join(texts) == text
    picked = recalled_chunks(memory, texts, "What is the special magic number for Orvel?", n_chunks=2)
    assert picked.n_chunks == 2 and picked.rank == 2 * memory.rank_per_chunk
    assert any("Orvel" in texts[memory.chunk_spans.index(span)] for span in picked.chunk_spans)
    everything = recalled_chunks(memory, texts, "anything", n_chunks=memory.n_chunks)
    assert everything.chunk_spans == memory.chunk_spans
