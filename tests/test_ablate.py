"""benchmarks/ablate.py: variants train from scratch and are scored on one fixed held-out set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from d2l_memory.training.synth import QA
from d2l_memory.training.trainer import HeldOutRow, HeldOutScore
from bench_modules import load_benchmark
from tiny import tiny_base


def tiny_spec() -> dict:
    return {
        "steps": 3,
        "base": {"base_model": "tiny-0", "docs_per_step": 2, "questions_per_doc": 2, "lr": 3e-3, "warmup_steps": 1,
                 "checkpoint_every": 1, "eval_docs": 2, "rank": 2, "domain_weights": {"facts": 1.0},
                 "hypernet": {"width": 32, "n_heads": 2, "n_blocks": 1, "proj_hidden": 64}},
        "score": {"facts": 4, "conversation": 2},
        "variants": {"plain": {}, "mixed": {"domain_weights": {"facts": 0.5, "tool": 0.5}, "multi_chunk_prob": 1.0}},
    }


def test_variants_are_scored_on_the_same_questions_and_tabulated(tmp_path: Path) -> None:
    ablate = load_benchmark("ablate")
    spec = tiny_spec()
    results = [ablate.run_variant(spec, name, root=tmp_path, base=tiny_base()) for name in spec["variants"]]
    for result in results:
        scores = result["scores"]
        assert result["steps"] == 3
        assert scores["facts"]["n"] == scores["facts, closed-set values"]["n"] + scores["facts, unseen values"]["n"] > 0
        assert scores["conversation"]["n"] > 0
        assert (tmp_path / result["variant"] / "score.json").exists()
    # Same score set whatever the variant's training mix.
    assert results[0]["scores"]["facts"]["n"] == results[1]["scores"]["facts"]["n"]
    # A saved run scored on the same set becomes a reference row, fp32 and bf16 encoder alike.
    ref = ablate.score_saved_run(spec, tmp_path / "plain", "ref-bf16", "bfloat16", root=tmp_path, base=tiny_base())
    assert ref["steps"] == 3 and ref["scores"]["facts"]["n"] == results[0]["scores"]["facts"]["n"]
    # A weights-only state (no optimizer moments, as committed) scores the same.
    slim = tmp_path / "slim"
    shutil.copytree(tmp_path / "plain", slim)
    (slim / "state" / "optimizer.safetensors").unlink()
    slim_ref = ablate.score_saved_run(spec, slim, "ref-slim", "bfloat16", root=tmp_path, base=tiny_base())
    assert slim_ref["scores"] == ref["scores"]
    table = ablate.report(spec, root=tmp_path)
    assert "| plain | (base) | 3 |" in table
    assert '| mixed | domain_weights={"facts": 0.5, "tool": 0.5}, multi_chunk_prob=1.0 | 3 |' in table
    assert table.index("| mixed |") < table.index("| ref-bf16 |")
    # Rows committed by an earlier machine stay in the report; this machine's runs replace theirs.
    earlier = [{**results[0], "variant": "from-another-machine"}, {**results[1], "steps": 999}]
    merged = ablate.report(spec, root=tmp_path, committed=earlier)
    assert "| from-another-machine |" in merged and "| mixed | " in merged and "| 999 |" not in merged
    # Unseen values by answer position: every token counted once, and a row in the second table.
    positions = results[0]["scores"]["positions"]
    unseen_tokens = sum(p["n"] for p in positions.values())
    end_tokens = positions["end"]["n"]
    assert end_tokens == results[0]["scores"]["facts, unseen values"]["n"] and unseen_tokens > end_tokens
    assert "| plain | " in table.split("by position in the answer")[1]


def test_positions_split_first_later_and_end_tokens() -> None:
    ablate = load_benchmark("ablate")
    qa = QA("q?", "a", "single", "city", True)
    rows = [HeldOutRow(qa, 0.5, 0.25, 1.0, (True, False, False, True), (False, False, True, True)),
            HeldOutRow(qa, 1.0, 0.5, 1.0, (True, True), (False, True))]
    at = ablate.by_position(rows)
    assert at["first"] == {"own": 1.0, "wrong": 0.0, "n": 2}
    assert at["later"] == {"own": 0.0, "wrong": 0.5, "n": 2}
    assert at["end"] == {"own": 1.0, "wrong": 1.0, "n": 2}


def test_unknown_variant_is_a_usage_error(tmp_path: Path) -> None:
    ablate = load_benchmark("ablate")
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        ablate.variant_config(tiny_spec(), "nope", tmp_path)


def test_held_out_score_of_rows_matches_the_run_check(tmp_path: Path) -> None:
    ablate = load_benchmark("ablate")
    spec = tiny_spec()
    from d2l_memory.training.trainer import Trainer

    trainer = Trainer(ablate.variant_config(spec, "plain", tmp_path), base=tiny_base())
    rows = trainer.held_out_rows(trainer.samples("test", 0, 2))
    assert HeldOutScore.of(rows) == trainer.held_out()
    for row in rows:  # per-token hits agree with the row's token accuracy
        assert len(row.own_hits) == len(row.wrong_hits) > 1
        assert sum(row.own_hits) / len(row.own_hits) == pytest.approx(row.own_token_acc)
        assert sum(row.wrong_hits) / len(row.wrong_hits) == pytest.approx(row.wrong_token_acc)
    with pytest.raises(ValueError, match="no held-out questions"):
        HeldOutScore.of([])
    with pytest.raises(ValueError, match="at least 2 documents"):
        trainer.held_out_rows(trainer.samples("test", 0, 1))


def test_combined_memories_hold_the_own_document_or_none_of_it() -> None:
    from d2l_memory.training.batch import MicroBatch
    from d2l_memory.training.trainer import held_out_pair

    qa = QA("q?", "a", "single", "city", True)
    docs = 4
    batch = MicroBatch([(i,) for i in range(docs)], [[i] for i in range(docs)], [0, 1, 2, 3, 3],
                       torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2, dtype=torch.long),
                       torch.zeros(5, 2, dtype=torch.long), [qa] * 5)
    own, wrong = held_out_pair(batch, 1)
    assert own is batch and wrong.row_doc == [1, 2, 3, 0, 0]
    own, wrong = held_out_pair(batch, 2)
    assert own.doc_chunks == wrong.doc_chunks == [[0, 1], [2, 3]]
    for row, doc in enumerate(batch.row_doc):
        assert batch.doc_chunks[doc][0] in own.doc_chunks[own.row_doc[row]]
        assert batch.doc_chunks[doc][0] not in wrong.doc_chunks[wrong.row_doc[row]]


def test_combined_scores_appear_as_their_own_group(tmp_path: Path) -> None:
    ablate = load_benchmark("ablate")
    spec = {**tiny_spec(), "combined": [2]}
    from d2l_memory.training.trainer import Trainer

    trainer = Trainer(ablate.variant_config(spec, "plain", tmp_path), base=tiny_base())
    scores = ablate.score(trainer, spec)
    # 4 fact documents make one group of 2 + 2: every question is scored once more, combined.
    assert scores["facts, 1 of 2 memories"]["n"] == scores["facts"]["n"] > 0


def test_a_warm_start_variant_continues_a_saved_state_and_leaves_it_untouched(tmp_path: Path) -> None:
    import json

    ablate = load_benchmark("ablate")
    spec = tiny_spec()
    base = tiny_base()
    ablate.run_variant(spec, "plain", root=tmp_path, base=base)  # a saved state at step 3
    saved = tmp_path / "plain"
    saved_log = (saved / "log.jsonl").read_text()
    config = tmp_path / "run_config.json"
    config.write_text(json.dumps({**spec["base"], "out_dir": "unused", "steps": 3}))
    spec["variants"]["continued"] = {"warm_start": str(saved), "warm_steps": 2, "config": str(config),
                                     "questions_per_doc": 1}
    cfg = ablate.variant_config(spec, "continued", root=tmp_path)
    assert (cfg.steps, cfg.schedule_start, cfg.questions_per_doc) == (5, 3, 1)
    result = ablate.run_variant(spec, "continued", root=tmp_path, base=base)
    assert result["steps"] == 5 and result["scores"]["facts"]["n"] > 0
    log = [json.loads(line) for line in (tmp_path / "continued" / "log.jsonl").read_text().splitlines()]
    new_steps = [r["seconds"] for r in log if r["step"] > 3]
    assert len(new_steps) == 2 and result["step_hours"] == pytest.approx(sum(new_steps) / 3600)
    assert (saved / "log.jsonl").read_text() == saved_log  # the source state is copied, never written
    assert ablate.state_step(saved / "state") == 3
    assert "| continued | warm_start=" in ablate.report(spec, root=tmp_path)
