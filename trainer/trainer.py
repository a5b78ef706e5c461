"""`DSLTrainer`: a thin `transformers.Trainer` subclass for the DSL and MDLM objectives.

What it adds to the Trainer, and nothing more:

* ``compute_loss`` draws the corruption (DSL SNR path or MDLM masking) and calls the pure loss functions of
  :mod:`.losses`; the loss is normalized by the number of real tokens of the whole accumulated (and, by default,
  cross-device) batch, so gradient accumulation and data parallelism give the gradient of one big batch.
* evaluation always returns the objective's loss and also reports the ROAR NLL and the MDLM NELBO (nats, bits per
  token and the perplexity bound);
* the DSL parameters (token directions E, converter beta and bias b; the converter's value matrix W, which is the
  backbone's input table, only on request) get their own learning rate and weight decay; how far each has moved
  is logged;
* named recipes (``recipe="reference"``: the authors' code) and the reference's loss options (EOS dropped from the
  loss through a loss mask, the convex ROAR term, its SNR paths);
* an exponential moving average of the weights (:class:`EMACallback`, MDLM's warm-up), saved with every
  checkpoint, restored on resume, used for evaluation and (optionally) for the exported model; it works under
  DeepSpeed ZeRO-3 by keeping each rank's shard of the average;
* checkpoints are marked complete only once every file (EMA included) is written, and resuming picks the last
  complete one, so a run killed while saving resumes from the previous checkpoint.

DeepSpeed ZeRO-3: create the ``DSLTrainingArguments`` (with ``deepspeed=...``) BEFORE the model. The arguments
register the DeepSpeed config globally, and ``from_pretrained`` then builds the model directly partitioned
(``deepspeed.zero.Init``) instead of materializing it whole on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints, sort_checkpoints

from .corruption import LOGNORMAL_SNR_PATHS, SNR_PATH_NAMES, SNRPath, build_snr_path
from .distributed import configure_torch_extensions_dir, resolve_deepspeed_config, set_single_process_distributed_env
from .losses import ROAR_TERMS, LossOutput, dsl_loss, mdlm_loss, roar_nll, token_loss_mask, unwrap_denoiser

logger = logging.getLogger(__name__)

OBJECTIVES = ("dsl", "mdlm")
EMA_WEIGHTS_NAME = "ema.safetensors"
DSL_STATE_NAME = "dsl_state.safetensors"
CHECKPOINT_COMPLETE_NAME = "checkpoint_complete.json"
# The parameters DSL adds to the MDLM backbone: the token directions E, the converter's beta and its bias b. The
# converter's value matrix W is MDLM's input table (`backbone.vocab_embed.embedding`): it belongs to the backbone
# and joins the DSL group only with `dsl_group_includes_input_table`.
DEFAULT_DSL_PARAMETER_PATTERNS = ["token_directions", "converter_beta", "converter_bias"]
INPUT_TABLE_PATTERN = "backbone.vocab_embed.embedding"
# What the EOS / BOS tokens count for in the training loss: "count" (MDLM) or "drop" (the reference code, whose
# loss skips `input_ids == pad_id` with GPT-2's pad = EOS = BOS). Dropped tokens stay in the input and attention.
EOS_IN_LOSS_CHOICES = ("count", "drop")
# Named training recipes: argument values applied by `DSLTrainingArguments(recipe=...)`.
# "reference": the authors' DSL2 code (`train.py`, `configs/optim/adamw.yaml`, `configs/snrpath/lognormal-owt.yaml`,
# `configs/train/base-owt.yaml`): one AdamW group (betas 0.9 / 0.999, eps 1e-8, no weight decay) at a constant
# 3e-4 with no warm-up, gradient clipping at 1.0, an EMA of 0.999 with no warm-up, per-sequence log-normal SNRs
# (2.69, 1.41) with no ROAR rows and no ROAR term, pad = EOS dropped from the cross-entropy.
RECIPES = {
    "reference": {
        "learning_rate": 3e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "ema_decay": 0.999,
        "ema_warmup": False,
        "dsl_learning_rate": None,
        "dsl_weight_decay": 0.0,
        "snr_path": "lognormal",
        "lognormal_mu": 2.69,
        "lognormal_sigma": 1.41,
        "per_token_snr": False,
        "roar_lambda": 0.0,
        "roar_term": "convex",
        "eos_in_loss": "drop",
    }
}
# The values of the arguments whose default is None so that a recipe can tell "not given" from "given": what they
# become when neither the user nor a recipe sets them.
UNSET_DEFAULTS = {
    "snr_path": "mixture",
    "roar_term": "convex",
    "eos_in_loss": "count",
    "ema_decay": 0.0,
    "ema_warmup": True,
}
# Every loss component a step can report, in a fixed order so that ranks can sum them with one all-reduce.
LOSS_COMPONENTS = (
    "ce",
    "continuous_ce",
    "endpoint_ce",
    "endpoint_masked_ce",
    "roar_nll",
    "nelbo",
    "masked_ce",
    "mask_fraction",
)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DSLTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the DSL / MDLM objective, the SNR path, EMA and the DSL parameter group.

    The defaults follow METHOD.md: mixture path with a quarter of ROAR rows, log-normal SNRs (mu 2.69, sigma 1.41)
    for the rest, s_max from the model config (100), no ROAR term, EOS counted in the loss (as MDLM), time epsilon
    1e-3, no EMA (MDLM used 0.9999, the DSL fine-tuning recipe 0.999). The mixture stays the default, rather than
    the reference code's all-log-normal path, because the discrete samplers (MDLM, ReMDM, ROAR, the hybrid's
    discrete phase) feed the network exactly the endpoint states z = 0 and z = s_hi e_x that the ROAR rows train;
    the log-normal path reaches them only in its tails.

    ``recipe`` names a preset (see ``RECIPES``; "reference" is the authors' code). It fills in every argument the
    user left unset: the DSL arguments whose default is None (``snr_path``, ``roar_term``, ``eos_in_loss``,
    ``ema_decay``, ``ema_warmup``) and the others still at their dataclass default (a Trainer argument given
    explicitly with its default value, e.g. ``--learning_rate 5e-5``, cannot be told apart and takes the recipe's).
    The resolved values are what the saved arguments record.
    """

    recipe: str | None = field(
        default=None,
        metadata={"help": f"Named training recipe, one of {tuple(RECIPES)}; fills in the arguments left unset."},
    )
    objective: str = field(default="dsl", metadata={"help": f"Training objective, one of {OBJECTIVES}."})
    snr_path: str | None = field(
        default=None,
        metadata={
            "help": f"DSL SNR path, one of {SNR_PATH_NAMES}. Default mixture (rho ROAR rows + log-normal); "
            "lognormal is the reference code's default; reference_mixed is its `mixed` path (B // 4 ROAR rows, "
            "log-normal 4.0 / 1.5)."
        },
    )
    rho: float = field(default=0.25, metadata={"help": "Fraction of ROAR endpoint rows in the mixture, in [0, 1]."})
    snr_max: float | None = field(
        default=None, metadata={"help": "SNR of a clean token (ROAR endpoints, grids); default: the model's snr_max."}
    )
    lognormal_mu: float = field(default=2.69, metadata={"help": "Mean of log SNR (OWT 2.69, text8 1.4)."})
    lognormal_sigma: float = field(default=1.41, metadata={"help": "Std of log SNR (OWT 1.41, text8 0.55), > 0."})
    per_token_snr: bool = field(
        default=False, metadata={"help": "Draw continuous SNRs per token instead of per sequence."}
    )
    per_token_snr_fraction: float = field(
        default=1.0,
        metadata={"help": "With per_token_snr: the share of the continuous rows drawn per token; the rest get one "
                          "SNR per row, the states the SDE samplers show. In [0, 1]."},
    )
    snr_min: float = field(default=0.01, metadata={"help": "Lowest SNR of the log-linear path, > 0."})
    roar_smoothed: bool = field(
        default=False, metadata={"help": "Smoothed ROAR endpoints (masked s ~ U[0, lo), clean s ~ U[0.8, 1] s_max)."}
    )
    smoothed_snr_lo: float = field(default=1.0, metadata={"help": "Upper SNR of smoothed masked tokens, > 0."})
    roar_lambda: float = field(
        default=0.0, metadata={"help": "Weight lambda of the ROAR NLL term (0 or 0.5; in [0, 1] when convex)."}
    )
    roar_term: str | None = field(
        default=None,
        metadata={
            "help": f"How the ROAR term enters, one of {ROAR_TERMS}: convex = (1 - lambda) CE + lambda ROAR (default, "
            "the reference code), added = CE + lambda ROAR."
        },
    )
    eos_in_loss: str | None = field(
        default=None,
        metadata={
            "help": f"EOS / BOS / pad tokens in the training loss, one of {EOS_IN_LOSS_CHOICES}: count (default, "
            "MDLM) or drop (the reference code, GPT-2 pad = EOS); dropped tokens are still attended to."
        },
    )
    time_eps: float = field(default=1e-3, metadata={"help": "MDLM schedule and time-sampling epsilon, in (0, 1)."})
    ema_decay: float | None = field(
        default=None, metadata={"help": "EMA decay of the weights in [0, 1); 0 (the default) turns EMA off."}
    )
    ema_warmup: bool | None = field(
        default=None,
        metadata={"help": "MDLM's EMA warm-up: decay_n = min(decay, (1 + n) / (10 + n)) (default on; the reference: off)."},
    )
    ema_eval: bool = field(default=True, metadata={"help": "Evaluate with the EMA weights (when EMA is on)."})
    ema_export: bool = field(
        default=True, metadata={"help": "Export the final model with the EMA weights (when EMA is on)."}
    )
    dsl_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the DSL parameters (E, beta, converter bias b); default: learning_rate."},
    )
    dsl_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the DSL-specific parameters."})
    dsl_parameter_patterns: list[str] = field(
        default_factory=lambda: list(DEFAULT_DSL_PARAMETER_PATTERNS),
        metadata={"help": "Parameter-name substrings that select the DSL parameter group (default: E, beta, b)."},
    )
    dsl_group_includes_input_table: bool = field(
        default=False,
        metadata={
            "help": "Also put the converter's value matrix W (the backbone's input table, vocab_embed.embedding) in "
            "the DSL group; by default it is a backbone weight at the backbone's rate."
        },
    )
    eval_roar_nll: bool = field(default=True, metadata={"help": "Report the ROAR NLL during evaluation."})
    eval_mdlm_nelbo: bool = field(default=True, metadata={"help": "Report the MDLM NELBO during evaluation."})

    def __post_init__(self):
        # The recipe first, so that validation and the parent class see the resolved values.
        self.apply_recipe()
        # Fail before any work starts (and before DeepSpeed is configured by the parent class).
        self.validate_dsl_arguments()
        if self.deepspeed:
            # Before the parent reads the DeepSpeed config: the packaged names ("zero2" / "zero3") become their files,
            # and one process without a launcher gets the process-group env DeepSpeed needs. Here rather than in the
            # CLI, so that command lines and YAML / JSON files (HfArgumentParser) are handled alike.
            if isinstance(self.deepspeed, str):
                self.deepspeed = resolve_deepspeed_config(self.deepspeed)
            configure_torch_extensions_dir()
            set_single_process_distributed_env()
        super().__post_init__()
        if self.deepspeed and self.use_cpu:
            self._init_deepspeed_comm_on_cpu()

    def _init_deepspeed_comm_on_cpu(self) -> None:
        """Initialize ``deepspeed.comm`` now, as accelerate does on GPUs but not with ``use_cpu``.

        Otherwise ``deepspeed.zero.Init`` (ZeRO-3 model creation) reads the world size before DeepSpeed's
        communication is set up, takes it to be 1, and fails its batch-size check in multi-process runs.
        """
        import deepspeed
        from deepspeed import comm as ds_comm

        if not ds_comm.is_initialized():
            _ = self.device  # accelerate initializes torch.distributed (gloo) for multi-process CPU runs
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    def apply_recipe(self) -> None:
        """Fill in the unset arguments from ``recipe`` (see the class docstring), then the remaining unset ones."""
        if self.recipe is not None:
            if self.recipe not in RECIPES:
                raise ValueError(f"recipe={self.recipe!r} is not supported; accepted: {tuple(RECIPES)}")
            defaults = {spec.name: spec.default for spec in dataclasses.fields(self)}
            for name, value in RECIPES[self.recipe].items():
                current = getattr(self, name)
                if current is None or current == defaults[name]:
                    setattr(self, name, value)
                elif current != value:
                    logger.warning("recipe %r: keeping %s=%r (the recipe's value is %r).", self.recipe, name, current, value)
        for name, value in UNSET_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate_dsl_arguments(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        def finite(value) -> bool:
            # NaN fails every comparison and inf passes `> 0`: a range check alone lets both through.
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        require(self.objective in OBJECTIVES, f"objective={self.objective!r} is not supported; accepted: {OBJECTIVES}")
        require(
            self.snr_path in SNR_PATH_NAMES, f"snr_path={self.snr_path!r} is not supported; accepted: {SNR_PATH_NAMES}"
        )
        require(0.0 <= self.rho <= 1.0, f"rho={self.rho} (ROAR fraction) must lie in [0, 1]")
        require(
            self.snr_max is None or (finite(self.snr_max) and self.snr_max > 0),
            f"snr_max={self.snr_max} must be a finite SNR > 0 (or unset to use the model's)",
        )
        require(finite(self.lognormal_mu), f"lognormal_mu={self.lognormal_mu} must be finite")
        require(finite(self.lognormal_sigma) and self.lognormal_sigma > 0, f"lognormal_sigma={self.lognormal_sigma} must be a finite number > 0")
        require(finite(self.snr_min) and self.snr_min > 0, f"snr_min={self.snr_min} must be a finite SNR > 0")
        require(
            0.0 <= self.per_token_snr_fraction <= 1.0,
            f"per_token_snr_fraction={self.per_token_snr_fraction} (share of per-token rows) must lie in [0, 1]",
        )
        require(
            self.per_token_snr_fraction == 1.0 or (self.per_token_snr and self.snr_path in LOGNORMAL_SNR_PATHS),
            f"per_token_snr_fraction={self.per_token_snr_fraction} needs per_token_snr=True and a log-normal "
            f"snr_path {LOGNORMAL_SNR_PATHS}, got per_token_snr={self.per_token_snr}, snr_path={self.snr_path!r}",
        )
        require(
            finite(self.smoothed_snr_lo) and self.smoothed_snr_lo > 0,
            f"smoothed_snr_lo={self.smoothed_snr_lo} must be a finite SNR > 0",
        )
        require(
            finite(self.roar_lambda) and self.roar_lambda >= 0,
            f"roar_lambda={self.roar_lambda} must be a finite weight >= 0 (the recipe uses 0 or 0.5)",
        )
        require(self.roar_term in ROAR_TERMS, f"roar_term={self.roar_term!r} is not supported; accepted: {ROAR_TERMS}")
        require(
            self.roar_term != "convex" or self.roar_lambda <= 1,
            f"roar_lambda={self.roar_lambda} must lie in [0, 1] with roar_term='convex' ((1 - lambda) CE + lambda ROAR)",
        )
        require(
            self.eos_in_loss in EOS_IN_LOSS_CHOICES,
            f"eos_in_loss={self.eos_in_loss!r} is not supported; accepted: {EOS_IN_LOSS_CHOICES}",
        )
        if self.snr_path == "reference_mixed":
            # Its parameters are fixed by the name: a changed value here would be silently ignored.
            changed = {
                name: getattr(self, name)
                for name, default in (("rho", 0.25), ("lognormal_mu", 2.69), ("lognormal_sigma", 1.41))
                if getattr(self, name) != default
            }
            require(
                not changed,
                f"snr_path='reference_mixed' fixes rho 1/4 (floor) and log-normal (4.0, 1.5); {changed} does not "
                "apply: use snr_path='mixture' to choose them",
            )
        require(0.0 < self.time_eps < 1.0, f"time_eps={self.time_eps} must lie in (0, 1)")
        require(0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay} must lie in [0, 1) (0 turns EMA off)")
        require(
            finite(self.learning_rate) and self.learning_rate >= 0,
            f"learning_rate={self.learning_rate} must be a finite number >= 0 (the MDLM recipe uses 3e-4)",
        )
        require(
            self.dsl_learning_rate is None or (finite(self.dsl_learning_rate) and self.dsl_learning_rate > 0),
            f"dsl_learning_rate={self.dsl_learning_rate} must be a finite number > 0 (or unset to use learning_rate)",
        )
        require(
            finite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay={self.weight_decay} must be a finite number >= 0",
        )
        require(
            finite(self.dsl_weight_decay) and self.dsl_weight_decay >= 0,
            f"dsl_weight_decay={self.dsl_weight_decay} must be a finite number >= 0",
        )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be an integer >= 1")
        require(
            finite(self.max_grad_norm) and self.max_grad_norm >= 0,
            f"max_grad_norm={self.max_grad_norm} must be a finite number >= 0 (0 turns clipping off)",
        )
        # Accept "a,b" as well as separate values (command line and config files).
        self.dsl_parameter_patterns = [
            name.strip() for value in self.dsl_parameter_patterns for name in value.split(",") if name.strip()
        ]
        if self.dsl_group_includes_input_table and INPUT_TABLE_PATTERN not in self.dsl_parameter_patterns:
            self.dsl_parameter_patterns.append(INPUT_TABLE_PATTERN)

    def build_snr_path(self, default_snr_max: float = 100.0) -> SNRPath:
        """The SNR path these arguments describe (``snr_max`` falls back to the model's)."""
        return build_snr_path(
            self.snr_path,
            rho=self.rho,
            snr_max=self.snr_max if self.snr_max is not None else default_snr_max,
            lognormal_mu=self.lognormal_mu,
            lognormal_sigma=self.lognormal_sigma,
            per_token=self.per_token_snr,
            snr_min=self.snr_min,
            roar_smoothed=self.roar_smoothed,
            smoothed_snr_lo=self.smoothed_snr_lo,
            per_token_fraction=self.per_token_snr_fraction,
        )


# ---------------------------------------------------------------------------------------------------------------
# EMA (ZeRO-3 aware)
# ---------------------------------------------------------------------------------------------------------------


def _is_zero3_parameter(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def _gather_zero3_partitions(partition: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Reassemble the full tensor of a ZeRO-3 parameter from every rank's ``partition`` (same layout as ds_tensor).

    DeepSpeed splits the flattened parameter, padded to a multiple of the group size, into equal contiguous
    chunks in rank order; this is the inverse, for any tensor laid out like the parameter's own partition.
    """
    import torch.distributed as dist

    world_size = param.ds_zero_partition_world_size
    parts = [torch.empty_like(partition) for _ in range(world_size)]
    dist.all_gather(parts, partition.contiguous(), group=param.ds_process_group)
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)


def _local_zero3_partition(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of ``full`` (shaped like ``param``) in ZeRO-3's partition layout, zero-padded."""
    partition_size = param.ds_tensor.numel()
    start = param.ds_zero_partition_rank * partition_size
    flat = full.reshape(-1)
    partition = torch.zeros(partition_size, dtype=full.dtype, device=full.device)
    count = max(0, min(partition_size, param.ds_numel - start))
    partition[:count] = flat[start : start + count]
    return partition


def _set_zero3_parameter(param: torch.Tensor, full: torch.Tensor) -> None:
    """Overwrite a ZeRO-3 parameter with ``full`` on every rank (the documented GatheredParameters route)."""
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if dist.get_rank() == 0:
            param.data.copy_(full.to(param.dtype))


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ExponentialMovingAverage:
    """fp32 exponential moving average of parameters, with MDLM's warm-up.

    After the n-th update the average moves with decay_n = min(decay, (1 + n) / (10 + n)) when ``warmup``
    (MDLM's ExponentialMovingAverage), so that short fine-tuning runs do not average in the starting weights for
    a horizon of 1 / (1 - decay) steps.

    Under DeepSpeed ZeRO-3 every rank keeps the average of its own partition only (the parameter's ``ds_tensor``),
    so the EMA costs one fp32 partition per rank and updates need no communication. ``state_dict`` gathers the
    full tensors (one parameter at a time) for saving; ``load_state_dict`` takes full tensors and keeps this
    rank's partition, so an EMA saved with one world size loads with any other.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.parameters = {name: param for name, param in named_parameters if param.requires_grad}
        if not self.parameters:
            raise ValueError("the EMA needs at least one trainable parameter")
        self.shadow = {name: self._local(param).detach().float().clone() for name, param in self.parameters.items()}
        self._backup: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _local(param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor if _is_zero3_parameter(param) else param.data

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = self.num_updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        for name, param in self.parameters.items():
            self.shadow[name].lerp_(self._local(param).float(), 1.0 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered) fp32 tensors by parameter name. Collective under ZeRO-3: call it on every rank."""
        state = {}
        for name, param in self.parameters.items():
            shadow = self.shadow[name]
            full = _gather_zero3_partitions(shadow, param) if _is_zero3_parameter(param) else shadow
            state[name] = full.detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = sorted(set(self.parameters) - set(state))
        if missing:
            raise KeyError(f"the EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, param in self.parameters.items():
            full = state[name].to(device=self.shadow[name].device, dtype=torch.float32)
            if _is_zero3_parameter(param):
                full = _local_zero3_partition(full, param)
            elif full.shape != param.shape:
                raise ValueError(f"EMA tensor {name} has shape {list(full.shape)}, the parameter {list(param.shape)}")
            self.shadow[name].copy_(full)
        self.num_updates = num_updates

    def save(self, directory: str) -> None:
        """Write ``ema.safetensors`` into ``directory`` (gathered; only the main process writes)."""
        state = self.state_dict()
        if _is_main_process():
            metadata = {"num_updates": str(self.num_updates), "decay": str(self.decay), "warmup": str(self.warmup)}
            _atomic_save_safetensors(state, os.path.join(directory, EMA_WEIGHTS_NAME), metadata)

    def load(self, directory: str) -> None:
        from safetensors import safe_open

        path = os.path.join(directory, EMA_WEIGHTS_NAME)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        self.load_state_dict(load_file(path), num_updates=int(metadata.get("num_updates", 0)))

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the averaged weights into the model (keeping a copy of the live ones for :meth:`swap_out`)."""
        if self._backup is not None:
            raise RuntimeError("the EMA weights are already swapped in")
        self._backup = {name: self._local(param).detach().clone() for name, param in self.parameters.items()}
        for name, param in self.parameters.items():
            if _is_zero3_parameter(param):
                _set_zero3_parameter(param, _gather_zero3_partitions(self.shadow[name], param))
            else:
                param.data.copy_(self.shadow[name].to(param.dtype))

    @torch.no_grad()
    def swap_out(self) -> None:
        """Restore the live weights saved by :meth:`swap_in`."""
        if self._backup is None:
            raise RuntimeError("the EMA weights are not swapped in")
        for name, param in self.parameters.items():
            if _is_zero3_parameter(param):
                _set_zero3_parameter(param, _gather_zero3_partitions(self._backup[name], param))
            else:
                param.data.copy_(self._backup[name])
        self._backup = None

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Context in which the model holds the averaged weights."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()


class EMACallback(TrainerCallback):
    """Keeps an :class:`ExponentialMovingAverage` of the trainable weights, updated after every optimizer step.

    The average is created at the start of training from the model as the Trainer prepared it (after DeepSpeed
    partitioned it and after a checkpoint was loaded), and restored from ``resume_from`` when set. With
    :class:`DSLTrainer` it is saved into every checkpoint as ``ema.safetensors`` and used for evaluation and export.
    """

    def __init__(self, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.ema: ExponentialMovingAverage | None = None
        self.resume_from: str | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = ExponentialMovingAverage(model.named_parameters(), self.decay, self.warmup)
        if self.resume_from is not None:
            if os.path.isfile(os.path.join(self.resume_from, EMA_WEIGHTS_NAME)):
                self.ema.load(self.resume_from)
            else:
                logger.warning(
                    "%s has no %s: the EMA restarts from the current weights.", self.resume_from, EMA_WEIGHTS_NAME
                )

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint helpers
# ---------------------------------------------------------------------------------------------------------------


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None):
    temporary = f"{path}.tmp"
    save_file(tensors, temporary, metadata=metadata)
    os.replace(temporary, path)


def is_checkpoint_complete(checkpoint_dir: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, CHECKPOINT_COMPLETE_NAME))


def get_last_complete_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` folder of ``output_dir`` with the largest N that :class:`DSLTrainer` marked complete.

    transformers' ``get_last_checkpoint`` finds the newest folder; the marker check is ours: a run stopped while
    writing leaves a newest folder without it, and resuming then goes back to the newest complete one."""
    if not os.path.isdir(output_dir):
        return None
    last = get_last_checkpoint(output_dir)
    if last is None or is_checkpoint_complete(last):
        return last
    complete = [path for path in sort_checkpoints(output_dir) if is_checkpoint_complete(path)]
    return complete[-1] if complete else None


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class DSLTrainer(Trainer):
    """`Trainer` for DSL (continuum corruption) and MDLM (masked diffusion NELBO) training of a DSL denoiser.

    Pass a :class:`DSLTrainingArguments`; ``snr_path`` overrides the path the arguments describe. Batches hold
    ``input_ids`` and optionally ``attention_mask`` (1 = real token); any ``labels`` are ignored.
    """

    # compute_loss normalizes by the real tokens of the whole accumulated batch (see get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: DSLTrainingArguments | None = None, snr_path: SNRPath | None = None, **kwargs):
        if not isinstance(args, DSLTrainingArguments):
            raise TypeError(f"DSLTrainer needs DSLTrainingArguments, got {type(args).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        # Our compute_loss does the normalization; never let the Trainer pass num_items_in_batch to forward.
        self.model_accepts_loss_kwargs = False
        denoiser = unwrap_denoiser(self.model)
        if args.objective == "dsl" and denoiser.config.endpoint_inputs == "table":
            # DSL training shows the network the converter's output at every SNR, the endpoints included (a ROAR row's
            # [MASK] is z = 0). The discrete path must show the trained weights the same inputs at sampling time.
            logger.info("DSL objective: endpoint_inputs 'table' -> 'converter' (what the discrete path feeds the network).")
            denoiser.config.endpoint_inputs = "converter"
        self.snr_path = snr_path if snr_path is not None else args.build_snr_path(float(denoiser.config.snr_max))
        if args.ema_decay > 0 and self.ema_callback is None:
            self.add_callback(EMACallback(args.ema_decay, warmup=args.ema_warmup))
        self._component_sums = torch.zeros(2, len(LOSS_COMPONENTS), dtype=torch.float64)
        self._eval_sums: dict[str, torch.Tensor] = {}
        self.loss_excluded_token_ids = self._loss_excluded_token_ids(denoiser.config)
        # The DSL parameters' starting values, to log how far they moved (set at the first training step, restored
        # from the checkpoint on resume).
        self._initial_directions: torch.Tensor | None = None
        self._initial_input_table: torch.Tensor | None = None

    def _loss_excluded_token_ids(self, config) -> tuple[int, ...]:
        """The token ids the training loss skips: EOS and BOS with ``eos_in_loss="drop"``, none otherwise."""
        if self.args.eos_in_loss != "drop":
            return ()
        ids = tuple(sorted({i for i in (config.eos_token_id, config.bos_token_id) if i is not None}))
        if not ids:
            raise ValueError(
                "eos_in_loss='drop' needs the model config to name eos_token_id or bos_token_id, and this model's "
                "config has neither; set them or use eos_in_loss='count'"
            )
        return ids

    def loss_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """False at the tokens the training loss skips (see ``eos_in_loss``); None when every token counts."""
        return token_loss_mask(input_ids, self.loss_excluded_token_ids)

    def count_loss_tokens(self, batch: dict) -> torch.Tensor:
        """Tokens that count in the training loss: attention_mask == 1 (all without a mask), minus skipped ones."""
        input_ids = batch["input_ids"]
        counted = batch["attention_mask"].bool() if batch.get("attention_mask") is not None else torch.ones_like(
            input_ids, dtype=torch.bool
        )
        loss_mask = self.loss_mask(input_ids)
        return (counted & loss_mask).sum() if loss_mask is not None else counted.sum()

    # --- EMA ---------------------------------------------------------------------------------------------------

    @property
    def ema_callback(self) -> EMACallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, EMACallback)), None)

    @property
    def ema(self) -> ExponentialMovingAverage | None:
        callback = self.ema_callback
        return callback.ema if callback is not None else None

    def ema_applied(self) -> contextlib.AbstractContextManager:
        """Context with the EMA weights in the model (a no-op when there is no EMA yet)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    # --- loss --------------------------------------------------------------------------------------------------

    def objective_loss(self, model, inputs: dict, generator: torch.Generator | None = None) -> LossOutput:
        """The configured objective on one batch; randomness from ``generator`` (default: the global RNG)."""
        args = self.args
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        loss_mask = self.loss_mask(input_ids)
        if args.objective == "mdlm":
            return mdlm_loss(
                model, input_ids, attention_mask, eps=args.time_eps, generator=generator, loss_mask=loss_mask
            )
        return dsl_loss(
            model,
            input_ids,
            attention_mask,
            self.snr_path,
            roar_lambda=args.roar_lambda,
            generator=generator,
            loss_mask=loss_mask,
            roar_term=args.roar_term,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self._initial_directions is None:
            self._initial_directions = self._current_directions()
        if model.training and self._initial_input_table is None:
            self._initial_input_table = self._current_input_table()
        out = self.objective_loss(model, inputs)
        for index, name in enumerate(LOSS_COMPONENTS):
            if name in out.components:
                self._component_sums[0, index] += out.components[name]
                self._component_sums[1, index] += 1
        loss = out.loss
        if num_items_in_batch is not None:
            # Sum over this micro-batch / real tokens of the whole step's batch: accumulated micro-batches add up
            # to the mean over the big batch.
            loss = out.loss * out.num_tokens / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # num_items_in_batch counts every device's tokens and DDP/DeepSpeed average the gradients.
                loss = loss * self.args.world_size
        return (loss, out) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Collect the micro-batches of one optimizer step and count their real tokens (all devices, by default)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        num_tokens = sum(self.count_loss_tokens(batch).to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_tokens = self.accelerator.gather(num_tokens).sum()
        return batch_samples, num_tokens

    # --- DSL parameter group -----------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model) -> list[str]:
        """The Trainer's rule (no biases, no nn.LayerNorm) plus nanoGPT's: only matrices decay. MDLM's norms are
        weight-only modules that the Trainer's name and type rules do not recognize."""
        # Under ZeRO-3 a partitioned parameter's own shape is empty: its real shape is ds_shape.
        matrices = {
            name for name, param in model.named_parameters() if len(getattr(param, "ds_shape", param.shape)) >= 2
        }
        return [name for name in super().get_decay_parameter_names(model) if name in matrices]

    def is_dsl_parameter(self, name: str) -> bool:
        return any(pattern in name for pattern in self.args.dsl_parameter_patterns)

    def create_optimizer(self, model=None):
        """AdamW (or ``args.optim``) with three groups: backbone with / without weight decay, and the DSL group."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay_names = set(self.get_decay_parameter_names(opt_model))
            backbone_decay, backbone_no_decay, dsl_specific = [], [], []
            for name, param in opt_model.named_parameters():
                if not param.requires_grad:
                    continue
                if self.is_dsl_parameter(name):
                    dsl_specific.append(param)
                elif name in decay_names:
                    backbone_decay.append(param)
                else:
                    backbone_no_decay.append(param)
            groups = [
                {"params": backbone_decay, "weight_decay": self.args.weight_decay},
                {"params": backbone_no_decay, "weight_decay": 0.0},
                {
                    "params": dsl_specific,
                    "weight_decay": self.args.dsl_weight_decay,
                    "lr": self.args.dsl_learning_rate or self.args.learning_rate,
                },
            ]
            if not any(self.is_dsl_parameter(name) for name, _ in opt_model.named_parameters()):
                # Otherwise the DSL learning rate and weight decay would silently apply to nothing (frozen DSL
                # parameters, e.g. under LoRA, are fine: the patterns do name them).
                raise ValueError(
                    f"dsl_parameter_patterns={self.args.dsl_parameter_patterns} match no parameter of the model, so "
                    f"dsl_learning_rate and dsl_weight_decay would apply to nothing; use substrings of parameter names "
                    f"(default: {list(DEFAULT_DSL_PARAMETER_PATTERNS)}), e.g. from model.named_parameters()."
                )
            groups = [group for group in groups if group["params"]]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            logger.info(
                "Optimizer groups: %d backbone tensors with decay, %d without, %d DSL-specific (lr %g, wd %g).",
                len(backbone_decay),
                len(backbone_no_decay),
                len(dsl_specific),
                self.args.dsl_learning_rate or self.args.learning_rate,
                self.args.dsl_weight_decay,
            )
        return self.optimizer

    def _named_dsl_tensor(self, key: str) -> torch.nn.Parameter | None:
        """The parameter whose name contains ``key``, preferring a trainable one (PEFT keeps a frozen original
        next to the trained copy of a module in ``modules_to_save``)."""
        matches = [param for name, param in self.model.named_parameters() if key in name]
        return next((param for param in matches if param.requires_grad), matches[0] if matches else None)

    def _gathered_value(self, param: torch.nn.Parameter) -> torch.Tensor:
        """A full fp32 copy of ``param`` (gathered under ZeRO-3, which makes this collective)."""
        if _is_zero3_parameter(param):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                return param.detach().float().clone()
        return param.detach().float().clone()

    def _current_directions(self) -> torch.Tensor | None:
        param = self._named_dsl_tensor("token_directions.weight")
        return F.normalize(self._gathered_value(param), dim=-1) if param is not None else None

    def _current_input_table(self) -> torch.Tensor | None:
        """A CPU copy of the converter's value matrix W (the backbone's input table) when it is trained."""
        param = self._named_dsl_tensor(INPUT_TABLE_PATTERN)
        return self._gathered_value(param).cpu() if param is not None and param.requires_grad else None

    def dsl_parameter_metrics(self) -> dict[str, float]:
        """How far each DSL parameter moved, for the training log.

        * ``token_directions_cosine_to_init``: mean cosine of E's rows to their initial directions;
        * ``converter_beta``;
        * ``converter_mask_bias``: b at the ``[MASK]`` slot, and ``converter_mask_weight_at_zero``: that slot's
          weight at z = 0, softmax(b)[mask] (the converter's input at a masked token is this mix of W's columns;
          1 means exactly MDLM's mask embedding);
        * ``input_table_relative_change``: ||W - W_0|| / ||W_0|| (Frobenius), when W is trained.
        """
        metrics = {}
        directions = self._current_directions()
        if directions is not None and self._initial_directions is not None:
            cosine = (directions * self._initial_directions.to(directions.device)).sum(dim=-1).mean()
            metrics["token_directions_cosine_to_init"] = float(cosine)
        beta = self._named_dsl_tensor("converter_beta")
        if beta is not None:
            metrics["converter_beta"] = float(self._gathered_value(beta))
        bias = self._named_dsl_tensor("converter_bias")
        if bias is not None:
            bias = self._gathered_value(bias)
            mask_slot = unwrap_denoiser(self.model).config.mask_token_id
            metrics["converter_mask_bias"] = float(bias[mask_slot])
            metrics["converter_mask_weight_at_zero"] = float(bias.softmax(dim=-1)[mask_slot])
        table = self._current_input_table()
        if table is not None and self._initial_input_table is not None:
            change = torch.linalg.norm(table - self._initial_input_table) / torch.linalg.norm(self._initial_input_table)
            metrics["input_table_relative_change"] = float(change)
        return metrics

    # --- logging -----------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(key.startswith("eval_") for key in logs):
            # A training log (every rank calls it): add the mean of each loss component since the last log.
            sums = self._component_sums.to(self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            for index, name in enumerate(LOSS_COMPONENTS):
                if sums[1, index] > 0:
                    logs[name] = round(float(sums[0, index] / sums[1, index]), 6)
            self._component_sums.zero_()
            logs.update(self.dsl_parameter_metrics())
        super().log(logs, start_time)

    # --- evaluation --------------------------------------------------------------------------------------------

    def _eval_generator(self) -> torch.Generator:
        """A fresh generator per evaluation: the same masks and noise every time (comparable numbers), and the
        global RNG, hence the training trajectory, is not touched by evaluation."""
        generator = torch.Generator(device=self.args.device)
        generator.manual_seed(self.args.seed + 1_000_003 * self.args.process_index)
        return generator

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_sums = {}
        self._eval_rng = self._eval_generator()
        use_ema = self.args.ema_eval and self.ema is not None
        with self.ema_applied() if use_ema else contextlib.nullcontext():
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        output.metrics.update(self._likelihood_metrics(metric_key_prefix))
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Always the objective's loss (no logits are gathered); ROAR NLL and MDLM NELBO sums on the side."""
        inputs = self._prepare_inputs(inputs)
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        generator = self._eval_rng
        with torch.no_grad(), self.compute_loss_context_manager():
            estimates = {"objective": self.objective_loss(model, inputs, generator=generator)}
            # The likelihoods count every real token, whatever eos_in_loss says, so that runs compare.
            if self.args.eval_roar_nll:
                estimates["roar"] = roar_nll(model, input_ids, attention_mask, generator=generator)
            if self.args.eval_mdlm_nelbo:
                estimates["mdlm"] = mdlm_loss(
                    model, input_ids, attention_mask, eps=self.args.time_eps, generator=generator
                )
        for name, estimate in estimates.items():
            sums = torch.stack([estimate.nll_sum.double(), estimate.num_tokens.double()])
            self._eval_sums[name] = self._eval_sums.get(name, 0) + sums
        return (estimates["objective"].loss.detach(), None, None)

    def _likelihood_metrics(self, prefix: str) -> dict[str, float]:
        metrics = {}
        for name, sums in self._eval_sums.items():
            if name == "objective":
                continue
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            nats = float(sums[0] / sums[1].clamp(min=1))
            label = "roar_nll" if name == "roar" else "mdlm_nelbo"
            metrics[f"{prefix}_{label}"] = nats
            metrics[f"{prefix}_{name}_bits_per_token"] = nats / math.log(2)
            # exp(MDLM NELBO) bounds the perplexity; exp(ROAR NLL) estimates the any-order perplexity.
            perplexity_key = f"{prefix}_{name}_ppl_bound" if name == "mdlm" else f"{prefix}_{name}_ppl"
            metrics[perplexity_key] = math.exp(min(nats, 700.0))
        return metrics

    # --- checkpoints -------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, where ``resume_from_checkpoint=True`` means the last COMPLETE checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir}")
        elif resume_from_checkpoint and not is_checkpoint_complete(resume_from_checkpoint):
            logger.warning(
                "%s has no %s marker: it may be incomplete (or not written by DSLTrainer).",
                resume_from_checkpoint,
                CHECKPOINT_COMPLETE_NAME,
            )
        if resume_from_checkpoint:
            logger.info("Resuming from %s", resume_from_checkpoint)
        if self.ema_callback is not None:
            self.ema_callback.resume_from = resume_from_checkpoint or None
        self._initial_directions = self._initial_input_table = None
        if resume_from_checkpoint:
            state_path = os.path.join(resume_from_checkpoint, DSL_STATE_NAME)
            if os.path.isfile(state_path):
                state = load_file(state_path)
                self._initial_directions = state.get("initial_token_directions")
                self._initial_input_table = state.get("initial_input_table")
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, then the EMA and the DSL state, then the completion marker, then rotation."""
        save_total_limit = self.args.save_total_limit
        # Rotate only after this checkpoint is complete, so that a crash never leaves no complete checkpoint.
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.ema is not None:
            self.ema.save(checkpoint_dir)
        initial_values = {
            "initial_token_directions": self._initial_directions,
            "initial_input_table": self._initial_input_table,
        }
        initial_values = {name: value.cpu().contiguous() for name, value in initial_values.items() if value is not None}
        if self.args.should_save and initial_values:
            _atomic_save_safetensors(
                initial_values,
                os.path.join(checkpoint_dir, DSL_STATE_NAME),
            )
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            marker = os.path.join(checkpoint_dir, CHECKPOINT_COMPLETE_NAME)
            with open(f"{marker}.tmp", "w", encoding="utf-8") as f:
                json.dump({"global_step": self.state.global_step}, f)
            os.replace(f"{marker}.tmp", marker)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


__all__ = [
    "DSLTrainingArguments",
    "DSLTrainer",
    "EMACallback",
    "ExponentialMovingAverage",
    "get_last_complete_checkpoint",
    "is_checkpoint_complete",
    "OBJECTIVES",
    "EMA_WEIGHTS_NAME",
    "CHECKPOINT_COMPLETE_NAME",
]
