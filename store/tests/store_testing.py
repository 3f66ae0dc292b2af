"""Helpers shared by the store tests: adapter factories, server requirements, store openers.

A plain module (not conftest) so subprocess targets can import it too; its name is unique in the
repository because pytest puts every test directory on sys.path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from d2l_store import AdapterStore, MemoryKind, Scope

POSTGRES_ENV = "D2L_TEST_POSTGRES_URL"
S3_ENV = "D2L_TEST_S3_ENDPOINT"
S3_BUCKET = "d2l-store-tests"
START_HINT = "start them with `store/scripts/start_test_servers.sh /tmp/env && . /tmp/env`"

BASE = "tiny-llama@sha256:0000"
HYPER = "hypernet@sha256:1111"
MODULES = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


def require_env(name: str, what: str) -> str:
    """The variable's value; if unset, skip the test, except on CI (CI=true) where it must fail,
    so a CI run can never pass by silently skipping its server tests."""
    value = os.environ.get(name, "")
    if value:
        return value
    msg = f"{what} tests need {name}; {START_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{msg} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(msg)


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}


def ensure_bucket(endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options(endpoint))
    if not fs.exists(S3_BUCKET):
        fs.mkdir(S3_BUCKET)


def make_adapter(
    n_chunks: int = 2,
    r: int = 4,
    modules: Sequence[str] = MODULES,
    d_in: int = 24,
    d_out: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random tensors in the store's convention: A (R, d_in), B (d_out, R), R = n_chunks * r."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[f"{m}.lora_A"] = torch.randn(n_chunks * r, d_in, generator=g).to(dtype)
        out[f"{m}.lora_B"] = torch.randn(d_out, n_chunks * r, generator=g).to(dtype)
    return out


def spans(n_chunks: int, size: int = 512) -> list[tuple[int, int]]:
    return [(i * size, (i + 1) * size) for i in range(n_chunks)]


def put_simple(store: AdapterStore, scope: Scope, *, n_chunks: int = 2, r: int = 4, seed: int = 0, **kw: Any):
    """Put a random adapter with default fingerprints; returns the record."""
    kw.setdefault("kind", MemoryKind.DOCUMENT)
    kw.setdefault("base_model", BASE)
    kw.setdefault("hypernet", HYPER)
    return store.put(
        make_adapter(n_chunks=n_chunks, r=r, seed=seed), scope=scope, rank_per_chunk=r, chunk_spans=spans(n_chunks), **kw
    )


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def unique_prefix() -> str:
    return uuid.uuid4().hex[:12]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
