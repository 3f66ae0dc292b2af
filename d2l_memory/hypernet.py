"""The hypernetwork: chunk activations → LoRA factors A (r × d_in) and B (d_out × r) for every layer.

Shape of the computation (N chunks, L layers, T tokens, W aggregator width, r rank per target,
S = L · targets · r slots):

1. Input projection: the RMS-normalised residual stream of one feature layer (N, T, H) → SwiGLU →
   (N, T, W).
2. Perceiver aggregator: one query per (layer, target, rank slot), made from a layer and a slot
   embedding (so a bigger base model only adds embeddings). Each block lets all S slots attend to
   each other, then cross-attend to the chunk tokens, then applies an MLP.
3. Head, per target: every slot is one rank-1 component. It points at chunk tokens (a softmax over
   positions) and emits a row of A and a column of B, both L2-normalised and multiplied by learned
   per-(layer, slot) scalers times sqrt(alpha), alpha = 2·r^1.5. The B scaler starts at 0, so ΔW = 0
   at initialisation.
   - A mixes a learned projection with a *key*: the target module's own input at the pointed
     positions of that layer (centred over the chunk, scaled per feature). A key lives exactly in the
     space A acts on, so a slot fires when the student's state resembles the document's state there.
     With ``key_gate`` the key is added through a per-layer gate that starts at zero instead.
   - Optional per-layer correction (``head_layer_rank``): a low-rank, layer-specific term added to
     the shared A and B projections, zero at initialisation.
   - Copy path (targets writing into the residual stream of a model with tied embeddings): B mixes
     a learned projection with the input embeddings of the pointed tokens and of the tokens right
     after them. Since the output head shares those embeddings, a slot can store "in this state, say
     that token" for tokens never seen in training, which a plain linear head cannot.
   - Optional key copy (``key_copy``): each slot adds a second rank-1 component whose A is the
     pointed key and whose B is the embedding of the token after the pointed one, so "this state"
     comes from the document as well, not only "that token".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2l_memory.config import HypernetConfig, TargetSpec

HyperOutput = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Target name → (A (N, L, r', d_in), B (N, L, d_out, r')), r' = HypernetConfig.rank_per_chunk."""


class SwiGLU(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_in, hidden, bias=False)
        self.up = nn.Linear(d_in, hidden, bias=False)
        self.down = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, w = x.shape
        h = self.n_heads
        q = self.q(x).view(b, s, h, w // h).transpose(1, 2)  # (B, h, S, w/h)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, w // h).permute(2, 0, 3, 1, 4)  # (B, h, T, w/h) each
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]  # (B, 1, 1, T) True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, s, w))


class Block(nn.Module):
    """Slot self-attention, cross-attention to the chunk, MLP; pre-norm residual."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, n_heads)
        self.norm_q = nn.LayerNorm(width)
        self.norm_ctx = nn.LayerNorm(width)
        self.cross_attn = Attention(width, n_heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = SwiGLU(width, 4 * width, width)

    def forward(self, slots: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        s = self.norm_self(slots)
        slots = slots + self.self_attn(s, s)
        slots = slots + self.cross_attn(self.norm_q(slots), self.norm_ctx(ctx), ctx_mask)
        return slots + self.mlp(self.norm_mlp(slots))


class LoraHead(nn.Module):
    """Slots of one target → A rows and B columns, with a pointer over chunk tokens."""

    def __init__(self, cfg: HypernetConfig, target: TargetSpec, use_copy: bool) -> None:
        super().__init__()
        w, r, n_layers = cfg.width, cfg.rank, cfg.num_layers
        self.rank = r
        self.use_copy = use_copy
        self.alpha = 2.0 * r**1.5
        self.ptr_q = nn.Linear(w, w, bias=False)
        self.ptr_k = nn.Linear(w, w, bias=False)
        self.norm = nn.LayerNorm(2 * w)
        self.to_a = nn.Linear(2 * w, target.d_in)
        self.to_b = nn.Linear(2 * w, target.d_out)
        self.scale_a = nn.Parameter(torch.ones(n_layers, r))
        self.scale_b = nn.Parameter(torch.zeros(n_layers, r))  # ΔW = 0 at initialisation
        self.key_scale = nn.Parameter(torch.ones(n_layers, target.d_in))
        self.key_mix = nn.Parameter(torch.full((n_layers, 1), 2.0))  # logit: keys first, learned A second
        self.gated_keys = cfg.key_gate
        self.key_gate_scale = cfg.key_gate_scale
        if self.gated_keys:  # keys added through a gate that starts shut (a grown key path changes nothing)
            self.key_gate = nn.Parameter(torch.zeros(n_layers, 1))
        self.layer_rank = cfg.head_layer_rank
        if self.layer_rank:
            k = self.layer_rank
            self.layer_down = nn.Parameter(torch.randn(n_layers, 2 * w, k) / math.sqrt(2 * w))
            self.layer_up_a = nn.Parameter(torch.zeros(n_layers, k, target.d_in))  # zero: grows from a trained head
            self.layer_up_b = nn.Parameter(torch.zeros(n_layers, k, target.d_out))
        if use_copy:
            self.copy_gate = nn.Linear(2 * w, 2)  # mix of (pointed token, next token) embeddings
            self.copy_mix = nn.Parameter(torch.zeros(n_layers, 1))  # logit of copy vs learned B
        self.key_copy = cfg.key_copy
        if self.key_copy:
            if not use_copy:
                raise ValueError(f"key_copy needs every target to write into the residual stream; {target.name} "
                                 f"writes {target.d_out} features, not {cfg.base_hidden_size}")
            self.scale_key_copy = nn.Parameter(torch.zeros(n_layers, r))  # zero: grows from a trained head

    def forward(
        self,
        slots: torch.Tensor,  # (N, L, r, W)
        ctx: torch.Tensor,  # (N, T, W)
        mask: torch.Tensor,  # (N, T) bool
        keys: torch.Tensor | None,  # (N, L, T, d_in) target inputs over the chunk, or None
        token_embeds: torch.Tensor | None,  # (N, T, 2, H) embeddings of token t and t+1, or None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, n_layers, r, w = slots.shape
        t = ctx.shape[1]
        flat = slots.reshape(n, n_layers * r, w)
        logits = self.ptr_q(flat) @ self.ptr_k(ctx).transpose(1, 2) / math.sqrt(w)  # (N, L·r, T)
        pointer = logits.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        z = self.norm(torch.cat([flat, pointer @ ctx], -1)).view(n, n_layers, r, 2 * w)
        a_raw, b_raw = self.to_a(z), self.to_b(z)
        if self.layer_rank:
            per_layer = torch.einsum("nlrw,lwk->nlrk", z, self.layer_down)
            a_raw = a_raw + torch.einsum("nlrk,lkd->nlrd", per_layer, self.layer_up_a)
            b_raw = b_raw + torch.einsum("nlrk,lkd->nlrd", per_layer, self.layer_up_b)
        a = F.normalize(a_raw, dim=-1)
        if keys is not None:
            # The pointed key, centred over the chunk. The pointer sums to 1 over real tokens, so
            # pointer @ (keys - mean) = pointer @ keys - mean: two batched matmuls, and no centred
            # copy of the (N, L, T, d_in) keys, the largest tensor of the whole pass.
            valid = mask.to(keys.dtype)[:, None, None, :]  # (N, 1, 1, T)
            mean = (valid @ keys) / valid.sum(-1, keepdim=True)  # (N, L, 1, d_in)
            key = pointer.view(n, n_layers, r, t) @ keys - mean  # (N, L, r, d_in)
            key = F.normalize(key * self.key_scale[None, :, None, :], dim=-1)
            if self.gated_keys:
                a = F.normalize(a + (self.key_gate_scale * self.key_gate)[None, :, :, None] * key, dim=-1)
            elif not self.key_copy:  # with key_copy, keys reach the shared A only through the gate
                mix = torch.sigmoid(self.key_mix)[None, :, :, None]  # (1, L, 1, 1)
                a = F.normalize(mix * key + (1 - mix) * a, dim=-1)
        elif self.key_copy:
            raise ValueError("this hypernetwork's key_copy needs the encoder's target keys")
        b = F.normalize(b_raw, dim=-1)
        picked = None
        if self.use_copy and token_embeds is not None:
            h = token_embeds.shape[-1]
            gate = self.copy_gate(z).softmax(-1)  # (N, L, r, 2)
            # The chunk's tokens are the same for every layer: one matmul per chunk, not per layer.
            picked = (pointer @ token_embeds.reshape(n, t, 2 * h)).view(n, n_layers, r, 2, h)
            copied = F.normalize((gate.unsqueeze(-1) * picked).sum(3), dim=-1)
            mix = torch.sigmoid(self.copy_mix)[None, :, :, None]
            b = F.normalize((1 - mix) * b + mix * copied, dim=-1)
        root_alpha = math.sqrt(self.alpha)
        a = a * (self.scale_a * root_alpha)[None, :, :, None]
        b = b * (self.scale_b * root_alpha)[None, :, :, None]
        if self.key_copy:
            if picked is None:
                raise ValueError("key_copy needs a base model with tied input and output embeddings")
            # Second component per slot: the document's state at the pointed token → the token after it.
            next_token = F.normalize(picked[:, :, :, 1], dim=-1)  # (N, L, r, H)
            a = torch.cat([a, key * root_alpha], 2)
            b = torch.cat([b, next_token * (self.scale_key_copy * root_alpha)[None, :, :, None]], 2)
        return a, b.transpose(2, 3)  # (N, L, r', d_in), (N, L, d_out, r'), r' = cfg.rank_per_chunk


class HyperLoRA(nn.Module):
    """Chunk activations → per-layer LoRA factors for every target module."""

    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.proj = SwiGLU(cfg.base_hidden_size, cfg.proj_hidden, w)
        self.layer_emb = nn.Parameter(torch.randn(cfg.num_layers, w) * 0.02)
        self.slot_emb = nn.Parameter(torch.randn(len(cfg.targets) * cfg.rank, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.n_heads) for _ in range(cfg.n_blocks))
        self.norm_out = nn.LayerNorm(w)
        self.heads = nn.ModuleDict(
            {
                _key(t.name): LoraHead(cfg, t, use_copy=cfg.copy_path and t.d_out == cfg.base_hidden_size)
                for t in cfg.targets
            }
        )

    def forward(
        self,
        features: torch.Tensor,  # (N, T, H)
        input_ids: torch.Tensor,  # (N, T)
        mask: torch.Tensor,  # (N, T) bool
        keys: dict[str, torch.Tensor] | None = None,  # target → (N, L, T, d_in)
        embeddings: torch.Tensor | None = None,  # (V, H) tied input/output embeddings, for the copy path
    ) -> HyperOutput:
        cfg = self.cfg
        n = features.shape[0]
        n_layers, r = cfg.num_layers, cfg.rank
        # Residual-stream scale varies by model and depth; RMS-normalise before projecting.
        x = features * torch.rsqrt(features.pow(2).mean(-1, keepdim=True) + 1e-6)
        ctx = self.proj(x)  # (N, T, W)
        slots = (self.layer_emb[:, None, :] + self.slot_emb[None, :, :]).reshape(1, -1, cfg.width)
        slots = slots.expand(n, -1, -1)  # (N, S, W), S = L · targets · r
        for block in self.blocks:
            slots = block(slots, ctx, mask)
        slots = self.norm_out(slots).view(n, n_layers, len(cfg.targets), r, cfg.width)
        token_embeds = None
        if embeddings is not None and any(h.use_copy for h in self.heads.values()):
            nxt = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], 1)
            nxt_valid = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
            token_embeds = torch.stack([embeddings[input_ids], embeddings[nxt] * nxt_valid[..., None]], 2)
        out: HyperOutput = {}
        for i, target in enumerate(cfg.targets):
            target_keys = None if keys is None else keys.get(target.name)
            out[target.name] = self.heads[_key(target.name)](slots[:, :, i], ctx, mask, target_keys, token_embeds)
        return out


def _key(name: str) -> str:
    # ModuleDict keys cannot contain dots.
    return name.replace(".", "__")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
