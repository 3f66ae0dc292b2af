from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from d2l_memory import lora_scope
from d2l_memory.lora import stack_per_row
from tiny import tiny_model

TARGET = "model.layers.{}.mlp.down_proj"


def random_adapter(model: torch.nn.Module, rank: int, seed: int, scale: float = 0.3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(model.config.num_hidden_layers):
        lin = model.get_submodule(TARGET.format(layer))
        a = torch.randn(rank, lin.in_features, generator=gen) * scale
        b = torch.randn(lin.out_features, rank, generator=gen) * scale
        out[TARGET.format(layer)] = (a, b)
    return out


def ids(batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(5, 250, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_scope_changes_outputs_and_leaving_restores_them_bit_for_bit() -> None:
    model = tiny_model()
    x = ids()
    before = model(x).logits
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    with lora_scope(model, random_adapter(model, 4, seed=0)):
        inside = model(x).logits
    after = model(x).logits
    assert not torch.allclose(before, inside)
    assert torch.equal(before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights_before.items())


@torch.no_grad()
def test_scope_is_removed_when_the_block_raises() -> None:
    model = tiny_model()
    x = ids()
    before = model(x).logits
    with pytest.raises(RuntimeError), lora_scope(model, random_adapter(model, 4, seed=0)):
        raise RuntimeError("boom")
    assert torch.equal(model(x).logits, before)


@torch.no_grad()
def test_per_row_adapters_match_running_each_row_alone() -> None:
    model = tiny_model()
    x = ids(batch=3)
    adapters = [random_adapter(model, 4, seed=1), None, random_adapter(model, 8, seed=2)]
    with lora_scope(model, adapters):
        batched = model(x).logits
    for row, adapter in enumerate(adapters):
        with lora_scope(model, adapter):
            alone = model(x[row : row + 1]).logits
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_matches_peft_lora_with_the_same_weights() -> None:
    rank = 4
    model = tiny_model()
    adapter = random_adapter(model, rank, seed=3)
    x = ids()
    with lora_scope(model, adapter):
        ours = model(x).logits
    reference = tiny_model()  # same seed, same base weights
    peft_model = get_peft_model(
        reference,
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["down_proj"], lora_dropout=0.0, init_lora_weights=False),
    )
    for name, (a, b) in adapter.items():
        module = peft_model.base_model.model.get_submodule(name)
        module.lora_A["default"].weight.copy_(a)  # peft: lora_A (r, d_in), lora_B (d_out, r), scale alpha/r = 1
        module.lora_B["default"].weight.copy_(b)
    torch.testing.assert_close(peft_model.eval()(x).logits, ours, rtol=1e-5, atol=1e-5)


def test_shape_and_module_errors_are_clear() -> None:
    model = tiny_model()
    adapter = random_adapter(model, 4, seed=0)
    name = TARGET.format(0)
    wrong = {name: (adapter[name][0][:, :-1], adapter[name][1])}
    with pytest.raises(ValueError, match="do not fit"), lora_scope(model, wrong):
        pass
    with pytest.raises(KeyError, match="lacks"), lora_scope(model, {"model.layers.9.mlp.down_proj": adapter[name]}):
        pass
    with pytest.raises(ValueError, match="per-row adapters"), lora_scope(model, [adapter, adapter]):
        model(ids(batch=3))


def test_stacking_pads_ranks_with_zeros() -> None:
    model = tiny_model()
    small, big = random_adapter(model, 2, seed=0), random_adapter(model, 6, seed=1)
    a, b = stack_per_row([small, None, big])[TARGET.format(0)]
    assert a.shape[:2] == (3, 6) and b.shape[0] == 3 and b.shape[2] == 6
    assert torch.count_nonzero(a[1]) == 0 and torch.count_nonzero(a[0, 2:]) == 0
