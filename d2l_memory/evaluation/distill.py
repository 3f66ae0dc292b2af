"""Context distillation: a LoRA trained by gradient descent to answer like the document in the prompt.

This is the expensive upper reference D2L is compared with. The probes come from the document
alone (never from evaluation questions): for each sentence, the prompt gives its first half and
the student, without the document, learns to match the teacher's next-token distributions (the
same model *with* the document in the prompt) over the second half.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2l_memory.adapter import MemoryAdapter
from d2l_memory.engine import MemoryEngine
from d2l_memory.generation import prompt_ids
from d2l_memory.lora import lora_scope

logger = logging.getLogger(__name__)
DISTILLED = "context-distillation"


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 100
    rank: int = 8
    lr: float = 2e-3
    probes_per_step: int = 8
    max_probes: int = 32


def document_probes(document: str, max_probes: int) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs: each sentence split in two halves by words."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", document) if len(s.split()) >= 4]
    probes = []
    for sentence in sentences[:max_probes]:
        words = sentence.split()
        cut = max(2, len(words) // 2)
        prompt = f"Continue this sentence from the document: {' '.join(words[:cut])}"
        probes.append((prompt, " " + " ".join(words[cut:])))
    return probes


def _rows(
    engine: MemoryEngine, probes: list[tuple[str, str]], document: str | None
) -> list[tuple[list[int], list[int]]]:
    tok = engine.tokenizer
    return [(prompt_ids(tok, p, document), tok.encode(c, add_special_tokens=False)) for p, c in probes]


def _padded(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, list[range]]:
    longest = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), longest), pad)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    spans = []
    for r, (p, c) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        mask[r, : len(p) + len(c)] = 1
        spans.append(range(len(p) - 1, len(p) + len(c) - 1))  # positions predicting the continuation
    return ids, mask, spans


def _target_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, spans: list[range]) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.cat([logits[r, list(span)] for r, span in enumerate(spans)]).float()


def context_distill(
    engine: MemoryEngine, document: str, cfg: DistillConfig = DistillConfig(), seed: int = 0
) -> MemoryAdapter:
    model, tok = engine.model, engine.tokenizer
    probes = document_probes(document, cfg.max_probes)
    if not probes:
        raise ValueError("document has no sentence long enough to distil")
    with torch.no_grad():
        teacher = []
        for p in probes:  # one probe at a time: each carries the whole document
            ids, mask, spans = _padded(_rows(engine, [p], document), tok.pad_token_id)
            teacher.append(F.log_softmax(_target_logits(model, ids, mask, spans), -1))
    student_rows = _rows(engine, probes, None)

    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in (n for n, _ in engine.adapter_targets()):
        module = model.get_submodule(name)
        a = (torch.randn(cfg.rank, module.in_features, generator=gen) / module.in_features**0.5).requires_grad_()
        b = torch.zeros(module.out_features, cfg.rank, requires_grad=True)  # ΔW = 0 at the start, as in peft
        weights[name] = (a, b)
    params = [t for pair in weights.values() for t in pair]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed + 1)
    for step in range(cfg.steps):
        pick = torch.randperm(len(probes), generator=order)[: cfg.probes_per_step].tolist()
        ids, mask, spans = _padded([student_rows[i] for i in pick], tok.pad_token_id)
        with lora_scope(model, weights):
            student = F.log_softmax(_target_logits(model, ids, mask, spans), -1)
        target = torch.cat([teacher[i] for i in pick])
        loss = F.kl_div(student, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            logger.debug("context distillation step %d: KL %.4f", step, loss.item())
    detached = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in weights.items()}
    n_tokens = len(tok.encode(document, add_special_tokens=False))
    return MemoryAdapter(detached, rank_per_chunk=cfg.rank, chunk_spans=((0, n_tokens),),
                         base_model=engine.base_model_id, hypernet=DISTILLED)
