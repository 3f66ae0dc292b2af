"""Samples → one training micro-batch: encoder chunks, student question rows, answer labels, and the loss."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from d2l_memory.chunking import TurnAffixes, chunk_count, chunk_spans, even_spans
from d2l_memory.config import ChunkConfig
from d2l_memory.generation import prompt_ids
from d2l_memory.hypernet import HyperLoRA, HyperOutput
from d2l_memory.internalize import gather_weights, run_hypernet
from d2l_memory.lora import lora_scope, stack_per_row
from d2l_memory.training.synth import QA, Sample, transcript_blocks


@dataclass(frozen=True)
class Cutting:
    """How training documents are cut into chunks; the fields mirror the ``TrainConfig`` fields of the
    same names. The default cuts nothing: one chunk per document."""

    multi_chunk_prob: float = 0.0
    max_chunks: int = 1
    inference_chunking: ChunkConfig = ChunkConfig()
    inference_chunking_prob: float = 0.0
    compaction_block_messages: int = 4
    compaction_block_prob: float = 0.0


@dataclass(frozen=True)
class MicroBatch:
    chunks: list[tuple[int, ...]]
    """Wrapped token chunks of all documents."""
    doc_chunks: list[list[int]]
    """For each document, the indices of its chunks in ``chunks``."""
    row_doc: list[int]
    """For each student row, the document whose adapter it gets."""
    input_ids: torch.Tensor
    """(Q, S) prompt + answer tokens, right-padded."""
    attention_mask: torch.Tensor
    labels: torch.Tensor
    """(Q, S) answer token ids at the positions predicting them, -100 elsewhere."""
    qas: list[QA]
    teacher: TeacherRows | None = None
    """The same questions with the whole document in the prompt (only when distilling a teacher)."""


@dataclass(frozen=True)
class TeacherRows:
    """Teacher inputs: document + question + gold answer, labelled at the same answer tokens as the student."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def split_tokens(ids: Sequence[int], n_chunks: int) -> list[list[int]]:
    """Cut contiguous token ids into ``n_chunks`` near-equal pieces (as inference cuts long text)."""
    return [list(ids[start:end]) for start, end in even_spans(len(ids), n_chunks)]


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    return tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]


def build_microbatch(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    affixes: TurnAffixes,
    rng: random.Random,
    *,
    questions_per_doc: int,
    cutting: Cutting,
    row_doc_override: Sequence[int] | None = None,
    with_teacher: bool = False,
    distractor_prob: float = 0.0,
) -> MicroBatch:
    """Chunk each sample's text and pick its questions. ``row_doc_override`` swaps adapters (the control).

    ``with_teacher`` also builds the teacher's rows: the document in the prompt, then the same answer.
    ``distractor_prob``: the chance that a document's memory also holds the chunks of 1 to all of the
    batch's other documents (see ``TrainConfig.distractor_prob``).
    """
    chunks: list[tuple[int, ...]] = []
    doc_chunks: list[list[int]] = []
    rows: list[tuple[list[int], list[int]]] = []
    teacher_rows: list[tuple[list[int], list[int]]] = []
    row_doc: list[int] = []
    qas: list[QA] = []
    for d, sample in enumerate(samples):
        doc_chunks.append([])
        for piece in document_pieces(sample, tokenizer, rng, cutting):
            doc_chunks[-1].append(len(chunks))
            chunks.append(affixes.prefix + tuple(piece) + affixes.suffix)
        picked = rng.sample(list(sample.qas), min(questions_per_doc, len(sample.qas)))
        for qa in picked:
            rows.append((prompt_ids(tokenizer, qa.question), answer_ids(tokenizer, qa.answer)))
            if with_teacher:
                teacher_rows.append((prompt_ids(tokenizer, qa.question, context=sample.text), rows[-1][1]))
            row_doc.append(d)
            qas.append(qa)
    if distractor_prob > 0:  # no draw otherwise: batches of runs without distractors stay the same
        doc_chunks = with_distractors(doc_chunks, rng, distractor_prob)
    if row_doc_override is not None:
        row_doc = list(row_doc_override)
    ids, mask, labels = answer_rows(rows, tokenizer.pad_token_id)
    teacher = TeacherRows(*answer_rows(teacher_rows, tokenizer.pad_token_id)) if with_teacher else None
    return MicroBatch(chunks, doc_chunks, row_doc, ids, mask, labels, qas, teacher)


def document_pieces(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, rng: random.Random, cutting: Cutting
) -> list[list[int]]:
    """The content tokens of each chunk one training document is cut into."""
    # No extra draw unless the option is on and the sample is a chat: other batches stay the same.
    if (cutting.compaction_block_prob > 0 and sample.domain == "conversation"
            and rng.random() < cutting.compaction_block_prob):
        # As MemoryProvider compacts a chat: each block of messages is internalized on its own.
        blocks = [tokenizer.encode(b, add_special_tokens=False)
                  for b in transcript_blocks(sample.text, cutting.compaction_block_messages)]
        return [block[start:end] for block in blocks
                for start, end in chunk_spans(len(block), cutting.inference_chunking)]
    content = tokenizer.encode(sample.text, add_special_tokens=False)
    return split_tokens(content, chunk_draw(len(content), rng, cutting))


def chunk_draw(n_tokens: int, rng: random.Random, cutting: Cutting) -> int:
    """How many pieces one training document is cut into."""
    # No extra draw when the option is off: batches of runs that predate it stay the same.
    if cutting.inference_chunking_prob > 0 and rng.random() < cutting.inference_chunking_prob:
        return chunk_count(n_tokens, cutting.inference_chunking)
    return 1 if rng.random() >= cutting.multi_chunk_prob else rng.randint(2, cutting.max_chunks)


def with_distractors(doc_chunks: list[list[int]], rng: random.Random, prob: float) -> list[list[int]]:
    """Each document's chunk list, with probability ``prob`` followed by the chunks of 1..n-1 other
    documents of the batch (the order along the rank axis does not change the adapter)."""
    out = []
    for d, own in enumerate(doc_chunks):
        others = [o for o in range(len(doc_chunks)) if o != d]
        if others and rng.random() < prob:
            picked = rng.sample(others, rng.randint(1, len(others)))
            own = own + [c for o in picked for c in doc_chunks[o]]
        out.append(own)
    return out


def answer_rows(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask, labels) of prompt + answer rows; labels only on answer tokens."""
    longest = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        seq = prompt + answer
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        # Position t predicts token t+1: labels sit one position before each answer token.
        labels[r, len(prompt) - 1 : len(seq) - 1] = torch.tensor(answer)
    return ids, mask, labels


def answer_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """(n_answer_tokens, vocab) logits at the labelled positions only, in row-major order.

    The 49K-way head runs only where an answer token is predicted: over every position it would cost
    more than the whole LoRA path. Adapters apply if the caller is inside a ``lora_scope``.
    """
    device = model.get_input_embeddings().weight.device
    hidden = model.get_decoder()(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[labels.to(device) != -100]).float()


def per_row_mean(values: torch.Tensor, row_index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of per-token ``values`` within each row (``row_index`` says which row each token is in)."""
    sums = values.new_zeros(n_rows).index_add_(0, row_index, values)
    counts = values.new_zeros(n_rows).index_add_(0, row_index, torch.ones_like(values))
    return sums / counts


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-k log-probabilities at every answer token, in the student's answer-token order."""

    logprobs: torch.Tensor
    """(n_answer_tokens, k) log-probabilities renormalised over the top k."""
    indices: torch.Tensor
    """(n_answer_tokens, k) token ids."""


@torch.no_grad()
def teacher_top_k(model: PreTrainedModel, rows: TeacherRows, k: int) -> TeacherTopK:
    """The base model reading the document in its prompt: its top-k next-token distribution on the answer.

    Teacher-forced on the gold answer, so its positions line up one to one with the student's labels
    (no generation: sampling the teacher's own answers would cost more than the training step).
    """
    top = answer_logits(model, rows.input_ids, rows.attention_mask, rows.labels).topk(k, dim=-1)
    return TeacherTopK(top.values.log_softmax(-1), top.indices)


def top_k_kl(student_logits: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    """Per-token KL(teacher ‖ student) over the teacher's top-k tokens (the student renormalised there too)."""
    student = student_logits.log_softmax(-1).gather(-1, teacher.indices).log_softmax(-1)
    return (teacher.logprobs.exp() * (teacher.logprobs - student)).sum(-1)


@dataclass(frozen=True)
class StudentOutput:
    loss: torch.Tensor
    """Mean cross-entropy over answer tokens (per row, then over rows)."""
    row_loss: torch.Tensor
    """(Q,) mean cross-entropy over each row's answer tokens, detached."""
    kl: torch.Tensor
    """Mean top-k KL to the teacher, the same way; 0 without a teacher."""
    l1: torch.Tensor
    token_correct: torch.Tensor
    """(Q,) fraction of answer tokens predicted exactly (teacher-forced)."""
    answer_exact: torch.Tensor
    """(Q,) 1.0 where every answer token is the argmax."""
    token_hits: torch.Tensor
    """(answer tokens of all rows, row-major) True where the argmax is the answer token."""


def student_forward(
    model: PreTrainedModel,
    hypernet: HyperLoRA,
    layers_prefix: str,
    batch: MicroBatch,
    hyper_out: HyperOutput | None = None,
    teacher: TeacherTopK | None = None,
    encoder_autocast: torch.dtype | None = None,
) -> StudentOutput:
    """Make each document's adapter, apply per row, and score the answer tokens (and KL to ``teacher``).

    ``hyper_out``: the hypernetwork's output for ``batch.chunks`` if the caller already has it (scoring the
    same chunks twice, e.g. with swapped adapters, then runs the encoder once).
    """
    device = model.get_input_embeddings().weight.device
    out = hyper_out if hyper_out is not None else run_hypernet(model, hypernet, batch.chunks, encoder_autocast)
    doc_weights = [gather_weights(out, layers_prefix, rows) for rows in batch.doc_chunks]
    per_row = stack_per_row([doc_weights[d] for d in batch.row_doc])
    labels = batch.labels.to(device)
    with lora_scope(model, per_row):
        logits = answer_logits(model, batch.input_ids, batch.attention_mask, labels)
    picked = labels != -100
    row_index, n_rows = picked.nonzero()[:, 0], labels.shape[0]
    row_loss = per_row_mean(F.cross_entropy(logits, labels[picked], reduction="none"), row_index, n_rows)
    kl = torch.zeros((), device=device)
    if teacher is not None:
        kl = per_row_mean(top_k_kl(logits, teacher), row_index, n_rows).mean()
    hits = (logits.argmax(-1) == labels[picked]).detach()
    row_correct = per_row_mean(hits.float(), row_index, n_rows)
    l1 = torch.stack([t.abs().mean() for pair in out.values() for t in pair]).mean()
    return StudentOutput(row_loss.mean(), row_loss.detach(), kl, l1, row_correct, (row_correct == 1).float(), hits)
