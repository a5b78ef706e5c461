"""`dsl-finetune`: train or fine-tune a DSL denoiser with the DSL or MDLM objective.

The research workflow this serves: start from the public MDLM OpenWebText checkpoint, fine-tune it with DSL
(optionally under DeepSpeed), and compare it with MDLM trained the same way::

    # one process (CPU or one GPU)
    dsl-finetune --mdlm_checkpoint kuleshov-group/mdlm-owt --objective dsl --output_dir out/dsl-owt \\
        --max_steps 10000 --per_device_train_batch_size 8 --learning_rate 3e-4 --ema_decay 0.999 --bf16

    # 8 GPUs with DeepSpeed ZeRO-2 (or zero3); `zero2` / `zero3` name the configs shipped with the package
    torchrun --nproc_per_node 8 -m dsl_diffusion.trainer.finetune --deepspeed zero2 ...
    accelerate launch --num_processes 8 -m dsl_diffusion.trainer.finetune --deepspeed zero2 ...
    # several nodes: torchrun --nnodes N --node_rank R --master_addr HOST --master_port PORT --nproc_per_node 8 ...

    # all arguments from one file
    dsl-finetune config.yaml

Model: ``--model_name_or_path`` (a saved DSL model), ``--mdlm_checkpoint`` (converted with
``DSLForMaskedDiffusion.from_mdlm``) or neither (a fresh model from ``--model_size`` and ``--config_overrides``).
Every argument is checked before any data or weights are loaded. Under ZeRO-3 the ``TrainingArguments`` are
created (by the argument parser) before the model, as DeepSpeed requires.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

# The DeepSpeed / process-group helpers live in `.distributed` (DSLTrainingArguments uses them too); they stay
# importable from here as part of the CLI's names.
from .distributed import (  # noqa: F401
    DEEPSPEED_CONFIG_DIR,
    DEFAULT_TORCH_EXTENSIONS_DIR,
    configure_torch_extensions_dir,
    resolve_deepspeed_config,
    set_single_process_distributed_env,
)

MODEL_SIZES = {
    # name: DSLConfig sizes (the rest from the tokenizer and block size)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, cond_dim=32, embed_dim=16),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128, embed_dim=64),
}
LORA_DEFAULT_TARGETS = ["attn_qkv", "attn_out", "mlp.0", "mlp.2"]
# "mlp.0" / "mlp.2" would also match the conditioning MLP (sigma_map), which is not part of the transformer blocks.
LORA_DEFAULT_EXCLUDES = ["sigma_map.mlp.0", "sigma_map.mlp.2"]

logger = logging.getLogger("dsl_diffusion.finetune")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved DSL model (local folder or Hub repo id) to fine-tune."}
    )
    mdlm_checkpoint: str | None = field(
        default=None,
        metadata={"help": "An MDLM checkpoint to convert and fine-tune (e.g. kuleshov-group/mdlm-owt, a folder or file)."},
    )
    model_size: str | None = field(
        default=None, metadata={"help": f"Size of a fresh model: one of {sorted(MODEL_SIZES)} (default tiny)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "DSLConfig overrides as 'key=value,key=value' (e.g. 'embed_dim=64,dropout=0.1,snr_max=100'); "
            "applied to fresh, loaded and converted models."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the model folder's, else gpt2 with [MASK] = 50257)."}
    )
    add_mask_token: bool = field(
        default=True, metadata={"help": "Append [MASK] as the last id when the tokenizer has none."}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_DEFAULT_TARGETS),
        metadata={
            "help": "Module-name suffixes that get LoRA adapters, space- or comma-separated "
            "(DiT blocks: attn_qkv,attn_out,mlp.0,mlp.2)."
        },
    )
    lora_exclude_modules: list[str] = field(
        default_factory=lambda: list(LORA_DEFAULT_EXCLUDES), metadata={"help": "Module-name suffixes never adapted."}
    )
    lora_modules_to_save: list[str] = field(
        default_factory=list,
        metadata={"help": "Modules trained fully next to the adapters, e.g. token_directions (the DSL directions E)."},
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "Export the final model with the LoRA adapters merged (the adapter is saved too)."}
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default="Skylion007/openwebtext",
        metadata={"help": "Hub dataset id, local .txt/.json/.jsonl file or folder, or 'bbc' (embedded corpus)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per row (default: the model's max_position_embeddings)."}
    )
    packing: str = field(default="wrapped", metadata={"help": "'wrapped' (MDLM's OWT rows) or 'padded'."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set --max_steps)."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Hash-split validation share, in (0, 1)."})
    validation_documents: int | None = field(
        default=None, metadata={"help": "Use the last N documents as validation (OWT default: 100000)."}
    )
    max_documents: int | None = field(default=None, metadata={"help": "At most N documents per split (quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "At most N validation rows."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    data_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})


def parse_config_overrides(overrides: str | dict | None) -> dict:
    """'a=1,b=0.5,c=true' (or a dict from a JSON/YAML config) -> {'a': 1, 'b': 0.5, 'c': True}.

    transformers' `PreTrainedConfig.update_from_string` parses the string (types follow the config's own fields, an
    unknown key is an error); it runs on a default `DSLConfig` and the values are read back, because the overrides
    then go into the model's constructor, where the sizes that depend on them (intermediate_size, the converter's
    mask bias) are derived."""
    from ..modeling_dsl import DSLConfig

    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    if any("=" not in item for item in overrides.split(",")):
        raise ValueError(f"config_overrides={overrides!r} must be 'key=value,key=value' (e.g. 'embed_dim=64,dropout=0.1')")
    probe = DSLConfig()
    try:
        probe.update_from_string(overrides)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"config_overrides={overrides!r}: {error} (keys: DSLConfig's int, float, bool and string fields)"
        ) from error
    return {key.strip(): getattr(probe, key.strip()) for key in (item.split("=", 1)[0] for item in overrides.split(","))}


def parse_arguments(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, DSLTrainingArguments) from the command line or one JSON/YAML file
    (`--deepspeed zero2|zero3` names a packaged config: `DSLTrainingArguments` resolves it)."""
    from transformers import HfArgumentParser

    from .trainer import DSLTrainingArguments

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, DSLTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def _read_json_file(repo_or_path: str, filename: str) -> dict | None:
    from transformers.utils import cached_file

    if os.path.isfile(repo_or_path):
        path = os.path.join(os.path.dirname(repo_or_path), filename)
        path = path if os.path.isfile(path) else None
    else:
        path = cached_file(repo_or_path, filename, _raise_exceptions_for_missing_entries=False)
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def split_names(values: list[str] | str | None) -> list[str]:
    """Module names given as separate values, comma-separated, or both: ["a,b", "c"] -> ["a", "b", "c"]."""
    if not values:
        return []
    values = [values] if isinstance(values, str) else values
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def check_override_names(overrides: dict) -> None:
    """DSLConfig keeps unknown keyword arguments as plain attributes: a misspelled override would be ignored."""
    import dataclasses

    from dsl_diffusion.modeling_dsl import DSLConfig
    from dsl_diffusion.modeling_dsl.configuration_dsl import MDLM_CONFIG_ALIASES

    accepted = {field.name for field in dataclasses.fields(DSLConfig)} | set(MDLM_CONFIG_ALIASES)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"config_overrides names {unknown}, which are not DSLConfig fields (check the spelling); accepted: "
            f"{sorted(name for name in accepted if not name.startswith('_'))}"
        )


def validate_static_arguments(model_args: ModelArguments, data_args: DataArguments, training_args=None) -> None:
    """Checks that need no file: raised before anything is loaded (also normalizes comma-separated name lists)."""
    from .data import PACKING_MODES

    for name in ("lora_target_modules", "lora_exclude_modules", "lora_modules_to_save"):
        setattr(model_args, name, split_names(getattr(model_args, name)))

    if model_args.model_name_or_path and model_args.mdlm_checkpoint:
        raise ValueError(
            f"pass either --model_name_or_path ({model_args.model_name_or_path}) or --mdlm_checkpoint "
            f"({model_args.mdlm_checkpoint}), not both"
        )
    if model_args.model_size is not None and model_args.model_size not in MODEL_SIZES:
        raise ValueError(f"model_size={model_args.model_size!r} is not supported; accepted: {sorted(MODEL_SIZES)}")
    if model_args.model_size is not None and (model_args.model_name_or_path or model_args.mdlm_checkpoint):
        raise ValueError("--model_size only applies to a fresh model (no --model_name_or_path / --mdlm_checkpoint)")
    check_override_names(parse_config_overrides(model_args.config_overrides))
    if model_args.lora_r < 0:
        raise ValueError(f"lora_r={model_args.lora_r} must be >= 0 (0 = no LoRA)")
    if model_args.lora_r > 0:
        if not (math.isfinite(model_args.lora_alpha) and model_args.lora_alpha > 0):
            raise ValueError(f"lora_alpha={model_args.lora_alpha} must be a finite number > 0 (LoRA scales by alpha / r)")
        if not 0.0 <= model_args.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={model_args.lora_dropout} must lie in [0, 1)")
        if not model_args.lora_target_modules:
            raise ValueError("lora_target_modules is empty; name the modules to adapt, e.g. attn_qkv attn_out mlp.0 mlp.2")
    if training_args is not None and training_args.push_to_hub:
        repo_id = training_args.hub_model_id
        if not repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"--push_to_hub needs --hub_model_id as `namespace/name`, got {repo_id!r}")
    if data_args.packing not in PACKING_MODES:
        raise ValueError(f"packing={data_args.packing!r} is not supported; accepted: {PACKING_MODES}")
    if data_args.block_size is not None and data_args.block_size < 3:
        raise ValueError(f"block_size={data_args.block_size} must be >= 3 (BOS, at least one token, EOS)")
    if not 0.0 < data_args.validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={data_args.validation_fraction} must lie in (0, 1)")
    for name in ("max_documents", "max_eval_samples", "validation_documents"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be a positive number of rows/documents (or unset)")


def resolve_resume_checkpoint(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names ("last"/"true": the last complete one of
    ``output_dir``), checked complete now rather than after the data is loaded."""
    from .trainer import CHECKPOINT_COMPLETE_NAME, get_last_complete_checkpoint, is_checkpoint_complete

    if not resume or resume.lower() in ("false", "none"):
        return None
    if resume.lower() in ("true", "last"):
        last = get_last_complete_checkpoint(output_dir)
        if last is None:
            raise ValueError(
                f"--resume_from_checkpoint {resume}: {output_dir} has no complete checkpoint-N folder (one with "
                f"{CHECKPOINT_COMPLETE_NAME}); drop the flag to start afresh, or point --output_dir at the earlier run."
            )
        return last
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume} is not an existing checkpoint folder.")
    if not is_checkpoint_complete(resume):
        raise ValueError(
            f"--resume_from_checkpoint {resume} has no {CHECKPOINT_COMPLETE_NAME} marker: the run that wrote it was "
            "interrupted while saving, so it may be incomplete. Resume from an earlier complete checkpoint, or use "
            "'--resume_from_checkpoint last' to pick the last complete one."
        )
    return resume


def peek_model_limits(model_args: ModelArguments) -> dict:
    """vocab_size, mask_token_id and max_position_embeddings of the model to be trained, from config files only."""
    from dsl_diffusion.modeling_dsl.modeling_dsl import check_checkpoint_files

    for checkpoint in (model_args.model_name_or_path, model_args.mdlm_checkpoint):
        if checkpoint:
            check_checkpoint_files(checkpoint)
    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.model_name_or_path:
        config = _read_json_file(model_args.model_name_or_path, "config.json")
        if config is None:
            raise ValueError(f"{model_args.model_name_or_path} has no config.json: is it a saved DSL model?")
        limits = {
            "vocab_size": config["vocab_size"],
            "mask_token_id": config.get("mask_token_id", config["vocab_size"]),
            "max_position_embeddings": config.get("max_position_embeddings", 1024),
        }
    elif model_args.mdlm_checkpoint:
        # MDLM counts [MASK] in its vocabulary; without a config.json, from_mdlm reads the sizes from the weights.
        config = _read_json_file(model_args.mdlm_checkpoint, "config.json") or {}
        vocab_size = config.get("vocab_size", 50258) - 1
        limits = {
            "vocab_size": vocab_size,
            "mask_token_id": vocab_size,
            "max_position_embeddings": config.get("model_length", 1024),
        }
    else:
        limits = {"vocab_size": None, "mask_token_id": None, "max_position_embeddings": None}
    limits.update({key: overrides[key] for key in limits if key in overrides})
    return limits


def load_and_check_tokenizer(model_args: ModelArguments, limits: dict):
    """The tokenizer, checked against the model: [MASK] must exist and be the model's mask id (the last id)."""
    from transformers import AutoTokenizer

    from dsl_diffusion.modeling_dsl.modeling_dsl import check_checkpoint_files

    from .tokenization import add_mask_token, load_tokenizer

    name = model_args.tokenizer_name
    if name is None and model_args.model_name_or_path and _read_json_file(
        model_args.model_name_or_path, "tokenizer_config.json"
    ):
        name = model_args.model_name_or_path
    name = name or "gpt2"
    check_checkpoint_files(name)  # a missing local tokenizer folder is named as such, not as a bad Hub repo id
    if model_args.add_mask_token:
        tokenizer = load_tokenizer(name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.mask_token_id is None:
            raise ValueError(
                f"the tokenizer {name!r} has no mask token; masked diffusion needs [MASK] as its last id "
                f"(accepted: a tokenizer with mask_token_id == len(tokenizer) - 1; drop --add_mask_token False to "
                "append one)"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        add_mask_token(tokenizer)  # checks that [MASK] is the last id and differs from pad
    if limits["mask_token_id"] is not None and tokenizer.mask_token_id != limits["mask_token_id"]:
        raise ValueError(
            f"the tokenizer's [MASK] id is {tokenizer.mask_token_id} but the model's mask_token_id is "
            f"{limits['mask_token_id']} (vocab_size {limits['vocab_size']}); use the model's tokenizer "
            "(accepted: the same vocabulary with [MASK] as id vocab_size)"
        )
    return tokenizer


def resolve_block_size(data_args: DataArguments, limits: dict) -> int:
    max_positions = limits["max_position_embeddings"]
    block_size = data_args.block_size or max_positions or 1024
    if max_positions is not None and block_size > max_positions:
        raise ValueError(
            f"block_size={block_size} exceeds the model's max_position_embeddings={max_positions}; "
            f"accepted: 3 <= block_size <= {max_positions}"
        )
    return block_size


def preview_model_config(model_args: ModelArguments, tokenizer, block_size: int, limits: dict):
    """The config the model will get, built from config files only, so that bad override values (snr_max=nan,
    embed_dim=0, ...) fail before the data is loaded. A converted MDLM model takes its sizes from the weights later:
    here they are the defaults, which is enough to check the values of the overrides."""
    from dsl_diffusion.modeling_dsl import DSLConfig

    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.model_name_or_path:
        return DSLConfig.from_pretrained(model_args.model_name_or_path, **overrides)
    if model_args.mdlm_checkpoint:
        vocabulary = {"vocab_size": limits["vocab_size"], "mask_token_id": limits["mask_token_id"]}
        return DSLConfig(**{**vocabulary, "max_position_embeddings": block_size, **overrides})
    return fresh_model_config(model_args, tokenizer, block_size)


def fresh_model_config(model_args: ModelArguments, tokenizer, block_size: int):
    from dsl_diffusion.modeling_dsl import DSLConfig

    overrides = parse_config_overrides(model_args.config_overrides)
    num_real_tokens = tokenizer.mask_token_id
    sizes = dict(MODEL_SIZES[model_args.model_size or "tiny"])
    return DSLConfig(
        **{
            **sizes,
            "vocab_size": num_real_tokens,
            "mask_token_id": num_real_tokens,
            "max_position_embeddings": block_size,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **overrides,
        }
    )


def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.model_name_or_path:
        return DSLForMaskedDiffusion.from_pretrained(model_args.model_name_or_path, **overrides)
    if model_args.mdlm_checkpoint:
        return DSLForMaskedDiffusion.from_mdlm(model_args.mdlm_checkpoint, **overrides)
    # _from_config honours DeepSpeed ZeRO-3 (the model is created partitioned).
    return DSLForMaskedDiffusion._from_config(fresh_model_config(model_args, tokenizer, block_size))


def apply_lora(model, model_args: ModelArguments):
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(model_args.lora_target_modules),
        exclude_modules=list(model_args.lora_exclude_modules) or None,
        modules_to_save=list(model_args.lora_modules_to_save) or None,
        bias="none",
    )
    model = get_peft_model(model, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable parameters of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    return model


def save_final_model(trainer, model_args: ModelArguments, tokenizer, output_dir: str) -> None:
    """save_pretrained (safetensors) of the final model, EMA weights and merged LoRA adapters as configured."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    args = trainer.args
    use_ema = args.ema_export and trainer.ema is not None
    with trainer.ema_applied() if use_ema else contextlib.nullcontext():
        if model_args.lora_r > 0 and model_args.merge_lora and not is_deepspeed_zero3_enabled():
            if args.should_save:
                trainer.model.save_pretrained(os.path.join(output_dir, "adapter"))
                merged = copy.deepcopy(trainer.model).merge_and_unload()
                merged.save_pretrained(output_dir)
                tokenizer.save_pretrained(output_dir)
        else:
            if model_args.lora_r > 0 and model_args.merge_lora:
                logger.warning("ZeRO-3 partitions the weights: saving the LoRA adapter only (merge it after training).")
            trainer.save_model(output_dir)
    if args.should_save:
        with open(os.path.join(output_dir, "dsl_training.json"), "w", encoding="utf-8") as f:
            json.dump({"ema_weights": use_ema, "objective": args.objective, "global_step": trainer.state.global_step}, f)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: the command line), validate, train, evaluate and save; returns the final metrics."""
    import datasets
    import transformers
    from transformers import set_seed

    from .data import DiffusionDataCollator, build_datasets
    from .trainer import DSLTrainer

    model_args, data_args, training_args = parse_arguments(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("dsl_diffusion").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    # Validate everything before loading data or weights.
    validate_static_arguments(model_args, data_args, training_args)
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    limits = peek_model_limits(model_args)
    tokenizer = load_and_check_tokenizer(model_args, limits)
    block_size = resolve_block_size(data_args, limits)
    preview_model_config(model_args, tokenizer, block_size, limits)
    logger.info("Objective %s, block size %d, output %s", training_args.objective, block_size, training_args.output_dir)

    set_seed(training_args.seed)
    with training_args.main_process_first(desc="dataset preprocessing"):
        splits = build_datasets(
            data_args.dataset,
            tokenizer,
            block_size,
            packing=data_args.packing,
            text_column=data_args.text_column,
            num_proc=data_args.preprocessing_num_workers,
            streaming=data_args.streaming,
            validation_fraction=data_args.validation_fraction,
            seed=training_args.data_seed if training_args.data_seed is not None else 0,
            validation_documents=data_args.validation_documents,
            max_documents=data_args.max_documents,
            cache_dir=data_args.data_cache_dir,
        )
    eval_dataset = splits["validation"]
    if data_args.max_eval_samples is not None:
        eval_dataset = (
            eval_dataset.take(data_args.max_eval_samples)
            if isinstance(eval_dataset, datasets.IterableDataset)
            else eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
        )

    model = build_model(model_args, tokenizer, block_size)
    if block_size > model.config.max_position_embeddings:
        raise ValueError(
            f"block_size={block_size} exceeds the model's max_position_embeddings={model.config.max_position_embeddings}"
        )
    if model_args.lora_r > 0:
        model = apply_lora(model, model_args)

    # The Trainer's own push uploads the output folder as it is (and skips the merged-LoRA export); the repository is
    # published once at the end by the same code as dsl-push instead (publish_to_hub), so the Trainer must not push.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    trainer = DSLTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=eval_dataset,
        data_collator=DiffusionDataCollator(),
        processing_class=tokenizer,
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    if training_args.do_eval or training_args.eval_strategy != "no":
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    save_final_model(trainer, model_args, tokenizer, training_args.output_dir)
    logger.info("Saved the final model to %s", training_args.output_dir)
    if push_to_hub and training_args.should_save:
        publish_to_hub(training_args)
    return metrics


def publish_to_hub(training_args) -> None:
    """Upload the saved model exactly as ``dsl-push --model_path <output_dir> --repo_id <hub_model_id>`` would: the
    same folder (model, tokenizer, remote code, generation config, custom pipeline, card with the training record)
    built by the same function, whichever way the model was saved (full, EMA or merged LoRA)."""
    import tempfile

    from ..hub_cards.push import PushArguments, prepare_upload_folder, upload_to_hub

    with tempfile.TemporaryDirectory() as staging:
        arguments = PushArguments(
            model_path=training_args.output_dir,
            repo_id=training_args.hub_model_id,
            output_dir=os.path.join(staging, "repository"),
            private=bool(training_args.hub_private_repo),
            token=training_args.hub_token,
        )
        folder = prepare_upload_folder(arguments)
        commit = upload_to_hub(folder, arguments.repo_id, token=arguments.token, private=arguments.private,
                               commit_message="Upload DSL model with dsl-finetune")  # fmt: skip
    logger.info("Pushed %s to %s (%s)", training_args.output_dir, arguments.repo_id, commit.commit_url)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``dsl-finetune`` (console scripts pass main's return value to ``sys.exit``: return None)."""
    run(argv)


if __name__ == "__main__":
    main()
