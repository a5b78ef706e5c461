"""DSL denoiser: MDLM's diffusion transformer driven by noisy token states (Discrete Stochastic Localization).

One network, no timestep input, serves every per-token SNR path. Each token v has a unit-norm direction e_v in R^d;
a noisy state is z_i = s_i e_{x_i} + sqrt(s_i) eps_i. Because ||e_v|| = 1, the posterior p(x | z) does not depend
on the SNRs s_i, so the same f_theta(z) is Bayes-optimal whether z came from masking (s = 0), soft evidence
(finite s) or a clean token (large s).

The backbone keeps MDLM's parameter names (`backbone.*`), so the public MDLM checkpoint maps onto it by name. Its
input lookup becomes a converter: p~_i = softmax(beta <z_i, E> ++ [0] + b) over the V tokens and a `[MASK]` slot,
and h_i = p~_i W, where W is MDLM's input table. Token ids are the SNR endpoints of that converter (`[MASK]` is
s = 0, a token s = s_hi); `config.endpoint_inputs` records whether the weights were trained on the converter's output
at those endpoints (DSL) or on the table rows W[x], W[V] (MDLM), and `forward(input_ids=...)` shows them the same.
This file knows nothing of training objectives or samplers: `generate` comes from
`generation_dsl.DSLGenerationMixin`, which routes to the samplers of `samplers.py` (see that file for why they sit here).
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import ForMaskedLMLoss
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, load_state_dict
from transformers.utils import ModelOutput, cached_file, logging

from .configuration_dsl import DSLConfig
from .generation_dsl import DSLGenerationConfig, DSLGenerationMixin

SINUSOID_DIM = 256  # MDLM's frequency-embedding width for the conditioning scalar
MDLM_PREFIX = "backbone."
# Keyword arguments that transformers' own machinery (Trainer, PEFT, pipelines, generation utilities) may pass to
# any model's forward; the denoiser has no attention weights to return and no KV cache, so they carry nothing.
FRAMEWORK_FORWARD_KWARGS = ("output_attentions", "use_cache", "past_key_values", "num_items_in_batch")

logger = logging.get_logger(__name__)


def _looks_like_local_path(name: str) -> bool:
    """A Hub repo id is `name` or `owner/name`; anything absolute, relative (`./`, `../`, `~`) or deeper is a path."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def check_checkpoint_files(checkpoint) -> None:
    """Fail with the offending path before loading: a missing local folder or file (instead of the Hub client's
    "Repo id must be in the form ..."), a `config.json` that is not JSON, or a truncated safetensors file."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        return
    path = os.path.expanduser(os.fspath(checkpoint))
    if not os.path.exists(path):
        if _looks_like_local_path(os.fspath(checkpoint)):
            raise FileNotFoundError(
                f"{os.fspath(checkpoint)!r} does not exist (looked for a local folder or file from {os.getcwd()!r}); "
                "pass an existing model folder, a weights file, or a Hub repo id of the form 'owner/name'."
            )
        return  # a Hub repo id: the Hub client reports its own errors
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{config_path} is not valid JSON ({err}); restore the file (e.g. save the model again)."
            ) from err
    weights = [path] if os.path.isfile(path) else [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
    for weights_path in weights:
        if weights_path.endswith(".safetensors") and os.path.isfile(weights_path):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(weights_path, framework="pt"):
                    pass
            except SafetensorError as err:
                raise OSError(
                    f"{weights_path} is not a readable safetensors file ({err}): it is probably truncated by an "
                    "interrupted download or copy; save or download it again."
                ) from err


@dataclass
class DSLMaskedDiffusionOutput(ModelOutput):
    """Output of [`DSLForMaskedDiffusion`].

    Args:
        loss: with `labels`, the cross-entropy of the clean tokens: at the `[MASK]` positions of `input_ids` (the
            endpoint loss, as MDLM's and ROAR's), or at every labelled position of `noisy_states`.
        logits: float32 `[batch, length, vocab_size]` scores of the clean token at every position (no mask class).
        hidden_states: with `output_hidden_states=True`, the input of every block and the final block output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class WeightOnlyLayerNorm(nn.Module):
    """MDLM's LayerNorm: a learned scale but no bias, always computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
            return (normed * self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class InputTable(nn.Module):
    """MDLM's input embedding (a raw `[V + 1, hidden]` parameter, key `vocab_embed.embedding`).

    For DSL it is the converter's value matrix W: row v is token v, row V is the `[MASK]` slot.
    """

    def __init__(self, num_slots: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(num_slots, hidden_size))

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.embedding[input_ids]


class ConditioningEmbedder(nn.Module):
    """MDLM's `sigma_map`: sinusoid of a scalar (cos first) -> Linear -> SiLU -> Linear."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(SINUSOID_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    @staticmethod
    def sinusoid(values: torch.Tensor) -> torch.Tensor:
        half = SINUSOID_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
        args = values.float()[..., None] * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        sinusoid = self.sinusoid(values).to(self.mlp[0].weight.dtype)
        return self.mlp(sinusoid)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, GPT-NeoX "rotate half" convention, as in MDLM."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Not persistent: it is a pure function of the config, and MDLM checkpoints carry their own copy.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cached = None  # (key, cos, sin) of the last call: the key changes when inv_freq is moved or rewritten

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # A sampler calls the network with the same length at every step: compute the table once per length and
        # device. A compiled graph computes it inside and never reads the cache (a guard on it would recompile).
        if torch.compiler.is_compiling():
            return self._table(length, device)
        key = (length, torch.device(device), self.inv_freq.data_ptr(), self.inv_freq.dtype, self.inv_freq._version)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, *self._table(length, device))
        return self._cached[1], self._cached[2]

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device=device, dtype=torch.float32))
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, length, head_dim]; cos/sin: [length, head_dim]. Rotation in fp32, like MDLM."""
    rotated = x.float() * cos + rotate_half(x.float()) * sin
    return rotated.to(x.dtype)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention in the signature of transformers' attention registry; `attention_mask` is additive (0 or the
    dtype's minimum, from `create_bidirectional_mask`). Returns `[batch, length, heads, head_dim]` and the weights."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DiTBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block with adaLN-zero modulation and full bidirectional attention."""

    def __init__(self, config: DSLConfig):
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.num_heads = config.num_attention_heads
        self.norm1 = WeightOnlyLayerNorm(hidden, config.layer_norm_eps)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = WeightOnlyLayerNorm(hidden, config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, config.intermediate_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.intermediate_size, hidden),
        )
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.is_causal = False  # full bidirectional attention, whatever the backend

    def attention(self, x, rotary, attention_mask):
        batch, length, hidden = x.shape
        # Rows 0:H of attn_qkv are q, H:2H k, 2H:3H v; heads are contiguous inside each.
        qkv = self.attn_qkv(x).view(batch, length, 3, self.num_heads, hidden // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = rotary
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        # transformers' registry: "sdpa", "eager", "flex_attention", "flash_attention_2/3" where installed, or a
        # kernel registered by the user. MDLM has no attention dropout.
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=1.0 / math.sqrt(hidden // self.num_heads),
            is_causal=False,
        )  # fmt: skip
        return self.attn_out(out.reshape(batch, length, hidden))

    def forward(self, x, conditioning, rotary, attention_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(conditioning).chunk(
            6, dim=-1
        )
        x = x + gate_msa * self.dropout(self.attention(modulate(self.norm1(x), shift_msa, scale_msa), rotary, attention_mask))
        x = x + gate_mlp * self.dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and the output projection over the real vocabulary (no `[MASK]` class)."""

    def __init__(self, config: DSLConfig):
        super().__init__()
        self.norm_final = WeightOnlyLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.linear = nn.Linear(config.hidden_size, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_size)

    def forward(self, x, conditioning):
        shift, scale = self.adaLN_modulation(conditioning).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTBackbone(nn.Module):
    """MDLM's DiT with its exact parameter names."""

    def __init__(self, config: DSLConfig):
        super().__init__()
        self.vocab_embed = InputTable(config.num_input_slots, config.hidden_size)
        self.sigma_map = ConditioningEmbedder(config.cond_dim)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_hidden_layers)])
        self.output_layer = FinalLayer(config)


class UnitNormDirections(nn.Module):
    """The token directions E: a free `[V, d]` parameter whose rows are used normalized (only directions learn)."""

    def __init__(self, vocab_size: int, embed_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, embed_dim))

    def forward(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=-1)


# Scores per chunk of the converter's softmax. On a CPU, 512K (2 MB in float32) keeps each chunk's elementwise work
# in cache (measured at V = 50,257: 8,192-slot chunks are 10-20% slower than 512-2,048-slot ones); on a GPU, where
# every chunk costs kernel launches, 16M, which also sizes the sparse converter's top-k search everywhere (each chunk
# costs a top-k merge there). Either way far below one [N, V] tensor of training memory.
CACHE_CHUNK_SCORES = 2**19
WIDE_CHUNK_SCORES = 2**24
MIN_CONVERTER_CHUNK = 256


class ChunkedConverter(torch.autograd.Function):
    """h = softmax(beta [<z, e_1>, .., <z, e_V>, 0] + b) W, one vocabulary chunk at a time (an online softmax).

    The `[N, V + 1]` slot probabilities are never built whole. The forward keeps, per state, a running max, the
    normalizer and the weighted sum of table rows, rescaling them as each chunk raises the max; the backward
    recomputes each chunk's probabilities from the saved log-normalizer. Memory is O(N * chunk) instead of the
    `[N, V]` tensors autograd would hold from the forward to the backward, and each chunk's elementwise work runs
    on data still in cache. The `[MASK]` slot (key 0, bias b_V, value W_V) seeds the running softmax.

    Inputs: states z `[N, d]`, unit directions `[V, d]`, beta `[1]`, bias `[V + 1]` (float32, or float64 for checks),
    table W `[V + 1, H]`; the products with W run in `value_dtype`, the scores and the normalizer in the states'
    dtype. Returns h `[N, H]` in the states' dtype.
    """

    @staticmethod
    def forward(ctx, states, directions, beta, bias, table, chunk_size: int, value_dtype: torch.dtype):
        vocab_size = directions.shape[0]
        scaled = states * beta
        running_max = bias[vocab_size].expand(states.shape[0], 1).clone()
        normalizer = torch.ones_like(running_max)  # the [MASK] slot's exp(b_V - running max)
        weighted = table[vocab_size].to(states.dtype).expand(states.shape[0], -1).clone()
        for start in range(0, vocab_size, chunk_size):
            end = min(start + chunk_size, vocab_size)
            scores = torch.addmm(bias[start:end], scaled, directions[start:end].T)
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            decay = (running_max - new_max).exp_()
            weights = scores.sub_(new_max).exp_()
            normalizer.mul_(decay).add_(weights.sum(dim=-1, keepdim=True))
            weighted.mul_(decay).add_(weights.to(value_dtype) @ table[start:end].to(value_dtype))
            running_max = new_max
        hidden = weighted / normalizer
        ctx.save_for_backward(states, directions, beta, bias, table, hidden, running_max + normalizer.log())
        ctx.chunk_size, ctx.value_dtype = chunk_size, value_dtype
        return hidden

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hidden):
        states, directions, beta, bias, table, hidden, log_normalizer = ctx.saved_tensors
        chunk_size, value_dtype = ctx.chunk_size, ctx.value_dtype
        vocab_size = directions.shape[0]
        grad = grad_hidden.to(hidden.dtype)
        grad_values = grad.to(value_dtype)
        # h = sum_v p_v W_v, so d loss / d score_v = p_v (<grad, W_v> - <grad, h>).
        grad_dot_hidden = (grad * hidden).sum(dim=-1, keepdim=True)
        scaled = states * beta
        grad_scaled = torch.zeros_like(scaled)
        grad_directions = torch.empty_like(directions)
        grad_bias = torch.empty_like(bias)
        grad_table = torch.empty_like(table)

        mask_probs = (bias[vocab_size] - log_normalizer).exp()
        grad_table[vocab_size] = (mask_probs * grad).sum(dim=0)
        mask_grad_scores = mask_probs * (grad @ table[vocab_size].to(grad.dtype)[:, None] - grad_dot_hidden)
        grad_bias[vocab_size] = mask_grad_scores.sum()
        for start in range(0, vocab_size, chunk_size):
            end = min(start + chunk_size, vocab_size)
            probs = torch.addmm(bias[start:end], scaled, directions[start:end].T).sub_(log_normalizer).exp_()
            grad_table[start:end] = probs.to(value_dtype).T @ grad_values
            values = table[start:end].to(value_dtype)
            grad_scores = (grad_values @ values.T).to(probs.dtype).sub_(grad_dot_hidden).mul_(probs)
            grad_bias[start:end] = grad_scores.sum(dim=0)
            grad_scaled.addmm_(grad_scores, directions[start:end])
            torch.mm(grad_scores.T, scaled, out=grad_directions[start:end])
        grad_beta = (grad_scaled * states).sum().reshape(beta.shape)
        return grad_scaled * beta, grad_directions, grad_beta, grad_bias, grad_table, None, None


def top_k_converter(states, directions, beta, bias, table, top_k: int, chunk_size: int) -> torch.Tensor:
    """The opt-in sparse converter: softmax over each state's `top_k` highest-scoring token slots and the `[MASK]`
    slot, times their rows of W. The slots are chosen without autograd, chunk by chunk (memory O(N * chunk)); their
    scores are then recomputed with autograd, and `embedding_bag` sums the weighted rows without a `[N, k, H]`
    tensor. Returns `[N, H]` in float32."""
    vocab_size = directions.shape[0]
    with torch.no_grad():
        scaled = states * beta
        best_scores = best_slots = None
        for start in range(0, vocab_size, chunk_size):
            end = min(start + chunk_size, vocab_size)
            scores = torch.addmm(bias[start:end], scaled, directions[start:end].T)
            chunk_best = scores.topk(min(top_k, end - start), dim=-1)
            if best_scores is None:
                best_scores, best_slots = chunk_best.values, chunk_best.indices + start
            else:
                candidates = torch.cat([best_scores, chunk_best.values], dim=-1)
                merged = candidates.topk(min(top_k, candidates.shape[-1]), dim=-1)
                best_slots = torch.cat([best_slots, chunk_best.indices + start], dim=-1).gather(-1, merged.indices)
                best_scores = merged.values
    kept_scores = beta * torch.bmm(directions[best_slots], states[:, :, None]).squeeze(-1) + bias[best_slots]
    mask_scores = bias[vocab_size].expand(states.shape[0], 1)
    probs = torch.cat([kept_scores, mask_scores], dim=-1).softmax(dim=-1).to(table.dtype)
    hidden = F.embedding_bag(best_slots, table, per_sample_weights=probs[:, :-1], mode="sum")
    return (hidden + probs[:, -1:] * table[vocab_size]).float()


class DSLPreTrainedModel(PreTrainedModel):
    config_class = DSLConfig
    base_model_prefix = "backbone"  # MDLM's DiT, the attribute that holds the transformer
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module):
        config = self.config
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, (DiTBlock, FinalLayer)):
            # adaLN-zero: every block starts as the identity and the final modulation as a plain LayerNorm.
            init.zeros_(module.adaLN_modulation.weight)
            init.zeros_(module.adaLN_modulation.bias)
        elif isinstance(module, WeightOnlyLayerNorm):
            init.ones_(module.weight)
        elif isinstance(module, InputTable):
            init.normal_(module.embedding, mean=0.0, std=config.initializer_range)
        elif isinstance(module, UnitNormDirections):
            init.normal_(module.weight, mean=0.0, std=config.direction_init_std)
        elif isinstance(module, RotaryEmbedding):
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
            init.copy_(module.inv_freq, inv_freq)
        elif isinstance(module, DSLForMaskedDiffusion):
            init.constant_(module.converter_beta, config.converter_beta_init)
            bias = torch.zeros_like(module.converter_bias)
            bias[config.mask_token_id] = config.converter_mask_bias
            init.copy_(module.converter_bias, bias)


class DSLForMaskedDiffusion(DSLPreTrainedModel, DSLGenerationMixin):
    """The DSL denoiser f_theta: clean-token logits given token ids (SNR endpoints) or noisy states z.

    - `forward(input_ids=...)`: the discrete endpoint path. A token id is a clean token (SNR s_hi), the `[MASK]` id
      is SNR 0. `config.endpoint_inputs` says what the backbone sees (see `embed_endpoints`): the table rows
      ("table": on weights converted from MDLM it reproduces MDLM's logits with the mask class removed) or the
      converter at the endpoints ("converter": what DSL training shows the network).
    - `forward(noisy_states=z)`: the continuous DSL path through the softmax-bias converter.
    - `generate(...)`: text with any sampler (see [`DSLGenerationMixin.generate`]); defaults in `generation_config`.
    """

    generation_config_class = DSLGenerationConfig

    def __init__(self, config: DSLConfig):
        super().__init__(config)
        self.backbone = DiTBackbone(config)
        self.token_directions = UnitNormDirections(config.vocab_size, config.embed_dim)
        # Shape [1], not a 0-dim scalar: DeepSpeed flattens parameters through byte views, which 0-dim tensors lack.
        self.converter_beta = nn.Parameter(torch.empty(1))
        self.converter_bias = nn.Parameter(torch.empty(config.num_input_slots))
        self._endpoint_rows = None  # the converter's inputs per endpoint SNR, inside `endpoint_cache()` only
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with clear errors for a missing local path, a non-JSON config or a
        truncated weights file, and an error (not a warning table) for weights the config has no place for, such as
        a checkpoint with more blocks than its `num_hidden_layers`."""
        check_checkpoint_files(pretrained_model_name_or_path)
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        unexpected = sorted(loading_info.get("unexpected_keys") or [])
        if unexpected:
            raise ValueError(
                f"{os.fspath(pretrained_model_name_or_path)!r} holds {len(unexpected)} weights that its config has no "
                f"place for, e.g. {unexpected[:4]}: the config (num_hidden_layers={model.config.num_hidden_layers}, "
                f"hidden_size={model.config.hidden_size}, ...) does not describe these weights. Fix config.json to "
                "match the weights (or pass the right sizes as keyword arguments)."
            )
        return (model, loading_info) if wants_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` records one Auto class; the same class also serves AutoModelForMaskedLM.
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModelForMaskedLM": f"{module}.{type(self).__name__}"}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_mdlm(
        cls,
        checkpoint,
        num_attention_heads: int | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        **config_overrides,
    ) -> "DSLForMaskedDiffusion":
        """Start a DSL model from an MDLM checkpoint (e.g. `kuleshov-group/mdlm-owt`).

        Every backbone weight is copied by name; MDLM's input table becomes the converter's value matrix W (its
        mask row is the `[MASK]` slot), and the mask row of MDLM's output layer is dropped (DSL predicts V
        classes). Sizes, `cond_dim` included, are read from the weights, never from config defaults. The new
        parameters (token directions E, beta, converter bias) keep their initialization.

        Args:
            checkpoint: a Hub repo id or a local folder in the Hub layout (`config.json` + `model.safetensors`), a
                `.safetensors` / `.bin` file, or an in-memory state dict with MDLM's keys (`backbone.*`).
            num_attention_heads: only needed when no `config.json` says it (weights do not encode the head count);
                defaults to hidden_size // 64, MDLM's head dimension.
            revision: Hub revision.
            dtype: dtype of the returned model (default float32).
            config_overrides: DSL settings for the new parts, e.g. `embed_dim=64`, `snr_max=100.0`, `dropout=0.1`.
        """
        check_checkpoint_files(checkpoint)
        mdlm_config, state_dict = _read_mdlm_checkpoint(checkpoint, revision)
        if mdlm_config.get("model_type") == DSLConfig.model_type:
            raise ValueError(
                f"{checkpoint!r} is already a DSL model (config.json has model_type 'dsl'), not an MDLM checkpoint: "
                "load it with DSLForMaskedDiffusion.from_pretrained (dsl-finetune: --model_name_or_path)."
            )
        state_dict = {key: value for key, value in state_dict.items() if key.startswith(MDLM_PREFIX)}
        if f"{MDLM_PREFIX}vocab_embed.embedding" not in state_dict:
            raise ValueError(
                f"not an MDLM checkpoint: no '{MDLM_PREFIX}vocab_embed.embedding' among its "
                f"{len(state_dict)} '{MDLM_PREFIX}*' keys."
            )
        input_rows, hidden_size = state_dict[f"{MDLM_PREFIX}vocab_embed.embedding"].shape
        block_ids = {int(key.split(".")[2]) for key in state_dict if key.startswith(f"{MDLM_PREFIX}blocks.")}
        mlp_key = f"{MDLM_PREFIX}blocks.0.mlp.0.weight"
        sizes = {
            "vocab_size": input_rows - 1,
            "mask_token_id": input_rows - 1,
            "hidden_size": hidden_size,
            "num_hidden_layers": len(block_ids),
            "num_attention_heads": num_attention_heads or mdlm_config.get("n_heads") or _heads_from_width(hidden_size),
            "cond_dim": state_dict[f"{MDLM_PREFIX}sigma_map.mlp.0.weight"].shape[0]
            if f"{MDLM_PREFIX}sigma_map.mlp.0.weight" in state_dict
            else mdlm_config.get("cond_dim", 128),
            "intermediate_size": state_dict[mlp_key].shape[0] if mlp_key in state_dict else 4 * hidden_size,
            "max_position_embeddings": mdlm_config.get("model_length", 1024),
            "dropout": mdlm_config.get("dropout", 0.1),
            "time_conditioning": bool(mdlm_config.get("time_conditioning", False)),
            "endpoint_inputs": "table",  # MDLM was trained on its table rows: keep its exact logits
        }
        if input_rows == 50258:  # the GPT-2 vocabulary: <|endoftext|> is BOS, EOS and padding
            sizes.update(bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
        config = DSLConfig(**{**sizes, **config_overrides})
        model = cls(config)

        expected = {f"{MDLM_PREFIX}{name}": param for name, param in model.backbone.named_parameters()}
        mask_row = config.mask_token_id
        output_key = f"{MDLM_PREFIX}output_layer.linear"
        mapped, mis_shaped = {}, []
        for key, tensor in state_dict.items():
            if key.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            if key in (f"{output_key}.weight", f"{output_key}.bias") and tensor.shape[0] == input_rows:
                tensor = torch.cat([tensor[:mask_row], tensor[mask_row + 1 :]])  # DSL never predicts [MASK]
            if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
                mis_shaped.append(f"{key}: checkpoint {list(tensor.shape)} vs model {list(expected[key].shape)}")
            mapped[key] = tensor
        missing = sorted(set(expected) - set(mapped))
        unexpected = sorted(set(mapped) - set(expected))
        if missing or unexpected or mis_shaped:
            raise ValueError(
                "the MDLM checkpoint does not match the DiT layout:\n"
                f"  missing keys ({len(missing)}): {missing}\n"
                f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
                f"  mis-shaped keys ({len(mis_shaped)}): {mis_shaped}"
            )
        model.load_state_dict(mapped, strict=False)
        model.config.name_or_path = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else ""
        return model.to(dtype) if dtype is not None else model

    def get_input_embeddings(self) -> InputTable:
        return self.backbone.vocab_embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.backbone.output_layer.linear

    # --- the noisy-state channel -----------------------------------------------------------------------------

    def _broadcast_snr(self, snr, shape: torch.Size, device: torch.device) -> torch.Tensor:
        snr = torch.as_tensor(snr, dtype=torch.float32, device=device)
        if snr.dim() == 1:
            if snr.shape[0] != shape[0]:
                raise ValueError(f"a per-sequence snr must have shape [{shape[0]}], got {list(snr.shape)}.")
            snr = snr[:, None]
        elif snr.dim() == 2 and tuple(snr.shape) != tuple(shape):
            raise ValueError(f"a per-token snr must have shape {list(shape)}, got {list(snr.shape)}.")
        elif snr.dim() > 2:
            raise ValueError(f"snr must be a scalar, [batch] or [batch, length]; got shape {list(snr.shape)}.")
        if torch.any(snr < 0) or not torch.all(torch.isfinite(snr)):
            raise ValueError("snr must be finite and >= 0 (0 means [MASK]).")
        return snr.expand(shape)

    def noisy_states(self, input_ids: torch.LongTensor, snr, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample z_i = s_i e_{x_i} + sqrt(s_i) eps_i, eps ~ N(0, I_d). `[MASK]` positions get s = 0, i.e. z = 0.

        Args:
            input_ids: `[batch, length]` token ids (the `[MASK]` id allowed).
            snr: a float, a `[batch]` tensor (per sequence) or a `[batch, length]` tensor (per token), all >= 0.
            generator: optional `torch.Generator` for the Gaussian noise.
        """
        self._check_token_ids(input_ids)
        is_mask = input_ids == self.config.mask_token_id
        snr = self._broadcast_snr(snr, input_ids.shape, input_ids.device).masked_fill(is_mask, 0.0)
        directions = self.token_directions()
        e = directions[input_ids.masked_fill(is_mask, 0)].float()
        # Draw on the generator's device (a CPU generator may drive a GPU model), then move.
        noise_device = generator.device if generator is not None else e.device
        noise = torch.randn(e.shape, generator=generator, device=noise_device, dtype=e.dtype).to(e.device)
        return snr[..., None] * e + snr.sqrt()[..., None] * noise

    def _check_token_ids(self, input_ids) -> None:
        """Ids index the converter's table: a negative id would silently wrap around to the last rows."""
        if not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(
                f"input_ids must be an integer tensor of token ids, got "
                f"{type(input_ids).__name__ if not torch.is_tensor(input_ids) else input_ids.dtype}."
            )
        if torch.compiler.is_compiling():  # the value checks below read data; a compiled graph must not branch on it
            return
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() > self.config.mask_token_id):
            raise ValueError(
                f"input_ids must lie in [0, {self.config.mask_token_id}] ({self.config.vocab_size} tokens and "
                f"[MASK]={self.config.mask_token_id}); got range [{int(input_ids.min())}, {int(input_ids.max())}]."
            )

    def _check_forward_inputs(
        self, input_ids, noisy_states, attention_mask, timesteps, endpoint_snr, extra_kwargs: dict
    ) -> None:
        """Reject what `forward` would otherwise ignore or turn into NaN: a misspelled or irrelevant argument
        (`timesteps` for a model without time conditioning, `endpoint_snr` with noisy states, whose SNR is in z),
        non-float or non-finite noisy states, an attention mask that is not 0/1. Warn once for a length the model
        was not trained for."""
        unknown = sorted(set(extra_kwargs) - set(FRAMEWORK_FORWARD_KWARGS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.forward got unexpected arguments {unknown}; accepted: input_ids, noisy_states, "
                "attention_mask, timesteps, endpoint_snr, labels, logits_to_keep, output_hidden_states, return_dict "
                "(check the spelling)."
            )
        if extra_kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported: the attention kernels do not return weights.")
        if timesteps is not None and not self.config.time_conditioning:
            raise ValueError(
                "timesteps were given but this model has time_conditioning=False: the DSL denoiser has no time input "
                "(an SNR lives in the noisy states). Drop `timesteps`, or use a time-conditioned MDLM model."
            )
        if endpoint_snr is not None:
            self._endpoint_snr(endpoint_snr)  # its range, even where the "table" endpoints do not read it
        if endpoint_snr is not None and noisy_states is not None:
            raise ValueError(
                "endpoint_snr applies to input_ids (the SNR at which a decoded token is shown); noisy_states carry their "
                "own SNR in z. Drop endpoint_snr, or pass input_ids."
            )
        if noisy_states is not None:
            if not torch.is_tensor(noisy_states) or not noisy_states.is_floating_point():
                raise TypeError(
                    "noisy_states must be a float tensor z = s e_x + sqrt(s) eps (see `noisy_states()`), got "
                    f"{noisy_states.dtype if torch.is_tensor(noisy_states) else type(noisy_states).__name__}; "
                    "token ids go to `input_ids`."
                )
            if not torch.compiler.is_compiling() and not bool(torch.isfinite(noisy_states).all()):
                raise ValueError(
                    "noisy_states contain NaN or infinite values; every state must be finite (z = 0 is [MASK])."
                )
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask):
                raise TypeError(f"attention_mask must be a tensor of 0/1, got {type(attention_mask).__name__}.")
            if (
                attention_mask.dtype != torch.bool
                and not torch.compiler.is_compiling()
                and bool(((attention_mask != 0) & (attention_mask != 1)).any())
            ):
                raise ValueError(
                    f"attention_mask must hold only 0 (padding) and 1 (real token); got values "
                    f"{sorted(set(attention_mask.unique().tolist()))[:8]}. Use 1 for every position to attend to."
                )
        sequence = input_ids if input_ids is not None else noisy_states
        length = sequence.shape[1] if torch.is_tensor(sequence) and sequence.dim() >= 2 else None
        if length is not None and length > self.config.max_position_embeddings:
            logger.warning_once(
                f"sequence length {length} exceeds max_position_embeddings={self.config.max_position_embeddings}: the "
                "rotary positions beyond it were never trained, so quality will likely degrade."
            )

    def posterior_mean(self, logits: torch.Tensor) -> torch.Tensor:
        """x_hat_i = sum_v p_theta(v | z) e_v, the denoiser's estimate of the clean direction, `[batch, length, d]`."""
        return logits.float().softmax(dim=-1) @ self.token_directions().float()

    def convert_noisy_states(self, noisy_states: torch.Tensor) -> torch.Tensor:
        """The converter: h_i = softmax(beta [<z_i, e_1>, .., <z_i, e_V>, 0] + b) W, computed by [`ChunkedConverter`]
        one vocabulary chunk at a time (equal to the plain formula, gradients included; tested), or over each state's
        top `config.converter_top_k` slots and `[MASK]` when that opt-in approximation is set."""
        table = self.backbone.vocab_embed.embedding
        flat = noisy_states.reshape(-1, noisy_states.shape[-1]).float()
        device_type = flat.device.type
        # The products with W run in the table's dtype, or in autocast's when it is on (as the plain formula would).
        autocast_on = torch.is_autocast_enabled(device_type)
        value_dtype = torch.get_autocast_dtype(device_type) if autocast_on else table.dtype
        states = max(flat.shape[0], 1)
        chunk_scores = CACHE_CHUNK_SCORES if device_type == "cpu" else WIDE_CHUNK_SCORES
        chunk_size = self.config.converter_chunk_size or max(MIN_CONVERTER_CHUNK, chunk_scores // states)
        top_k = self.config.converter_top_k
        with torch.autocast(device_type, enabled=False):  # the scores and the softmax stay float32
            inputs = (flat, self.token_directions().float(), self.converter_beta.float(), self.converter_bias.float())
            if top_k is not None and top_k < self.config.vocab_size:
                search_chunk = max(chunk_size, WIDE_CHUNK_SCORES // states)
                hidden = top_k_converter(*inputs, table.to(value_dtype), top_k, search_chunk)
            else:
                hidden = ChunkedConverter.apply(*inputs, table, chunk_size, value_dtype)
        return hidden.to(table.dtype).reshape(*noisy_states.shape[:-1], table.shape[-1])

    def _endpoint_snr(self, endpoint_snr) -> float:
        if endpoint_snr is None:
            return float(self.config.snr_max)
        if isinstance(endpoint_snr, bool) or not isinstance(endpoint_snr, (int, float)) or not (
            math.isfinite(endpoint_snr) and endpoint_snr > 0
        ):
            raise ValueError(f"endpoint_snr={endpoint_snr!r} must be a finite number > 0 (or None = config.snr_max).")
        return float(endpoint_snr)

    def embed_endpoints(self, input_ids: torch.LongTensor, endpoint_snr: float | None = None) -> torch.Tensor:
        """The backbone input for discrete states, `[batch, length, hidden]`, as `config.endpoint_inputs` says.

        - "table": W[x] at a token, W[V] at `[MASK]` (MDLM's lookup).
        - "converter": the converter at the SNR endpoints, as DSL training shows them: `[MASK]` is z = 0, i.e.
          softmax(b) W (not the row W[V], which it equals only while the mask slot keeps all the weight), and a token
          x is z = s_hi e_x. Computed once per distinct id in the batch, not once per position.
        - "converter_at_mask": the converter at `[MASK]`, and W[x] (the s_hi -> infinity limit) at tokens.
        """
        if self.config.endpoint_inputs == "table":
            return self.backbone.vocab_embed(input_ids)
        return self._embed_endpoints_through_converter(input_ids, self._endpoint_snr(endpoint_snr))

    # Runs eagerly under torch.compile: its work is per distinct token (a data-dependent size) and it reads the
    # inference cache, so a compiled forward has this one deliberate boundary and the transformer after it.
    @torch.compiler.disable
    def _embed_endpoints_through_converter(self, input_ids: torch.LongTensor, snr: float) -> torch.Tensor:
        if self.config.endpoint_inputs == "converter_at_mask":
            mask_id = torch.full((1,), self.config.mask_token_id, device=input_ids.device)
            mask_input = self._converter_endpoint_rows(mask_id, snr)[0]
            is_mask = input_ids == self.config.mask_token_id
            return torch.where(is_mask[..., None], mask_input, self.backbone.vocab_embed(input_ids))
        ids, inverse = torch.unique(input_ids, return_inverse=True)
        return self._converter_endpoint_rows(ids, snr)[inverse]

    def _converter_endpoint_rows(self, ids: torch.LongTensor, snr: float) -> torch.Tensor:
        """The converter at z = snr e_x for each distinct id x (z = 0 for `[MASK]`), `[len(ids), hidden]`; inside
        `endpoint_cache()` (and without autograd) each (id, snr) is computed once."""
        cache = self._endpoint_rows if not torch.is_grad_enabled() else None
        if cache is None:
            return self._convert_endpoints(ids, snr)
        slots, rows = cache.get(snr, (None, None))
        if slots is None:  # slots[x] = row of id x in `rows`, -1 until computed
            slots = torch.full((self.config.num_input_slots,), -1, dtype=torch.long, device=ids.device)
            rows = self.backbone.vocab_embed.embedding.new_empty(0, self.config.hidden_size)
        new_ids = ids[slots[ids] < 0]
        if new_ids.numel():
            slots[new_ids] = torch.arange(rows.shape[0], rows.shape[0] + new_ids.shape[0], device=ids.device)
            rows = torch.cat([rows, self._convert_endpoints(new_ids, snr)])
            cache[snr] = (slots, rows)
        return rows[slots[ids]]

    def _convert_endpoints(self, ids: torch.LongTensor, snr: float) -> torch.Tensor:
        directions = self.token_directions()
        is_token = ids != self.config.mask_token_id
        scale = is_token.to(directions.dtype) * snr  # [MASK] -> z = 0
        return self.convert_noisy_states(directions[ids.masked_fill(~is_token, 0)] * scale[:, None])

    @contextlib.contextmanager
    def endpoint_cache(self):
        """Inference only: inside this context, `forward(input_ids=...)` on a converter-endpoint model computes the
        converter's input for each distinct (token, endpoint SNR) once and reuses it. A sampler holds the cache for
        a whole run, so each step pays only for the tokens it decoded new (the converter costs a V-wide softmax and
        a `[V, hidden]` product per distinct token). The weights must not change inside it; with autograd on it is
        bypassed. Dropped on exit."""
        outer, self._endpoint_rows = self._endpoint_rows, {}
        try:
            yield self
        finally:
            self._endpoint_rows = outer

    # --- the denoiser ------------------------------------------------------------------------------------------

    def _conditioning(self, noisy_states, input_ids, timesteps, endpoint_snr, dtype, device):
        """adaLN input c, shaped `[1 or batch, 1 or length, cond_dim]` to broadcast over tokens."""
        config = self.config
        if config.time_conditioning:
            if timesteps is None:
                raise ValueError("this model uses time conditioning: pass `timesteps` (MDLM's sigma, shape [batch]).")
            values = torch.as_tensor(timesteps, device=device).float().reshape(-1)[:, None]
        elif config.snr_conditioning == "norm":
            if noisy_states is not None:
                values = noisy_states.float().norm(dim=-1)
            else:  # the discrete endpoints: a clean token stands at s_hi, [MASK] at 0
                values = (input_ids != config.mask_token_id).float() * self._endpoint_snr(endpoint_snr)
        else:
            # The released MDLM has no time conditioning: sigma is replaced by 0, so c is one constant vector.
            values = torch.zeros(1, 1, device=device)
        return F.silu(self.backbone.sigma_map(values)).to(dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        noisy_states: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        endpoint_snr: float | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DSLMaskedDiffusionOutput | tuple:
        r"""
        Args:
            input_ids: `[batch, length]` ids in `0..V`, `[MASK]` = V: the discrete endpoint path.
            noisy_states: `[batch, length, embed_dim]` noisy states z: the continuous DSL path.
            attention_mask: `[batch, length]`, 1 for real tokens and 0 for padding (padding is never attended to).
            timesteps: MDLM's sigma, only for `time_conditioning=True` models.
            endpoint_snr: the SNR s_hi at which a decoded token of `input_ids` is shown through the converter
                (`endpoint_inputs="converter"`; default `config.snr_max`).
            labels: `[batch, length]` clean token ids in `0..V-1`, -100 to ignore a position. The loss is their mean
                cross-entropy at the `[MASK]` positions of `input_ids` (the endpoint loss; unmasked positions are
                given, so they carry no loss), or at every labelled position of `noisy_states`. The training
                objectives with their SNR draws live in `dsl_diffusion.trainer`.
            logits_to_keep: where the output head runs (it is about a quarter of MDLM-small's FLOPs, and a sampler
                needs logits only where a token may be drawn). As in transformers: `0` keeps every position, an int
                `k > 0` the last `k`, a 1-D tensor of positions those positions of every row (logits
                `[batch, kept, V]`). Also a `[batch, length]` bool tensor: logits only where it is True, packed
                row-major as `[N, V]` (the order of `logits[mask]` in the full output). Not combinable with `labels`.
        """
        if (input_ids is None) == (noisy_states is None):
            raise ValueError("pass exactly one of `input_ids` (discrete endpoints) or `noisy_states` (continuous z).")
        self._check_forward_inputs(input_ids, noisy_states, attention_mask, timesteps, endpoint_snr, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if input_ids is not None:
            self._check_token_ids(input_ids)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}.")
            hidden = self.embed_endpoints(input_ids, endpoint_snr)
            batch_size, length = input_ids.shape
        else:
            if noisy_states.dim() != 3 or noisy_states.shape[-1] != self.config.embed_dim:
                raise ValueError(
                    f"noisy_states must be [batch, length, {self.config.embed_dim}], got {list(noisy_states.shape)}."
                )
            hidden = self.convert_noisy_states(noisy_states)
            batch_size, length = noisy_states.shape[:2]

        if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, length):
            raise ValueError(f"attention_mask must be [{batch_size}, {length}], got {list(attention_mask.shape)}.")
        # The padding mask in the form the attention backend wants (None when nothing is padded).
        key_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

        conditioning = self._conditioning(noisy_states, input_ids, timesteps, endpoint_snr, hidden.dtype, hidden.device)
        rotary = self.backbone.rotary_emb(length, hidden.device)
        all_hidden_states = () if output_hidden_states else None
        for block in self.backbone.blocks:
            if output_hidden_states:
                all_hidden_states += (hidden,)
            hidden = block(hidden, conditioning, rotary, key_mask)
        if output_hidden_states:
            all_hidden_states += (hidden,)
        hidden, conditioning = self._kept_positions(hidden, conditioning, logits_to_keep, labels)
        logits = self.backbone.output_layer(hidden, conditioning).float()

        loss = None
        if labels is not None:
            loss = self._endpoint_loss(logits, labels, input_ids, kwargs.get("num_items_in_batch"))
        if not return_dict:
            output = (logits, all_hidden_states) if output_hidden_states else (logits,)
            return (loss, *output) if loss is not None else output
        return DSLMaskedDiffusionOutput(loss=loss, logits=logits, hidden_states=all_hidden_states)

    @staticmethod
    def _kept_positions(hidden, conditioning, logits_to_keep, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states and their adaLN conditioning at the positions `logits_to_keep` selects."""
        if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep == 0:
            return hidden, conditioning
        if labels is not None:
            raise ValueError("logits_to_keep selects a subset of the logits, labels need all of them: pass only one.")
        batch_size, length = hidden.shape[:2]
        per_position = conditioning.shape[1] > 1  # SNR-norm conditioning differs per token; else one vector per row
        if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
            if not 0 < logits_to_keep <= length:
                raise ValueError(f"logits_to_keep={logits_to_keep} must lie in [0, {length}] (0 keeps every position).")
            keep = slice(length - logits_to_keep, None)
            return hidden[:, keep], conditioning[:, keep] if per_position else conditioning
        if not torch.is_tensor(logits_to_keep):
            raise TypeError(
                "logits_to_keep must be an int, a 1-D tensor of positions or a [batch, length] bool tensor, got "
                f"{type(logits_to_keep).__name__}."
            )
        keep = logits_to_keep.to(hidden.device)
        if keep.dtype == torch.bool and tuple(keep.shape) == (batch_size, length):
            conditioning = conditioning.expand(batch_size, length, conditioning.shape[-1])
            return hidden[keep], conditioning[keep]
        if keep.dim() == 1 and not keep.is_floating_point() and keep.dtype != torch.bool:
            if keep.numel() and not (0 <= int(keep.min()) and int(keep.max()) < length):
                raise ValueError(f"logits_to_keep positions must lie in [0, {length - 1}], got {keep.tolist()}.")
            return hidden[:, keep], conditioning[:, keep] if per_position else conditioning
        raise ValueError(
            f"logits_to_keep must be a 1-D integer tensor of positions or a [{batch_size}, {length}] bool tensor, got "
            f"dtype {keep.dtype} and shape {list(keep.shape)}."
        )

    def _endpoint_loss(self, logits, labels, input_ids, num_items_in_batch=None) -> torch.Tensor:
        vocab_size = self.config.vocab_size
        if not torch.is_tensor(labels) or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"labels must be a LongTensor of shape {list(logits.shape[:2])}, got {labels!r:.80}.")
        labels = labels.to(logits.device).long()
        bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be clean token ids in [0, {vocab_size - 1}] or -100 (ignored); got {int(labels[bad][0])} "
                f"([MASK]={self.config.mask_token_id} is an input, never a label)."
            )
        if input_ids is not None:  # given tokens are known: only the [MASK] positions are predicted
            labels = labels.masked_fill(input_ids != self.config.mask_token_id, -100)
        # ForMaskedLMLoss: mean CE over the positions whose label is not -100 (float32 upcast, transformers' helper).
        return ForMaskedLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch)


def _heads_from_width(hidden_size: int) -> int:
    """MDLM's head dimension is 64; the weights do not record the head count, so a narrower model needs it given."""
    if hidden_size < 64:
        raise ValueError(
            f"the checkpoint has no config.json naming n_heads, and its width hidden_size={hidden_size} is below MDLM's "
            "head dimension 64, so the head count cannot be inferred: pass num_attention_heads= "
            "(dsl-convert-mdlm: --num_attention_heads)."
        )
    return hidden_size // 64


def _read_mdlm_checkpoint(checkpoint, revision=None) -> tuple[dict, dict]:
    """(MDLM config dict, state dict) from a state dict, a weights file, a local folder or a Hub repo id."""

    def read_json(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    if isinstance(checkpoint, dict):
        return {}, checkpoint
    checkpoint = str(checkpoint)
    if os.path.isfile(checkpoint):
        config_path = os.path.join(os.path.dirname(checkpoint), "config.json")
        return (read_json(config_path) if os.path.isfile(config_path) else {}), load_state_dict(checkpoint)
    config_path = cached_file(checkpoint, "config.json", revision=revision, _raise_exceptions_for_missing_entries=False)
    config = read_json(config_path) if config_path else {}
    for weights_name in ("model.safetensors", "pytorch_model.bin"):
        weights_path = cached_file(
            checkpoint, weights_name, revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if weights_path:
            return config, load_state_dict(weights_path)
    raise OSError(f"{checkpoint!r} has neither model.safetensors nor pytorch_model.bin.")


__all__ = ["DSLForMaskedDiffusion", "DSLPreTrainedModel", "DSLMaskedDiffusionOutput"]
