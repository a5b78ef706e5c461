"""Configuration of the DSL denoiser: MDLM's diffusion transformer (DiT) with a noisy-state input converter."""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# MDLM's config.json (model_type "mdlm") field names -> the transformers-standard names used here.
MDLM_CONFIG_ALIASES = {
    "hidden_dim": "hidden_size",
    "n_blocks": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "model_length": "max_position_embeddings",
}
SNR_CONDITIONING_MODES = ("none", "norm")
# How `forward(input_ids=...)` shows the discrete endpoints ([MASK] = SNR 0, a token = SNR s_hi) to the backbone.
ENDPOINT_INPUTS = ("table", "converter", "converter_at_mask")
# Fields that count something (widths, depths, lengths): each must be an integer >= 1.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "cond_dim",
    "max_position_embeddings",
    "embed_dim",
)


def check_size(name: str, value) -> None:
    """A size field: an integer >= 1 (a bool is not a size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1; pass a positive size.")


def check_real(name: str, value, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
               high_open: bool = False, hint: str = "") -> None:
    """A float field: a finite real number in the interval [low, high] (a bound is excluded when `*_open`).

    NaN and +-inf fail every comparison-based range check, so finiteness is tested first."""
    opening = "(" if low_open or math.isinf(low) else "["
    closing = ")" if high_open or math.isinf(high) else "]"
    interval = f"{opening}{low:g}, {high:g}{closing}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a real number in {interval}.{hint}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name}={value!r} must be a finite number in {interval}.{hint}")


@strict(accept_kwargs=True)
class DSLConfig(PreTrainedConfig):
    r"""Configuration for [`DSLForMaskedDiffusion`].

    The defaults reproduce the backbone of the public OpenWebText checkpoint `kuleshov-group/mdlm-owt`.

    Vocabulary convention: `vocab_size` counts the REAL tokens V, which are also the output classes (DSL never
    predicts `[MASK]`). Inputs accept ids `0..V`, and `[MASK]` is id V (`mask_token_id`). MDLM counts the mask in
    its vocabulary (50258 for GPT-2): a config written with MDLM's own names (`hidden_dim`, `n_blocks`, `n_heads`,
    `model_length`, i.e. an MDLM `config.json`) is read in MDLM's convention, its last id being the mask.

    Args:
        vocab_size: number of real tokens V (output classes).
        mask_token_id: id of `[MASK]` on the input side; must be V (defaults to it).
        hidden_size, num_hidden_layers, num_attention_heads: transformer width, depth and heads.
        intermediate_size: MLP width (`None` = 4 * hidden_size).
        cond_dim: width of the adaLN conditioning vector c (128 in the released MDLM weights).
        max_position_embeddings: sequence length the model is trained for (MDLM: 1024).
        dropout: dropout on the residual branches (MDLM: 0.1).
        layer_norm_eps: epsilon of the weight-only LayerNorm (computed in fp32).
        rope_theta: rotary base.
        embed_dim: dimension d of the noisy states z and of the unit-norm token directions E (64 for OWT).
        converter_beta_init: initial inverse temperature beta of the converter softmax (`None` = 1/sqrt(d)).
        converter_mask_bias: initial bias of the converter's `[MASK]` slot (`None` = log((V + 1) * 99), so that
            p~(mask | z = 0) ~= 0.99; **[choice]**: the authors' code also uses log V).
        converter_chunk_size: how many vocabulary slots the converter's softmax takes at a time (`None` = about 512K
            scores per chunk on a CPU and 16M on a GPU, for the number of states converted, at least 256 slots). A
            speed and memory knob only: every chunk size gives the same outputs and gradients up to float rounding.
        converter_top_k: opt-in approximation (`None`, the default, is the exact converter): each state keeps only
            its k highest-scoring token slots and the `[MASK]` slot, renormalized, so h costs a k-row gather instead of
            a `[V, H]` product. Drops the mass of the other V - k slots (largest at mid SNR); see docs/speed.md for the
            measured drift. Gradients flow through the kept slots only.
        snr_conditioning: "none" (a constant adaLN vector, the default: the Bayes-optimal denoiser does not depend
            on the SNRs) or "norm" (per-token adaLN conditioning on ||z_i||) (**[choice]**).
        time_conditioning: MDLM's sigma conditioning; off in the released MDLM and in DSL.
        snr_max: the SNR that stands for a clean token (s_hi = s_max, default 100).
        endpoint_inputs: what `forward(input_ids=...)` feeds the backbone, i.e. which inputs the weights were trained
            on. "table": the value-table rows W[x] and W[V] (MDLM's lookup: exact for MDLM weights and for a fresh
            `from_mdlm` conversion). "converter": the converter at the SNR endpoints, exactly what DSL training shows
            the network: `[MASK]` is the converter at z = 0, softmax(b) W, and a token x the converter at
            z = s_hi e_x (s_hi = `snr_max` unless `endpoint_snr` is passed). "converter_at_mask": the converter at
            `[MASK]` and the exact s -> infinity limit W[x] at tokens. `DSLTrainer` sets "converter" when it trains
            with the DSL objective.
        direction_init_std: std of the Gaussian draw that initializes the token directions (then normalized).
        initializer_range: std of the normal init of linear layers.
    """

    model_type = "dsl"

    vocab_size: int = 50257
    mask_token_id: int | None = None
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    cond_dim: int = 128
    max_position_embeddings: int = 1024
    dropout: float | int = 0.1
    layer_norm_eps: float | int = 1e-5
    rope_theta: float | int = 10000.0
    embed_dim: int = 64
    converter_beta_init: float | int | None = None
    converter_mask_bias: float | int | None = None
    converter_chunk_size: int | None = None
    converter_top_k: int | None = None
    snr_conditioning: str = "none"
    time_conditioning: bool = False
    snr_max: float | int = 100.0
    endpoint_inputs: str = "table"
    direction_init_std: float | int = 1.0
    initializer_range: float | int = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        mdlm_names = {name: kwargs.pop(name) for name in list(kwargs) if name in MDLM_CONFIG_ALIASES}
        for mdlm_name, value in mdlm_names.items():
            setattr(self, MDLM_CONFIG_ALIASES[mdlm_name], value)
        if mdlm_names:
            # An MDLM config: its vocab_size includes the [MASK] row, which is the last id.
            self.vocab_size -= 1
            self.mask_token_id = self.vocab_size
            for mdlm_only in ("text_vocab_size", "auto_map", "model_type"):
                kwargs.pop(mdlm_only, None)
        # Validate what the user gave before deriving defaults from it (1/sqrt(embed_dim), log(V + 1), 4 * hidden).
        self._validate_given_fields()
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.converter_beta_init is None:
            self.converter_beta_init = 1.0 / math.sqrt(self.embed_dim)
        if self.converter_mask_bias is None:
            self.converter_mask_bias = math.log((self.vocab_size + 1) * 99.0)
        self.snr_max = float(self.snr_max)
        self._validate_dsl_fields()
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PreTrainedConfig.from_dict`, which sets keyword overrides (`from_pretrained(path, snr_max=...)`) as plain
        attributes after construction: validate them as the constructor would have."""
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config._validate_given_fields()
        config._validate_dsl_fields()
        return loaded

    def _validate_given_fields(self):
        """Every size >= 1 and every float finite and in range, before any default is derived from them."""
        for name in SIZE_FIELDS:
            if name == "intermediate_size" and self.intermediate_size is None:
                continue
            check_size(name, getattr(self, name))
        check_real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_real("layer_norm_eps", self.layer_norm_eps, low=0.0, high=1.0, low_open=True,
                   hint=" It keeps the LayerNorm's variance away from 0 (MDLM: 1e-5).")
        check_real("rope_theta", self.rope_theta, low=1.0, low_open=True,
                   hint=" The rotary base must exceed 1 for the frequencies to decrease (MDLM: 10000).")
        check_real("snr_max", self.snr_max, low=0.0, low_open=True, hint=" It is the SNR of a clean token (default 100).")
        check_real("direction_init_std", self.direction_init_std, low=0.0, low_open=True,
                   hint=" The token directions are normalized Gaussian draws: a std of 0 makes them all zero.")
        check_real("initializer_range", self.initializer_range, low=0.0)
        if self.converter_beta_init is not None:
            check_real("converter_beta_init", self.converter_beta_init, low=0.0, low_open=True,
                       hint=" It is the converter's inverse temperature (None = 1/sqrt(embed_dim)).")
        if self.converter_mask_bias is not None:
            check_real("converter_mask_bias", self.converter_mask_bias,
                       hint=" None = log((vocab_size + 1) * 99), so that p~(mask | z = 0) ~= 0.99.")
        if self.converter_chunk_size is not None:
            check_size("converter_chunk_size", self.converter_chunk_size)
        if self.converter_top_k is not None:
            check_size("converter_top_k", self.converter_top_k)
        if self.snr_conditioning not in SNR_CONDITIONING_MODES:
            raise ValueError(
                f"snr_conditioning={self.snr_conditioning!r} is not supported; accepted: {SNR_CONDITIONING_MODES}."
            )

    def _validate_dsl_fields(self):
        self.validate_token_ids()
        if self.mask_token_id != self.vocab_size:
            # The converter's value table has one row per input id: V real tokens, then the [MASK] slot.
            raise ValueError(
                f"mask_token_id={self.mask_token_id} must equal vocab_size={self.vocab_size}: [MASK] is the id "
                "right after the real tokens (add it last to the tokenizer)."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings.")
        if self.snr_conditioning != "none" and self.time_conditioning:
            raise ValueError("time_conditioning=True and snr_conditioning='norm' both claim the adaLN input; pick one.")
        if self.endpoint_inputs not in ENDPOINT_INPUTS:
            raise ValueError(
                f"endpoint_inputs={self.endpoint_inputs!r} is not supported; accepted: {ENDPOINT_INPUTS} (\"table\" for "
                "MDLM weights, \"converter\" for weights trained with the DSL objective)."
            )

    def validate_token_ids(self):
        """Special ids index the INPUT side, which has V real tokens plus `[MASK]` (id V): accept 0..V."""
        for name, value in self.to_dict().items():
            if name.endswith("_token_id") and isinstance(value, int) and not 0 <= value <= self.vocab_size:
                raise ValueError(
                    f"{name}={value} is outside the input vocabulary [0, {self.vocab_size}] (real tokens and [MASK])."
                )

    @property
    def num_input_slots(self) -> int:
        """Rows of the converter's value table: V real tokens plus the `[MASK]` slot."""
        return self.vocab_size + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["DSLConfig"]
