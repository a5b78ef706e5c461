"""An independent, functional re-statement of MDLM's DiT forward pass (METHOD.md section 2), straight from a state
dict with MDLM's key names. Tests compare `DSLForMaskedDiffusion` against it; it shares no code with the model."""

import math

import torch
import torch.nn.functional as F


def random_mdlm_state_dict(
    vocab_with_mask=41, hidden=32, blocks=2, cond=16, mlp=None, seed=0, scale=0.2
) -> dict[str, torch.Tensor]:
    """Random weights in the exact layout of `kuleshov-group/mdlm-owt` (every key, including the rotary buffer).

    The adaLN weights are random rather than zero so that every block changes the output."""
    mlp = mlp or 4 * hidden
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "backbone.vocab_embed.embedding": rnd(vocab_with_mask, hidden),
        "backbone.sigma_map.mlp.0.weight": rnd(cond, 256),
        "backbone.sigma_map.mlp.0.bias": rnd(cond),
        "backbone.sigma_map.mlp.2.weight": rnd(cond, cond),
        "backbone.sigma_map.mlp.2.bias": rnd(cond),
        "backbone.rotary_emb.inv_freq": torch.zeros(hidden // 4),  # stored by MDLM, recomputed by us
        "backbone.output_layer.norm_final.weight": 1 + rnd(hidden),
        "backbone.output_layer.linear.weight": rnd(vocab_with_mask, hidden),
        "backbone.output_layer.linear.bias": rnd(vocab_with_mask),
        "backbone.output_layer.adaLN_modulation.weight": rnd(2 * hidden, cond),
        "backbone.output_layer.adaLN_modulation.bias": rnd(2 * hidden),
    }
    for i in range(blocks):
        p = f"backbone.blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + rnd(hidden),
                p + "attn_qkv.weight": rnd(3 * hidden, hidden),
                p + "attn_out.weight": rnd(hidden, hidden),
                p + "norm2.weight": 1 + rnd(hidden),
                p + "mlp.0.weight": rnd(mlp, hidden),
                p + "mlp.0.bias": rnd(mlp),
                p + "mlp.2.weight": rnd(hidden, mlp),
                p + "mlp.2.bias": rnd(hidden),
                p + "adaLN_modulation.weight": rnd(6 * hidden, cond),
                p + "adaLN_modulation.bias": rnd(6 * hidden),
            }
        )
    return sd


def mdlm_logits(
    sd: dict[str, torch.Tensor], input_ids: torch.Tensor, n_heads: int, sigma=None, dtype=torch.float64
) -> torch.Tensor:
    """MDLM's raw logits (all V + 1 classes, before SUBS) for `input_ids`, without time conditioning by default.

    Computed in float64 by default (the tests' exact reference); benchmarks/bench_speed.py times it in the model's
    dtype, on the device of `input_ids`."""
    device = input_ids.device
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    batch, length = input_ids.shape
    x = sd["backbone.vocab_embed.embedding"][input_ids]
    hidden = x.shape[-1]
    head_dim = hidden // n_heads

    # Conditioning: sinusoid of sigma (cos first), MLP, then SiLU. The released model feeds sigma = 0.
    sigma = torch.zeros(batch, dtype=dtype, device=device) if sigma is None else sigma.to(device=device, dtype=dtype)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=dtype, device=device) / half)
    args = sigma[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = emb @ sd["backbone.sigma_map.mlp.0.weight"].T + sd["backbone.sigma_map.mlp.0.bias"]
    c = F.silu(c) @ sd["backbone.sigma_map.mlp.2.weight"].T + sd["backbone.sigma_map.mlp.2.bias"]
    c = F.silu(c)

    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=dtype, device=device), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(t):  # t: [batch, length, heads, head_dim]
        t1, t2 = t[..., : head_dim // 2], t[..., head_dim // 2 :]
        rotated = torch.cat([-t2, t1], dim=-1)
        return t * cos[None, :, None, :] + rotated * sin[None, :, None, :]

    def layer_norm(t, weight):
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, keepdim=True, unbiased=False)
        return (t - mean) / torch.sqrt(var + 1e-5) * weight

    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")})
    for i in range(n_blocks):
        p = f"backbone.blocks.{i}."
        mod = c @ sd[p + "adaLN_modulation.weight"].T + sd[p + "adaLN_modulation.bias"]
        shift1, scale1, gate1, shift2, scale2, gate2 = [m[:, None, :] for m in mod.chunk(6, dim=-1)]
        h = layer_norm(x, sd[p + "norm1.weight"]) * (1 + scale1) + shift1
        qkv = (h @ sd[p + "attn_qkv.weight"].T).reshape(batch, length, 3, n_heads, head_dim)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        out = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(batch, length, hidden)
        x = x + gate1 * (out @ sd[p + "attn_out.weight"].T)
        h = layer_norm(x, sd[p + "norm2.weight"]) * (1 + scale2) + shift2
        h = F.gelu(h @ sd[p + "mlp.0.weight"].T + sd[p + "mlp.0.bias"], approximate="tanh")
        x = x + gate2 * (h @ sd[p + "mlp.2.weight"].T + sd[p + "mlp.2.bias"])

    mod = c @ sd["backbone.output_layer.adaLN_modulation.weight"].T + sd["backbone.output_layer.adaLN_modulation.bias"]
    shift, scale = [m[:, None, :] for m in mod.chunk(2, dim=-1)]
    h = layer_norm(x, sd["backbone.output_layer.norm_final.weight"]) * (1 + scale) + shift
    return h @ sd["backbone.output_layer.linear.weight"].T + sd["backbone.output_layer.linear.bias"]


def subs_log_probs(mdlm_raw_logits: torch.Tensor, mask_index: int) -> torch.Tensor:
    """SUBS step 1: the [MASK] logit gets -inf before the log-softmax."""
    logits = mdlm_raw_logits.clone()
    logits[..., mask_index] = -math.inf
    return logits.log_softmax(-1)
