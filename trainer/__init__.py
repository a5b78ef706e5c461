"""Training for DSL and MDLM: corruption processes, losses, data, tokenizers, `DSLTrainer` and the `dsl-finetune` CLI.

`dsl_diffusion.trainer.finetune` (the CLI) is not imported here: `python -m dsl_diffusion.trainer.finetune` or the
`dsl-finetune` console script run it.
"""

from .corruption import (
    SNR_PATH_NAMES,
    ConstantPath,
    LinearPath,
    LogLinearPath,
    LogNormalPath,
    MixturePath,
    ROARPath,
    SNRPath,
    SNRSample,
    build_snr_path,
    mdlm_alpha,
    mdlm_loss_weight,
    mdlm_mask_tokens,
    sample_mdlm_times,
)
from .data import (
    DiffusionDataCollator,
    build_datasets,
    load_bbc_news,
    load_text_dataset,
    pack_wrapped,
    pad_rows,
    tokenize_dataset,
)
from .losses import LossOutput, diffusion_nll_bound, dsl_loss, mdlm_loss, roar_nll, unwrap_denoiser
from .tokenization import add_mask_token, build_offline_gpt2_tokenizer, load_tokenizer, train_bpe_tokenizer
from .trainer import (
    CHECKPOINT_COMPLETE_NAME,
    EMA_WEIGHTS_NAME,
    OBJECTIVES,
    DSLTrainer,
    DSLTrainingArguments,
    EMACallback,
    ExponentialMovingAverage,
    get_last_complete_checkpoint,
    is_checkpoint_complete,
)

__all__ = [
    # corruption
    "SNR_PATH_NAMES",
    "SNRPath",
    "SNRSample",
    "ROARPath",
    "LogNormalPath",
    "LogLinearPath",
    "LinearPath",
    "ConstantPath",
    "MixturePath",
    "build_snr_path",
    "sample_mdlm_times",
    "mdlm_alpha",
    "mdlm_loss_weight",
    "mdlm_mask_tokens",
    # losses
    "LossOutput",
    "dsl_loss",
    "mdlm_loss",
    "roar_nll",
    "diffusion_nll_bound",
    "unwrap_denoiser",
    # data and tokenizers
    "load_text_dataset",
    "load_bbc_news",
    "tokenize_dataset",
    "pack_wrapped",
    "pad_rows",
    "DiffusionDataCollator",
    "build_datasets",
    "load_tokenizer",
    "train_bpe_tokenizer",
    "add_mask_token",
    "build_offline_gpt2_tokenizer",
    # trainer
    "OBJECTIVES",
    "DSLTrainingArguments",
    "DSLTrainer",
    "EMACallback",
    "ExponentialMovingAverage",
    "get_last_complete_checkpoint",
    "is_checkpoint_complete",
    "EMA_WEIGHTS_NAME",
    "CHECKPOINT_COMPLETE_NAME",
]
