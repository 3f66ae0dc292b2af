from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2l_memory.training import vocab
from d2l_memory.training.config import TrainConfig
from d2l_memory.training.synth import DOMAINS, make_sample, mixed_sample
from d2l_memory.training.batch import MicroBatch, TeacherTopK, student_forward, teacher_top_k, top_k_kl
from d2l_memory.internalize import run_hypernet
from d2l_memory.training.grow import grown_hypernet
from d2l_memory.training.trainer import Trainer, lr_factor
from tiny import tiny_base

TESTS = Path(__file__).parent


def tiny_config(out_dir: Path, steps: int, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "base_model": "tiny-0", "out_dir": str(out_dir), "steps": steps, "docs_per_step": 2, "questions_per_doc": 2,
        "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 1, "eval_every": 1000, "eval_docs": 4, "max_chunks": 2,
        "domain_weights": {"facts": 0.5, "conversation": 0.3, "tool": 0.2}, "rank": 2,
        "hypernet": {"width": 32, "n_heads": 2, "n_blocks": 1, "proj_hidden": 64},
    }
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


def test_generators_are_deterministic() -> None:
    for domain in DOMAINS:
        assert make_sample(0, "train", 7, domain) == make_sample(0, "train", 7, domain)
    assert mixed_sample(1, "test", 3, {"facts": 1.0}) == mixed_sample(1, "test", 3, {"facts": 1.0})
    assert make_sample(0, "train", 1, "facts") != make_sample(0, "train", 2, "facts")


def test_held_out_values_never_appear_in_training() -> None:
    open_values: dict[str, set[str]] = {"train": set(), "test": set()}
    texts = {"train": [], "test": []}
    for split in ("train", "test"):
        for i in range(300):
            for domain in ("facts", "conversation", "tool", "needle"):
                sample = make_sample(0, split, i, domain)
                texts[split].append(sample.text)
                open_values[split] |= {qa.answer for qa in sample.qas if qa.open_value}
    assert open_values["test"] and not open_values["train"] & open_values["test"]
    assert all(vocab.split_of(v) == "test" for v in open_values["test"])
    train_text = "\n".join(texts["train"])
    assert not any(v in train_text for v in list(open_values["test"])[:200] if len(v) >= 5)


def test_held_out_phrasings_never_appear_in_training() -> None:
    from d2l_memory.training import synth

    held = [t for statements, *_ in synth._FACTS.values() for i, t in enumerate(statements) if i % 5 == 4]
    fragments = [t.split("{v}")[0].replace("{p}", "").strip() for t in held]
    fragments = [f for f in fragments if len(f) > 8]
    train = " ".join(make_sample(0, "train", i, "facts").text for i in range(300))
    test = " ".join(make_sample(0, "test", i, "facts").text for i in range(300))
    assert fragments and not any(f in train for f in fragments)
    assert any(f in test for f in fragments)


def test_tiny_training_run_lowers_the_loss(tmp_path: Path) -> None:
    # A wider init than the default 0.02 gives the tiny model logits a LoRA can move. The loss is
    # compared on the same fixed batches before and after, so batch-to-batch noise cannot fake it.
    trainer = Trainer(
        tiny_config(tmp_path / "run", steps=40, checkpoint_every=40, lr=1e-2), base=tiny_base(init_range=0.3)
    )
    batches = [trainer.microbatch(step, 0) for step in range(4)]

    def fixed_loss() -> float:
        with torch.no_grad():
            outs = [student_forward(trainer.base.model, trainer.hypernet, trainer.layers_prefix, b) for b in batches]
        return sum(o.loss.item() for o in outs) / len(outs)

    before = fixed_loss()
    trainer.run(progress=False)
    after = fixed_loss()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 40
    assert after < before - 0.2, (before, after)


def test_warm_restart_schedule_counts_from_schedule_start(tmp_path: Path) -> None:
    single = tiny_config(tmp_path, steps=100, warmup_steps=10)
    restart = tiny_config(tmp_path, steps=160, warmup_steps=10, schedule_start=60)
    # The restarted cycle is the single one shifted by 60 steps: same warm-up, same cosine.
    for step in (0, 5, 9, 10, 50, 99):
        assert lr_factor(step + 60, restart) == lr_factor(step, single)
    assert lr_factor(9, single) == 1.0 and lr_factor(99, single) < 0.11


def test_bad_schedule_autocast_or_eval_set_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="schedule_start"):
        tiny_config(tmp_path, steps=10, schedule_start=10)
    with pytest.raises(ValueError, match="encoder_autocast 'int8'"):
        tiny_config(tmp_path, steps=10, encoder_autocast="int8")
    with pytest.raises(ValueError, match="encoder_autocast 'no_such'"):
        tiny_config(tmp_path, steps=10, encoder_autocast="no_such")
    with pytest.raises(ValueError, match="eval_docs 1"):
        tiny_config(tmp_path, steps=10, eval_docs=1)
    assert tiny_config(tmp_path, steps=10, encoder_autocast="bfloat16").encoder_dtype() == torch.bfloat16
    with pytest.raises(ValueError, match="student_autocast 'int8'"):
        tiny_config(tmp_path, steps=10, student_autocast="int8")


def test_a_bf16_student_pass_trains_fp32_weights(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", steps=2, student_autocast="bfloat16"), base=tiny_base())
    before = {k: v.clone() for k, v in trainer.hypernet.state_dict().items()}
    seen: list[torch.dtype] = []
    down_proj = trainer.base.model.get_decoder().layers[0].mlp.down_proj
    hook = down_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.run(progress=False)
    hook.remove()
    assert torch.bfloat16 in seen  # the student pass really ran in bf16
    after = trainer.hypernet.state_dict()
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert record["loss"] == record["loss"] and record["loss"] < 100  # finite


def test_top_k_kl_is_zero_only_where_student_matches_teacher() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    top = logits.topk(8, dim=-1)
    teacher = TeacherTopK(top.values.log_softmax(-1), top.indices)
    assert torch.allclose(top_k_kl(logits, teacher), torch.zeros(5), atol=1e-6)
    assert (top_k_kl(torch.randn(5, 50), teacher) > 1e-3).all()


def test_teacher_kl_reaches_the_hypernetwork_and_falls(tmp_path: Path) -> None:
    # KL only (no gold CE), optimised on one fixed batch: the gradient must reach the hypernetwork
    # and pull the student's answer distribution towards the teacher's.
    trainer = Trainer(tiny_config(tmp_path / "run", steps=2, ce_weight=0.0, kl_weight=1.0, teacher_top_k=8),
                      base=tiny_base(init_range=0.3))
    batch = trainer.microbatch(0, 0)
    assert batch.teacher is not None and batch.teacher.labels.ne(-100).sum() == batch.labels.ne(-100).sum()
    teacher = teacher_top_k(trainer.base.model, batch.teacher, 8)
    optimizer = torch.optim.Adam(trainer.hypernet.parameters(), lr=1e-2)
    kls = []
    for _ in range(25):
        out = student_forward(trainer.base.model, trainer.hypernet, trainer.layers_prefix, batch, teacher=teacher)
        optimizer.zero_grad()
        out.kl.backward()
        optimizer.step()
        kls.append(out.kl.item())
    assert kls[-1] < 0.5 * kls[0], kls
    trainer.run(progress=False)  # the loop itself logs the KL it optimises
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["kl"] > 0 for r in logged)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "state" / "hypernet.safetensors"))


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    steps = 6
    Trainer(tiny_config(tmp_path / "straight", steps), base=tiny_base()).run(progress=False)

    killed = tmp_path / "killed"
    config = tmp_path / "killed.json"
    config.write_text(tiny_config(killed, steps).to_json())
    # The child SIGKILLs itself right after its third checkpoint: a real kill, at a known point, so the
    # test cannot pass or fail on how fast the machine happens to be.
    script = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]);"
        "from tiny import tiny_base;"
        "from d2l_memory.training.config import TrainConfig;"
        "from d2l_memory.training.trainer import Trainer\n"
        "class DiesAtStep3(Trainer):\n"
        "    def save(self):\n"
        "        path = super().save()\n"
        "        if self.step == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return path\n"
        "DiesAtStep3(TrainConfig.from_file(sys.argv[2]), base=tiny_base()).run(progress=False)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(TESTS), str(config)], env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    resumed = Trainer(tiny_config(killed, steps), base=tiny_base())
    assert resumed.step == 3  # it really was interrupted
    resumed.run(progress=False)

    straight, again = _weights(tmp_path / "straight"), _weights(killed)
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    optim_a = load_file(str(tmp_path / "straight" / "state" / "optimizer.safetensors"))
    optim_b = load_file(str(killed / "state" / "optimizer.safetensors"))
    assert all(torch.equal(optim_a[k], optim_b[k]) for k in optim_a)


def test_a_weights_only_state_continues_only_as_a_warm_restart(tmp_path: Path) -> None:
    base = tiny_base()
    Trainer(tiny_config(tmp_path / "run", steps=3), base=base).run(progress=False)
    slim = tmp_path / "slim"
    shutil.copytree(tmp_path / "run", slim)
    (slim / "state" / "optimizer.safetensors").unlink()

    with pytest.raises(ValueError, match='weights-only .*"schedule_start": 3'):
        Trainer(tiny_config(slim, steps=5), base=base)
    restarted = Trainer(tiny_config(slim, steps=5, schedule_start=3), base=base)
    assert restarted.step == 3 and not restarted.optimizer.state  # moments start from zero
    saved = _weights(tmp_path / "run")
    assert all(torch.equal(saved[k], v) for k, v in restarted.hypernet.state_dict().items())
    restarted.run(progress=False)
    assert (slim / "state" / "optimizer.safetensors").is_file()  # from here on, resumes are exact again
    assert Trainer(tiny_config(slim, steps=6), base=base).step == 5


def test_a_run_grows_a_per_layer_head_correction_only_at_a_warm_restart(tmp_path: Path) -> None:
    base = tiny_base()
    Trainer(tiny_config(tmp_path / "run", steps=3), base=base).run(progress=False)
    grown_settings = {"width": 32, "n_heads": 2, "n_blocks": 1, "proj_hidden": 64, "head_layer_rank": 4}

    with pytest.raises(ValueError, match='grows the hypernetwork.*"schedule_start": 3'):
        Trainer(tiny_config(tmp_path / "run", steps=5, hypernet=grown_settings), base=base)
    with pytest.raises(ValueError, match=r"differs from the configured one in \['width'"):
        Trainer(tiny_config(tmp_path / "run", steps=5, schedule_start=3, hypernet={**grown_settings, "width": 64}),
                base=base)

    old = Trainer(tiny_config(tmp_path / "run", steps=3), base=base)
    grown = Trainer(tiny_config(tmp_path / "run", steps=5, schedule_start=3, hypernet=grown_settings), base=base)
    rng_before = torch.get_rng_state()
    again = grown_hypernet(old.hypernet, grown.hypernet_cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeded on a forked RNG, the caller's untouched
    assert all(torch.equal(v, grown.hypernet.state_dict()[k]) for k, v in again.state_dict().items())  # reproducible
    assert grown.step == 3 and grown.hypernet.cfg.head_layer_rank == 4 and not grown.optimizer.state
    batch = grown.microbatch(3, 0)
    with torch.no_grad():
        before = run_hypernet(base.model, old.hypernet, batch.chunks)
        after = run_hypernet(base.model, grown.hypernet, batch.chunks)
    assert all(torch.equal(x, y) for name in before for x, y in zip(before[name], after[name]))

    grown.run(progress=False)
    saved = _weights(tmp_path / "run")
    assert any(k.endswith("layer_up_a") and v.abs().sum() > 0 for k, v in saved.items())  # it trained
    assert Trainer(tiny_config(tmp_path / "run", steps=6, hypernet=grown_settings), base=base).step == 5  # plain resume


def test_a_run_trained_without_keys_grows_a_gated_key_path(tmp_path: Path) -> None:
    base = tiny_base()
    settings = {"width": 32, "n_heads": 2, "n_blocks": 1, "proj_hidden": 64}
    Trainer(tiny_config(tmp_path / "run", steps=3, target_keys=False), base=base).run(progress=False)
    with pytest.raises(ValueError, match="key_gate needs keys"):
        Trainer(tiny_config(tmp_path / "run", steps=5, schedule_start=3, target_keys=False,
                            hypernet={**settings, "key_gate": True}), base=base)

    old = Trainer(tiny_config(tmp_path / "run", steps=3, target_keys=False), base=base)
    keyed = {"target_keys": True, "hypernet": {**settings, "key_gate": True, "key_gate_scale": 30.0}}
    grown = Trainer(tiny_config(tmp_path / "run", steps=5, schedule_start=3, **keyed), base=base)
    assert grown.hypernet.cfg.key_gate and grown.hypernet.cfg.encoder.target_keys and not grown.optimizer.state
    batch = grown.microbatch(3, 0)
    with torch.no_grad():
        before = run_hypernet(base.model, old.hypernet, batch.chunks)
        after = run_hypernet(base.model, grown.hypernet, batch.chunks)
    # The grown network now reads keys, and with its gates shut it makes the adapters it made before.
    assert all(torch.allclose(x, y, atol=1e-6) for name in before for x, y in zip(before[name], after[name]))

    grown.run(progress=False)
    saved = _weights(tmp_path / "run")
    assert any(k.endswith("key_gate") and v.abs().sum() > 0 for k, v in saved.items())  # the gates opened

    # A network that already mixes keys into A cannot switch to the gate: that would change it.
    Trainer(tiny_config(tmp_path / "keyed", steps=2, target_keys=True), base=base).run(progress=False)
    with pytest.raises(ValueError, match="already mixes keys"):
        Trainer(tiny_config(tmp_path / "keyed", steps=4, schedule_start=2, **keyed), base=base)


def test_a_run_trained_without_keys_grows_key_copy_components(tmp_path: Path) -> None:
    base = tiny_base()
    settings = {"width": 32, "n_heads": 2, "n_blocks": 1, "proj_hidden": 64}
    Trainer(tiny_config(tmp_path / "run", steps=3, target_keys=False), base=base).run(progress=False)
    old = Trainer(tiny_config(tmp_path / "run", steps=3, target_keys=False), base=base)
    copying = {"target_keys": True, "hypernet": {**settings, "key_copy": True}}
    grown = Trainer(tiny_config(tmp_path / "run", steps=5, schedule_start=3, **copying), base=base)
    assert grown.hypernet.cfg.key_copy and grown.hypernet.cfg.encoder.target_keys and not grown.optimizer.state
    batch = grown.microbatch(3, 0)
    with torch.no_grad():
        before = run_hypernet(base.model, old.hypernet, batch.chunks)["mlp.down_proj"]
        after = run_hypernet(base.model, grown.hypernet, batch.chunks)["mlp.down_proj"]
    # Twice the rank, and the same ΔW: the new components start with a zero B.
    assert after[0].shape[2] == 2 * before[0].shape[2]
    torch.testing.assert_close(after[1] @ after[0], before[1] @ before[0])

    grown.run(progress=False)
    saved = _weights(tmp_path / "run")
    assert saved["heads.mlp__down_proj.scale_key_copy"].abs().sum() > 0  # the new components trained
    with pytest.raises(ValueError, match="key_copy can only grow from 0"):
        Trainer(tiny_config(tmp_path / "run", steps=6, schedule_start=5, target_keys=True, hypernet=settings),
                base=base)  # and cannot be dropped again


def test_export_writes_a_cast_checkpoint_the_engine_loads(tmp_path: Path) -> None:
    from d2l_memory.checkpoint import load_hypernet
    from d2l_memory.training.export import export_checkpoint
    from d2l_memory.training.plot import plot_training_log

    base = tiny_base()
    Trainer(tiny_config(tmp_path / "run", steps=3, eval_every=3), base=base).run(progress=False)
    meta = export_checkpoint(tmp_path / "run", tmp_path / "ckpt", torch.float16, command="d2l-memory export run ckpt")
    weights = load_file(str(tmp_path / "ckpt" / "hypernet.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    assert not (tmp_path / "ckpt" / "optimizer.safetensors").exists()
    assert meta.training["step"] == 3 and meta.training["compute"]["logged_steps"] == 3
    assert meta.training["command"] == "d2l-memory export run ckpt"
    module, _ = load_hypernet(tmp_path / "ckpt", expect_base_model=base.fingerprint)
    assert module.cfg.rank == 2
    assert plot_training_log(tmp_path / "run").stat().st_size > 0


def test_training_log_keeps_one_record_per_step_after_a_resume(tmp_path: Path) -> None:
    from d2l_memory.training.export import read_log, training_compute

    log = tmp_path / "log.jsonl"
    # Steps 3-4 were logged, then the run was killed before checkpointing them and redid them.
    rows = [(1, 1.0), (2, 1.0), (3, 9.0), (4, 9.0), (3, 2.0), (4, 2.0)]
    log.write_text("".join(json.dumps({"step": s, "seconds": sec, "loss": 1.0}) + "\n" for s, sec in rows))
    assert [(r["step"], r["seconds"]) for r in read_log(log)] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
    assert training_compute(read_log(log)) == {"logged_steps": 4, "train_step_hours": round(6.0 / 3600, 3)}


def test_training_record_lists_every_held_out_check(tmp_path: Path) -> None:
    from d2l_memory.training.report import training_markdown

    Trainer(tiny_config(tmp_path / "run", steps=4, eval_every=2), base=tiny_base()).run(progress=False)
    text = training_markdown(tmp_path / "run", tmp_path / "ckpt", "d2l-memory export-checkpoint run ckpt")
    table = [line for line in text.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")]
    assert len(table) == 2 and "4 optimizer steps" in text
    assert "cosine to ×0.1 over 4 steps" in text and "conversation 0.3, facts 0.5, tool 0.2" in text
    assert "distractors" not in text and "1–2 chunks per document" in text


def test_training_record_names_a_warm_restart(tmp_path: Path) -> None:
    from d2l_memory.training.report import training_markdown

    base = tiny_base()
    with pytest.raises(ValueError, match="holds no state to continue"):  # a continued run's config, copied
        Trainer(tiny_config(tmp_path / "run", steps=4, schedule_start=2), base=base)
    Trainer(tiny_config(tmp_path / "run", steps=2), base=base).run(progress=False)
    cfg = tiny_config(tmp_path / "run", steps=4, eval_every=2, schedule_start=2, encoder_autocast="bfloat16",
                      distractor_prob=0.25, inference_chunking_prob=0.5, chunking={"min_chunk_tokens": 8},
                      compaction_block_prob=0.5)
    Trainer(cfg, base=base).run(progress=False)
    text = training_markdown(tmp_path / "run", tmp_path / "ckpt", "d2l-memory export-checkpoint run ckpt")
    assert "warm restart at step 2" in text and "encoder pass in bfloat16" in text
    assert "with probability 0.25 the memory also holds chunks" in text
    assert "cut as the engine cuts them (min_chunk_tokens=8) with probability 0.5, else into 1–2 chunks" in text
    assert "chats cut first into compaction blocks of 4 messages" in text


def test_two_torchrun_processes_take_the_step_of_one_with_double_accumulation(tmp_path: Path) -> None:
    """Data parallelism: 2 processes × grad_accum 1 read the same micro-batches as 1 process × 2 and
    average the same gradients, so the weights agree up to float summation order."""
    steps = 2
    single = tiny_config(tmp_path / "single", steps, grad_accum=2, threads=1)
    Trainer(single, base=tiny_base()).run(progress=False)

    config = tmp_path / "ddp.json"
    config.write_text(tiny_config(tmp_path / "ddp", steps, threads=1).to_json())
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from tiny import tiny_base\n"
        "from d2l_memory.training.config import TrainConfig\n"
        "from d2l_memory.training.trainer import Trainer\n"
        "trainer = Trainer(TrainConfig.from_file(sys.argv[2]), base=tiny_base())\n"
        "assert trainer.workers.world == 2\n"
        "trainer.run(progress=False)\n"
        "trainer.workers.close()\n"
    )
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(TESTS), str(config)],
                          env={**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = Trainer(tiny_config(tmp_path / "fresh", steps), base=tiny_base()).hypernet.state_dict()
    assert any(not torch.equal(one[name], initial[name]) for name in one), "the steps changed nothing"
    log_one = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    log_two = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_two] == [1, 2]  # rank 0 alone writes: one record per step
    for a, b in zip(log_one, log_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_distractors_add_other_documents_chunks_after_the_own_ones(tmp_path: Path) -> None:
    import random

    from d2l_memory.training.batch import with_distractors

    chunks = [[0], [1, 2], [3]]
    assert with_distractors(chunks, random.Random(0), 0.0) == chunks
    for seed in range(20):
        mixed = with_distractors(chunks, random.Random(seed), 1.0)
        for own, memory in zip(chunks, mixed, strict=True):
            assert memory[: len(own)] == own and len(memory) > len(own)
            assert len(set(memory)) == len(memory)  # no chunk twice
    plain = Trainer(tiny_config(tmp_path / "a", 2), base=tiny_base()).microbatch(0, 0)
    noisy = Trainer(tiny_config(tmp_path / "b", 2, distractor_prob=1.0), base=tiny_base()).microbatch(0, 0)
    assert noisy.chunks == plain.chunks and noisy.qas == plain.qas  # same documents, same questions
    assert all(len(n) > len(p) for n, p in zip(noisy.doc_chunks, plain.doc_chunks, strict=True))
    with pytest.raises(ValueError, match="distractor_prob"):
        tiny_config(tmp_path, steps=10, distractor_prob=1.5)


def test_inference_chunking_cuts_training_documents_as_the_engine_does(tmp_path: Path) -> None:
    from d2l_memory.chunking import chunk_spans

    base = tiny_base()
    plain = Trainer(tiny_config(tmp_path / "a", 2), base=base).microbatch(0, 0)
    chunking = {"chunk_tokens": 64, "min_chunk_tokens": 8, "short_document_chunks": 5}
    cfg = tiny_config(tmp_path / "b", 2, inference_chunking_prob=1.0, chunking=chunking)
    trainer = Trainer(cfg, base=base)
    matched = trainer.microbatch(0, 0)
    prefix, suffix = len(trainer.affixes.prefix), len(trainer.affixes.suffix)

    def contents(batch: MicroBatch) -> list[list[int]]:  # each document's tokens, joined back from its chunks
        return [[t for i in own for t in batch.chunks[i][prefix:len(batch.chunks[i]) - suffix]]
                for own in batch.doc_chunks]

    assert contents(matched) == contents(plain)  # same documents, only the cuts differ
    for own in matched.doc_chunks:
        lengths = [len(matched.chunks[i]) - prefix - suffix for i in own]
        expected = [end - start for start, end in chunk_spans(sum(lengths), cfg.chunk_config())]
        assert lengths == expected and len(lengths) > 1
    with pytest.raises(ValueError, match="unknown chunking keys"):
        tiny_config(tmp_path, steps=10, chunking={"chunk_size": 8})
    with pytest.raises(ValueError, match="inference_chunking_prob"):
        tiny_config(tmp_path, steps=10, inference_chunking_prob=-0.1)


def test_compaction_blocks_cut_chats_as_the_memory_provider_compacts_them(tmp_path: Path) -> None:
    """Each block of 4 messages is rendered and chunked exactly as MemoryProvider → MemoryEngine would;
    documents that are not chats keep the batch they had without the option."""
    from d2l_memory.chunking import chunk_text, render_messages

    base = tiny_base()
    chunking = {"chunk_tokens": 64, "min_chunk_tokens": 8}
    chats = {"domain_weights": {"conversation": 1.0}, "chunking": chunking}
    trainer = Trainer(tiny_config(tmp_path / "a", 2, compaction_block_prob=1.0, **chats), base=base)
    batch = trainer.microbatch(0, 0)
    samples = trainer.samples("train", 0, trainer.cfg.docs_per_step)
    for sample, own in zip(samples, batch.doc_chunks, strict=True):
        messages = [dict(zip(("role", "content"), line.split(": ", 1), strict=True)) for line in sample.text.split("\n")]
        expected = [c.input_ids for i in range(0, len(messages), 4)
                    for c in chunk_text(render_messages(messages[i : i + 4]), base.tokenizer,
                                        trainer.cfg.chunk_config(), trainer.affixes)]
        assert [batch.chunks[i] for i in own] == expected
    assert max(len(s.text.split("\n")) for s in samples) > 4  # at least one chat spans several blocks

    facts = {"domain_weights": {"facts": 1.0}, "multi_chunk_prob": 0.5}
    plain = Trainer(tiny_config(tmp_path / "b", 2, **facts), base=base).microbatch(0, 0)
    with_option = Trainer(tiny_config(tmp_path / "c", 2, compaction_block_prob=1.0, **facts), base=base).microbatch(0, 0)
    assert plain.chunks == with_option.chunks and plain.doc_chunks == with_option.doc_chunks
    with pytest.raises(ValueError, match="compaction_block_prob"):
        tiny_config(tmp_path, steps=10, compaction_block_prob=2.0)
    with pytest.raises(ValueError, match="compaction_block_messages"):
        tiny_config(tmp_path, steps=10, compaction_block_messages=0)
