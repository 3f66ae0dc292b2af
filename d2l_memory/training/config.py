"""TrainConfig: everything a meta-training run depends on, stored with every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d2l_memory.config import ChunkConfig
from d2l_memory.dtypes import float_dtype
from d2l_memory.training.batch import Cutting


@dataclass(frozen=True)
class TrainConfig:
    base_model: str = "smollm2-135m-instruct"
    """Built-in name, local folder or hub id of the frozen base model."""
    out_dir: str = "runs/default"
    """Checkpoints, logs and plots go here."""
    seed: int = 0
    steps: int = 3000
    """Optimizer steps."""
    docs_per_step: int = 4
    """Documents per micro-batch (all their chunks go through the encoder in one pass)."""
    questions_per_doc: int = 4
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr · min_lr_ratio."""
    schedule_start: int = 0
    """Step at which the current warm-up + cosine cycle begins. A run continued past its first cosine
    sets this to the step it resumes from (a warm restart); 0 is a single cycle from the start."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ce_weight: float = 1.0
    """Cross-entropy on the gold answer tokens."""
    kl_weight: float = 0.0
    """KL to the teacher's top-k (the base model with the document in its prompt), D2L's objective.
    Off by default: an earlier CPU experiment on this model (figures in issue 8) found it no better than
    gold CE at a one-hour budget, the 135M teacher being right only ~77% of the time, and the teacher's
    forward pass over the whole document adds to every step. Not re-measured for the shipped run."""
    teacher_top_k: int = 16
    l1_weight: float = 0.0
    """L1 penalty on the generated A and B (D2L uses 0.1 with its scaling)."""
    multi_chunk_prob: float = 0.5
    """Probability that a training document is cut into 2..max_chunks chunks (else one chunk)."""
    max_chunks: int = 4
    inference_chunking_prob: float = 0.0
    """Probability that a training document is cut exactly as the engine cuts it at inference
    (``ChunkConfig`` with the ``chunking`` overrides) instead of by the ``multi_chunk_prob`` draw. The
    random draw spreads evenly over every chunk count, so it seldom hits the engine's exact count; this
    trains on the counts the engine actually makes (with the default chunking, a 150-token fact
    document becomes 5 pieces of 30 tokens)."""
    chunking: dict[str, Any] = field(default_factory=dict)
    """Overrides of ChunkConfig fields for ``inference_chunking_prob``: set them to the chunking the
    trained hypernetwork will be used with."""
    compaction_block_prob: float = 0.0
    """Probability that a chat (conversation-domain) document is cut as ``MemoryProvider`` compacts a
    chat: into blocks of ``compaction_block_messages`` messages, each block then chunked on its own as
    the engine chunks it (``chunking``). Such blocks start and end at message boundaries and are encoded
    without their neighbours, which neither of the cuts above reproduces."""
    compaction_block_messages: int = 4
    """Messages per compaction block: ``ProviderConfig.compact_block`` of the provider to train for."""
    distractor_prob: float = 0.0
    """Probability that a document's memory in a step also holds the chunk adapters of 1 to all of the
    step's other documents, as when a long document, a compacted chat or several memories are applied
    at once and most chunks are irrelevant to the question. Costs no extra encoding (those chunks are
    encoded for their own documents anyway)."""
    domain_weights: dict[str, float] = field(
        default_factory=lambda: {"facts": 0.5, "conversation": 0.2, "tool": 0.15, "needle": 0.15}
    )
    rank: int = 8
    targets: tuple[str, ...] = ("mlp.down_proj",)
    hypernet: dict[str, Any] = field(default_factory=dict)
    """Overrides of HypernetConfig fields (width, n_blocks, n_heads, proj_hidden, copy_path,
    head_layer_rank). A resumed run must match its saved network, except that ``head_layer_rank`` may
    grow from 0 at a warm restart (``d2l_memory.training.grow``)."""
    feature_layer: int | None = None
    """See EncoderConfig.feature_layer."""
    target_keys: bool = True
    """See EncoderConfig.target_keys."""
    encoder_autocast: str | None = None
    """Run the frozen encoder pass under autocast to this dtype ("bfloat16"), ``None`` for full
    precision. Only the encoder (no gradients) is affected; the student pass follows ``student_autocast``."""
    student_autocast: str | None = None
    """Run the student pass (base model with the generated adapters, and the hypernetwork that makes
    them) under autocast to this dtype ("bfloat16" on GPUs), ``None`` for full precision. Weights,
    gradients and optimizer moments stay fp32."""
    checkpoint_every: int = 50
    eval_every: int = 100
    eval_docs: int = 48
    """Held-out documents scored (teacher-forced) at each evaluation. They are drawn with
    ``domain_weights``, so a run that changes its mix also changes this set: compare held-out rows
    across such a change only after re-scoring the older state on the new set."""
    device: str = "cpu"
    threads: int | None = None
    """torch intra-op threads; None keeps torch's default."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        data = dict(data)
        if "targets" in data:
            data["targets"] = tuple(data["targets"])
        return cls(**data)

    def __post_init__(self) -> None:
        # Fail when the config is made, not an hour into the run.
        self.encoder_dtype()
        self.student_dtype()
        if not 0 <= self.schedule_start < self.steps:
            raise ValueError(f"schedule_start {self.schedule_start} must lie in 0..steps-1 ({self.steps - 1})")
        for name in ("multi_chunk_prob", "inference_chunking_prob", "compaction_block_prob", "distractor_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} must lie in 0..1")
        self.chunk_config()
        if self.compaction_block_messages < 1:
            raise ValueError(f"compaction_block_messages {self.compaction_block_messages} must be at least 1")
        if self.eval_docs < 2:
            raise ValueError(
                f"eval_docs {self.eval_docs} must be at least 2: each held-out document is another's control"
            )

    def chunk_config(self) -> ChunkConfig:
        """The inference chunking ``inference_chunking_prob`` trains for; a typed error names a bad key."""
        known = {f.name for f in dataclasses.fields(ChunkConfig)}
        unknown = sorted(set(self.chunking) - known)
        if unknown:
            raise ValueError(f"unknown chunking keys: {unknown} (ChunkConfig fields: {sorted(known)})")
        return ChunkConfig(**self.chunking)

    def cutting(self) -> Cutting:
        """How this run cuts its training documents into chunks."""
        return Cutting(
            multi_chunk_prob=self.multi_chunk_prob, max_chunks=self.max_chunks,
            inference_chunking=self.chunk_config(), inference_chunking_prob=self.inference_chunking_prob,
            compaction_block_messages=self.compaction_block_messages, compaction_block_prob=self.compaction_block_prob,
        )

    def encoder_dtype(self) -> torch.dtype | None:
        """``encoder_autocast`` as a torch dtype; a typed error names the bad value."""
        return self._autocast_dtype("encoder_autocast")

    def student_dtype(self) -> torch.dtype | None:
        """``student_autocast`` as a torch dtype; a typed error names the bad value."""
        return self._autocast_dtype("student_autocast")

    def _autocast_dtype(self, field_name: str) -> torch.dtype | None:
        value = getattr(self, field_name)
        if value is None:
            return None
        try:
            return float_dtype(value)
        except ValueError as err:
            raise ValueError(f"{field_name} {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
