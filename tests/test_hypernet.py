from __future__ import annotations

import dataclasses

import pytest
import torch

from d2l_memory import EncoderConfig, HypernetConfig, TargetSpec
from d2l_memory.encoder import encode_chunks
from d2l_memory.hypernet import HyperLoRA, count_parameters
from d2l_memory.internalize import run_hypernet
from tiny import tiny_hypernet_config, tiny_model, tiny_tokenizer


def chunk_ids(texts: list[str]) -> list[list[int]]:
    return [tiny_tokenizer().encode(t, add_special_tokens=False) for t in texts]


def test_output_shapes_for_every_layer_and_chunk() -> None:
    model = tiny_model()
    net = HyperLoRA(tiny_hypernet_config(model, rank=4))
    out = run_hypernet(model, net, chunk_ids(["Alice lives in Paris.", "Bob likes teal and works as a baker."]))
    a, b = out["mlp.down_proj"]
    assert a.shape == (2, 2, 4, model.config.intermediate_size)
    assert b.shape == (2, 2, model.config.hidden_size, 4)


def test_delta_w_is_zero_at_initialisation() -> None:
    model = tiny_model()
    net = HyperLoRA(tiny_hypernet_config(model))
    a, b = run_hypernet(model, net, chunk_ids(["Alice lives in Paris."]))["mlp.down_proj"]
    assert torch.count_nonzero(b @ a) == 0 and torch.count_nonzero(a) > 0


def test_gradients_reach_the_hypernetwork_through_a_zero_init() -> None:
    model = tiny_model()
    net = HyperLoRA(tiny_hypernet_config(model))
    a, b = run_hypernet(model, net, chunk_ids(["Alice lives in Paris."]))["mlp.down_proj"]
    (b.sum() + a.sum()).backward()
    head = net.heads["mlp__down_proj"]
    assert head.scale_b.grad is not None and head.scale_b.grad.abs().sum() > 0


def test_padding_does_not_change_a_chunks_factors() -> None:
    model = tiny_model()
    net = HyperLoRA(tiny_hypernet_config(model)).eval()
    with torch.no_grad():
        net.heads["mlp__down_proj"].scale_b.fill_(1.0)
        short = chunk_ids(["Alice lives in Paris."])
        alone = run_hypernet(model, net, short)["mlp.down_proj"]
        padded = run_hypernet(model, net, short + chunk_ids(["A much longer neighbour chunk that forces padding " * 3]))
    torch.testing.assert_close(padded["mlp.down_proj"][0][:1], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded["mlp.down_proj"][1][:1], alone[1], rtol=1e-4, atol=1e-5)


def test_early_exit_encoder_without_keys_works() -> None:
    model = tiny_model(layers=3)
    net = HyperLoRA(tiny_hypernet_config(model, encoder=EncoderConfig(feature_layer=1, target_keys=False)))
    a, _ = run_hypernet(model, net, chunk_ids(["Alice lives in Paris."]))["mlp.down_proj"]
    assert a.shape[1] == 3


def test_keys_are_each_layers_target_input_and_the_pass_stops_after_the_last() -> None:
    model = tiny_model(layers=3)
    ids = chunk_ids(["Alice lives in Paris.", "Bob likes teal."])
    expected: list[torch.Tensor] = []
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: expected.append(args[0]))
               for layer in model.model.layers]
    norm_calls: list[int] = []
    handles.append(model.model.norm.register_forward_hook(lambda *_: norm_calls.append(1)))
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids[0][:4], ids[1][:4]]))
    assert norm_calls == [1]
    encoded = encode_chunks(model, [c[:4] for c in ids], EncoderConfig(feature_layer=1), ["mlp.down_proj"])
    for handle in handles:
        handle.remove()
    # The encoder's own pass ran every down_proj pre-hook (3 more captures) but not the final norm.
    assert len(expected) == 6 and norm_calls == [1]
    torch.testing.assert_close(encoded.keys["mlp.down_proj"], torch.stack(expected[:3], dim=1))


def test_default_model_sized_hypernet_stays_under_20m_parameters() -> None:
    # SmolLM2-135M: 30 layers, hidden 576, down_proj 1536 -> 576.
    cfg = HypernetConfig(base_hidden_size=576, num_layers=30, targets=(TargetSpec("mlp.down_proj", 1536, 576),))
    assert count_parameters(HyperLoRA(cfg)) < 20_000_000


def test_other_targets_by_config() -> None:
    model = tiny_model()
    cfg = tiny_hypernet_config(model)
    from d2l_memory.engine import default_hypernet_config

    cfg = default_hypernet_config(
        model, ("mlp.down_proj", "self_attn.q_proj"), 2, width=32, n_heads=2, n_blocks=1, proj_hidden=64
    )
    out = run_hypernet(model, HyperLoRA(cfg), chunk_ids(["Alice lives in Paris."]))
    assert set(out) == {"mlp.down_proj", "self_attn.q_proj"}
    assert out["self_attn.q_proj"][0].shape[-1] == model.config.hidden_size


def test_bf16_encoder_autocast_gives_fp32_activations_close_to_fp32() -> None:
    model = tiny_model()
    cfg = tiny_hypernet_config(model)
    targets = [t.name for t in cfg.targets]
    chunks = chunk_ids(["Alice lives in Paris.", "Bob likes teal and works as a baker."])
    full = encode_chunks(model, chunks, cfg.encoder, targets)
    half = encode_chunks(model, chunks, cfg.encoder, targets, autocast_dtype=torch.bfloat16)
    assert half.features.dtype == torch.float32 and half.keys["mlp.down_proj"].dtype == torch.float32
    for ref, got in ((full.features, half.features), (full.keys["mlp.down_proj"], half.keys["mlp.down_proj"])):
        relative = (got - ref).norm() / ref.norm()
        assert 0 < relative < 0.05  # bf16 really ran (not bit-identical), and stayed close


def test_per_layer_head_correction_starts_at_zero_and_learns_per_layer() -> None:
    model = tiny_model()
    plain_cfg = tiny_hypernet_config(model)
    torch.manual_seed(0)
    plain = HyperLoRA(plain_cfg)
    corrected = HyperLoRA(dataclasses.replace(plain_cfg, head_layer_rank=3))
    missing, unexpected = corrected.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and {m.rsplit(".", 1)[-1] for m in missing} == {"layer_down", "layer_up_a", "layer_up_b"}
    with torch.no_grad():
        for net in (plain, corrected):
            net.heads["mlp__down_proj"].scale_b.fill_(1.0)  # a non-zero ΔW, so B's direction matters too
    chunks = chunk_ids(["Alice lives in Paris."])
    before = run_hypernet(model, plain, chunks)["mlp.down_proj"]
    after = run_hypernet(model, corrected, chunks)["mlp.down_proj"]
    assert all(torch.equal(x, y) for x, y in zip(before, after))  # zero-initialised: the same adapter

    a, b = after
    (a[:, 0].sum() + b[:, 0].sum()).backward()  # a loss on layer 0 alone
    up_a = corrected.heads["mlp__down_proj"].layer_up_a.grad
    assert up_a[0].abs().sum() > 0 and up_a[1:].abs().sum() == 0  # each layer has its own correction


def test_key_copy_adds_a_zero_scaled_component_that_writes_the_next_pointed_token() -> None:
    model = tiny_model()
    keyed = EncoderConfig(target_keys=True)
    plain_cfg = tiny_hypernet_config(model, encoder=EncoderConfig(target_keys=False))
    torch.manual_seed(0)
    plain = HyperLoRA(plain_cfg)
    copying = HyperLoRA(dataclasses.replace(plain_cfg, key_copy=True, encoder=keyed))
    missing, unexpected = copying.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and [m.rsplit(".", 1)[-1] for m in missing] == ["scale_key_copy"]
    with torch.no_grad():
        for net in (plain, copying):
            net.heads["mlp__down_proj"].scale_b.fill_(1.0)
    chunks = chunk_ids(["Alice lives in Paris.", "Bob likes teal and works as a baker."])
    a0, b0 = run_hypernet(model, plain, chunks)["mlp.down_proj"]
    a1, b1 = run_hypernet(model, copying, chunks)["mlp.down_proj"]
    r = plain_cfg.rank
    assert copying.cfg.rank_per_chunk == 2 * r and a1.shape[2] == 2 * r and b1.shape[3] == 2 * r
    # Shared A stays key-free, and the new components start with zero B: the same ΔW as before.
    assert torch.equal(a1[:, :, :r], a0) and torch.equal(b1[..., :r], b0) and torch.count_nonzero(b1[..., r:]) == 0
    torch.testing.assert_close(b1 @ a1, b0 @ a0)

    head = copying.heads["mlp__down_proj"]
    with torch.no_grad():
        head.scale_key_copy.fill_(1.0)
    # In a two-token chunk only the first token has a successor, so every new B column must be the
    # second token's embedding, whatever the pointer does: the component writes token t+1, not t.
    first, second = chunk_ids(["Alice Paris"])[0][:2]
    a1, b1 = run_hypernet(model, copying, [[first, second]])["mlp.down_proj"]
    embedding = model.get_input_embeddings().weight[second]
    expected = (embedding / embedding.norm() * head.alpha**0.5).detach()
    torch.testing.assert_close(b1[0, :, :, r:], expected[None, :, None].expand_as(b1[0, :, :, r:]))
    b1[..., r:].sum().backward()
    assert head.scale_key_copy.grad is not None and head.scale_key_copy.grad.abs().sum() > 0


def test_key_copy_needs_keys_residual_targets_and_tied_embeddings() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="key_copy needs keys"):
        tiny_hypernet_config(model, key_copy=True, encoder=EncoderConfig(target_keys=False))
    from d2l_memory.engine import default_hypernet_config

    cfg = default_hypernet_config(model, ("mlp.down_proj", "mlp.gate_proj"), 2, width=32, n_heads=2, n_blocks=1,
                                  proj_hidden=64, key_copy=True)
    with pytest.raises(ValueError, match="residual stream; mlp.gate_proj"):
        HyperLoRA(cfg)
    untied = tiny_model(tie=False)
    net = HyperLoRA(tiny_hypernet_config(untied, key_copy=True))
    with pytest.raises(ValueError, match="tied input and output embeddings"):
        run_hypernet(untied, net, chunk_ids(["Alice lives in Paris."]))
