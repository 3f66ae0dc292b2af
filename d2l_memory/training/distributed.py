"""Data parallelism for meta-training: one process per device, started by ``torchrun``.

Each process (rank) trains on its own micro-batches and the gradients are averaged before every
optimizer step, so W processes with ``grad_accum`` G take exactly the step one process takes with
``grad_accum`` W·G (same documents, same order; only float summation order differs). Rank 0 alone
writes the log, checkpoints and held-out scores. Without ``torchrun`` (no ``WORLD_SIZE`` in the
environment) everything here is a no-op for a single process.

The gradients are all-reduced by hand instead of wrapping the hypernetwork in
``DistributedDataParallel``: the module, its state-dict keys and its checkpoints stay exactly the
single-process ones, and one all-reduce per step is all a few-million-parameter network needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workers:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that logs and writes checkpoints."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> Workers:
        """Join the process group ``torchrun`` set up (gloo on CPU, NCCL on CUDA), or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        workers = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(workers.local_rank)
            dist.init_process_group(backend)
            logger.info("rank %d of %d joined the %s process group", workers.rank, world, backend)
        return workers

    def close(self) -> None:
        """Leave the process group (at the end of a run; a no-op for a single process)."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, configured: str) -> str:
        """Each process gets its own GPU (``cuda`` → ``cuda:<local rank>``); a CPU is shared."""
        if self.world > 1 and configured == "cuda":
            return f"cuda:{self.local_rank}"
        return configured

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        # Which parameters get a gradient depends on the config, not on the data, so every process
        # packs the same tensors in the same order.
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def average(self, values: Mapping[str, float], device: str) -> dict[str, float]:
        """The mean of each logged number over all processes."""
        if self.world == 1:
            return dict(values)
        keys = sorted(values)
        packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        return {k: float(v) / self.world for k, v in zip(keys, packed.tolist(), strict=True)}
