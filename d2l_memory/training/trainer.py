"""The meta-training loop: progress bar, periodic checkpoints, exact resume, a JSONL log, held-out checks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from d2l_memory.base_model import LoadedBaseModel, decoder_layers_prefix, load_base_model
from d2l_memory.chunking import user_turn_affixes
from d2l_memory.config import EncoderConfig
from d2l_memory.engine import default_hypernet_config
from d2l_memory.hypernet import HyperLoRA, count_parameters
from d2l_memory.internalize import run_hypernet
from d2l_memory.training.batch import Cutting, MicroBatch, build_microbatch, student_forward, teacher_top_k
from d2l_memory.training.config import TrainConfig
from d2l_memory.training.distributed import Workers
from d2l_memory.training.grow import grown_hypernet
from d2l_memory.training.state import (
    OPTIMIZER_FILE,
    is_weights_only,
    latest_state_dir,
    load_training_state,
    save_training_state,
)
from d2l_memory.training.synth import QA, Sample, mixed_sample

logger = logging.getLogger(__name__)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``, counted from ``schedule_start``."""
    step -= cfg.schedule_start
    if step < cfg.warmup_steps:
        return (max(0, step) + 1) / cfg.warmup_steps
    span = cfg.steps - cfg.schedule_start - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, span))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class HeldOutRow:
    """One held-out question, teacher-forced: share of answer tokens that are the argmax."""

    qa: QA
    own_token_acc: float
    """With its own document's adapter."""
    wrong_token_acc: float
    """With another document's adapter (the control)."""
    own_loss: float
    """Mean cross-entropy over its answer tokens, own adapter."""
    own_hits: tuple[bool, ...] = ()
    """Per answer token (the end-of-turn token last): is it the argmax, own adapter."""
    wrong_hits: tuple[bool, ...] = ()
    """The same with the wrong document's adapter."""


@dataclass(frozen=True)
class HeldOutScore:
    own_exact: float
    """Teacher-forced: share of questions whose answer tokens are all argmax, with their document's adapter."""
    wrong_exact: float
    """The same with another document's adapter (the control: should stay near zero)."""
    own_token_acc: float
    wrong_token_acc: float
    loss: float

    @classmethod
    def of(cls, rows: Sequence[HeldOutRow]) -> HeldOutScore:
        if not rows:
            raise ValueError("no held-out questions to score")
        mean = lambda values: sum(values) / len(rows)  # noqa: E731
        return cls(
            own_exact=mean(float(r.own_token_acc == 1.0) for r in rows),
            wrong_exact=mean(float(r.wrong_token_acc == 1.0) for r in rows),
            own_token_acc=mean(r.own_token_acc for r in rows),
            wrong_token_acc=mean(r.wrong_token_acc for r in rows),
            loss=mean(r.own_loss for r in rows),
        )


class Trainer:
    """Meta-trains a hypernetwork for one base model. ``run()`` resumes from ``out_dir/state`` if present."""

    def __init__(self, cfg: TrainConfig, base: LoadedBaseModel | None = None, workers: Workers | None = None) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.workers = workers or Workers.from_env(cfg.device)
        """This process among ``torchrun``'s (a single process without it)."""
        self.device = self.workers.device(cfg.device)
        self.base = base or load_base_model(cfg.base_model, device=self.device)
        self.run_dir = Path(cfg.out_dir)
        self.layers_prefix = decoder_layers_prefix(self.base.model)
        self.affixes = user_turn_affixes(self.base.tokenizer)
        encoder = EncoderConfig(feature_layer=cfg.feature_layer, target_keys=cfg.target_keys)
        self.hypernet_cfg = default_hypernet_config(self.base.model, cfg.targets, cfg.rank, encoder, **cfg.hypernet)
        self.step = 0
        state_dir = latest_state_dir(self.run_dir)
        if state_dir is not None:
            self.hypernet, self.optimizer, info = load_training_state(
                state_dir, self._optimizer, self.base.fingerprint, self.device
            )
            self.step = int(info["step"])
            if is_weights_only(state_dir):
                self._require_warm_restart(f"{state_dir} is weights-only (no {OPTIMIZER_FILE}): the optimizer "
                                           "restarts from zero")
                logger.warning("%s is weights-only: AdamW moments restart from zero at step %d", state_dir, self.step)
            logger.info("Resumed from %s at step %d", state_dir, self.step)
            if self.hypernet.cfg != self.hypernet_cfg:
                self._grow(state_dir)
        else:
            if cfg.schedule_start:
                # A config copied from a continued run would otherwise crawl at lr/warmup_steps until
                # step schedule_start, silently.
                raise ValueError(
                    f"schedule_start {cfg.schedule_start} continues a run, but {self.run_dir} holds no state to "
                    f"continue: copy the run's state there (training-runs/README.md) or set schedule_start 0"
                )
            torch.manual_seed(cfg.seed)
            self.hypernet = HyperLoRA(self.hypernet_cfg).to(self.device).train()
            self.optimizer = self._optimizer(self.hypernet.parameters())
        logger.info("Hypernetwork: %s parameters", f"{count_parameters(self.hypernet):,}")

    def _require_warm_restart(self, why: str) -> None:
        """Fresh AdamW moments would take full-size steps at whatever lr the old cycle had reached;
        only a new warm-up starting at the resumed step makes that safe."""
        if self.cfg.schedule_start != self.step:
            raise ValueError(f"{why}, so continue it as a warm restart with \"schedule_start\": {self.step} "
                             f"(config has {self.cfg.schedule_start})")

    def _grow(self, state_dir: Path) -> None:
        """The config adds zero-initialised components to the saved network (or is an error)."""
        grown = grown_hypernet(self.hypernet, self.hypernet_cfg, seed=self.cfg.seed + self.step)
        self._require_warm_restart(f"the config grows the hypernetwork saved in {state_dir}, and the new "
                                   "parameters have no optimizer moments")
        self.hypernet = grown
        self.optimizer = self._optimizer(self.hypernet.parameters())
        logger.warning("Grew the hypernetwork of %s at step %d; AdamW moments restart from zero", state_dir, self.step)

    def _optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.98))

    # ---- data ----------------------------------------------------------------------------------

    def samples(self, split: str, start: int, count: int) -> list[Sample]:
        weights = self.cfg.domain_weights
        return [mixed_sample(self.cfg.seed, split, start + i, weights) for i in range(count)]  # type: ignore[arg-type]

    def microbatch(self, step: int, micro: int) -> MicroBatch:
        """This process's ``micro``-th micro-batch of ``step``. Processes take consecutive micro-batches
        of the step, so W processes with ``grad_accum`` G read what one process with W·G would."""
        cfg = self.cfg
        index = self.workers.rank * cfg.grad_accum + micro
        first = (step * cfg.grad_accum * self.workers.world + index) * cfg.docs_per_step
        rng = random.Random(f"{cfg.seed}/batch/{step}/{index}")
        return build_microbatch(
            self.samples("train", first, cfg.docs_per_step), self.base.tokenizer, self.affixes, rng,
            questions_per_doc=cfg.questions_per_doc, cutting=cfg.cutting(), with_teacher=cfg.kl_weight > 0,
            distractor_prob=cfg.distractor_prob,
        )

    # ---- loop ----------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "kl": 0.0, "l1": 0.0, "token_acc": 0.0, "exact": 0.0}
        for micro in range(cfg.grad_accum):
            batch = self.microbatch(self.step, micro)
            teacher = teacher_top_k(self.base.model, batch.teacher, cfg.teacher_top_k) if batch.teacher else None
            with self._student_autocast():
                out = student_forward(self.base.model, self.hypernet, self.layers_prefix, batch, teacher=teacher,
                                      encoder_autocast=cfg.encoder_dtype())
            loss = cfg.ce_weight * out.loss + cfg.kl_weight * out.kl + cfg.l1_weight * out.l1
            (loss / cfg.grad_accum).backward()
            totals["loss"] += out.loss.item() / cfg.grad_accum
            totals["kl"] += out.kl.item() / cfg.grad_accum
            totals["l1"] += out.l1.item() / cfg.grad_accum
            totals["token_acc"] += out.token_correct.mean().item() / cfg.grad_accum
            totals["exact"] += out.answer_exact.mean().item() / cfg.grad_accum
        self.workers.average_gradients(self.hypernet.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.hypernet.parameters(), cfg.grad_clip).item()
        self.optimizer.step()
        self.step += 1
        return {**self.workers.average(totals, self.device), "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _student_autocast(self) -> contextlib.AbstractContextManager[None]:
        dtype = self.cfg.student_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    @torch.no_grad()
    def held_out_rows(self, samples: Sequence[Sample], encoder_autocast: torch.dtype | None = None,
                      combined: int = 1) -> list[HeldOutRow]:
        """Teacher-forced scores of every question of ``samples`` (one chunk each), own memory vs a wrong one.

        ``combined`` 1: a document's own adapter vs the next document's; documents go in near-equal groups
        of at most 8. ``combined`` k > 1: the adapters of k documents concatenated along rank, as a long
        document's chunks are; a question's own memory holds its document among k - 1 others, the wrong
        one k other documents. Documents go in groups of 2k (a remainder is not scored).
        The encoder pass runs in full precision unless ``encoder_autocast`` says otherwise."""
        if len(samples) < 2 * combined:
            raise ValueError(f"held-out scoring of {combined} combined memories needs at least {2 * combined} "
                             f"documents (own and wrong memories hold different ones), got {len(samples)}")
        self.hypernet.eval()
        rows: list[HeldOutRow] = []
        if combined == 1:
            n_groups = -(-len(samples) // 8)
            bounds = [round(i * len(samples) / n_groups) for i in range(n_groups + 1)]
        else:
            size = 2 * combined
            bounds = list(range(0, len(samples) // size * size + 1, size))
        for start, end in zip(bounds, bounds[1:]):
            group = samples[start:end]
            rng = random.Random(f"{self.cfg.seed}/eval/{start}")
            batch = build_microbatch(group, self.base.tokenizer, self.affixes, rng, questions_per_doc=4,
                                     cutting=Cutting())
            # One encoder + hypernetwork pass; own and wrong rows read the same adapters.
            hyper_out = run_hypernet(self.base.model, self.hypernet, batch.chunks, encoder_autocast)
            own_batch, wrong_batch = held_out_pair(batch, combined)
            own = student_forward(self.base.model, self.hypernet, self.layers_prefix, own_batch, hyper_out=hyper_out)
            wrong = student_forward(self.base.model, self.hypernet, self.layers_prefix, wrong_batch,
                                    hyper_out=hyper_out)
            lengths = (batch.labels != -100).sum(1).tolist()
            own_hits, wrong_hits = own.token_hits.split(lengths), wrong.token_hits.split(lengths)
            rows += [
                HeldOutRow(qa, float(own.token_correct[i]), float(wrong.token_correct[i]), float(own.row_loss[i]),
                           tuple(own_hits[i].tolist()), tuple(wrong_hits[i].tolist()))
                for i, qa in enumerate(batch.qas)
            ]
        self.hypernet.train()
        return rows

    def held_out(self) -> HeldOutScore:
        """Teacher-forced accuracy on the run's fixed held-out documents, own adapter vs a wrong document's."""
        rows = self.held_out_rows(self.samples("test", 0, self.cfg.eval_docs))
        return HeldOutScore.of(rows)

    def run(self, progress: bool = True) -> None:
        """Train up to ``cfg.steps``. Under ``torchrun`` every process trains; rank 0 alone writes."""
        cfg = self.cfg
        if not self.workers.is_main:
            while self.step < cfg.steps:
                self.train_step()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "train_config.json").write_text(cfg.to_json())
        log_path = self.run_dir / "log.jsonl"
        bar = tqdm(total=cfg.steps, initial=self.step, desc="meta-training", unit="step", disable=not progress)
        with log_path.open("a") as log:
            while self.step < cfg.steps:
                started = time.perf_counter()
                record: dict[str, Any] = {"step": self.step + 1, **self.train_step()}
                record["seconds"] = round(time.perf_counter() - started, 3)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    score = self.held_out()
                    record["held_out"] = score.__dict__
                    logger.info("step %d held-out: %s", self.step, score)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['token_acc']:.2f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
        bar.close()

    def save(self) -> Path:
        return save_training_state(
            self.run_dir, self.hypernet, self.optimizer, step=self.step, base_model_name=self.cfg.base_model,
            base_model_fingerprint=self.base.fingerprint, extra={"train_config": json.loads(self.cfg.to_json())},
        )


def held_out_pair(batch: MicroBatch, combined: int) -> tuple[MicroBatch, MicroBatch]:
    """The same questions with their own memory and with a wrong one (see ``Trainer.held_out_rows``)."""
    if combined == 1:
        wrong_doc = [(d + 1) % len(batch.doc_chunks) for d in batch.row_doc]
        return batch, dataclasses.replace(batch, row_doc=wrong_doc)
    halves = [[c for d in range(h * combined, (h + 1) * combined) for c in batch.doc_chunks[d]] for h in (0, 1)]
    half = [d // combined for d in batch.row_doc]
    return (dataclasses.replace(batch, doc_chunks=halves, row_doc=half),
            dataclasses.replace(batch, doc_chunks=halves, row_doc=[1 - h for h in half]))
