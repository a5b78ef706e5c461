"""`dsl-convert-mdlm`: turn an MDLM checkpoint into a DSL model folder (weights, remote code, tokenizer).

    dsl-convert-mdlm --mdlm_checkpoint kuleshov-group/mdlm-owt --output_dir mdlm-owt-dsl

The folder then loads anywhere with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.
"""

import logging
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from .modeling_dsl import DSLForMaskedDiffusion

logger = logging.getLogger(__name__)


@dataclass
class ConvertArguments:
    mdlm_checkpoint: str = field(
        default="kuleshov-group/mdlm-owt",
        metadata={"help": "Hub repo id, local folder (config.json + model.safetensors) or weights file of an MDLM model."},
    )
    output_dir: str = field(default="mdlm-owt-dsl", metadata={"help": "Where to write the DSL model folder."})
    tokenizer: str | None = field(
        default="gpt2",
        metadata={"help": "Tokenizer to save beside the model ([MASK] is added last); 'none' to skip."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the MDLM checkpoint."})
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Head count, only needed when the checkpoint has no config.json."}
    )
    embed_dim: int = field(default=64, metadata={"help": "Dimension d of the noisy states and token directions."})
    snr_max: float = field(default=100.0, metadata={"help": "SNR standing for a clean token (s_max)."})
    snr_conditioning: str = field(default="none", metadata={"help": "'none' (default) or 'norm'."})
    dtype: str = field(default="float32", metadata={"help": "Saved dtype: float32 or bfloat16."})
    seed: int = field(default=0, metadata={"help": "Seed of the new DSL parameters' initialization."})


def convert(args: ConvertArguments) -> DSLForMaskedDiffusion:
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={args.dtype!r} is not supported; accepted: 'float32', 'bfloat16'.")
    torch.manual_seed(args.seed)
    model = DSLForMaskedDiffusion.from_mdlm(
        args.mdlm_checkpoint,
        num_attention_heads=args.num_attention_heads,
        revision=args.revision,
        dtype=getattr(torch, args.dtype),
        embed_dim=args.embed_dim,
        snr_max=args.snr_max,
        snr_conditioning=args.snr_conditioning,
    )
    tokenizer = None
    if args.tokenizer and args.tokenizer.lower() != "none":
        from ..trainer.tokenization import load_tokenizer  # not remote code: the library's own helper

        tokenizer = load_tokenizer(args.tokenizer)
        # Checked before anything is written: a mismatch must not leave a model folder without its tokenizer.
        if len(tokenizer) != model.config.vocab_size + 1:
            raise ValueError(
                f"tokenizer {args.tokenizer!r} has {len(tokenizer)} ids but the model expects "
                f"{model.config.vocab_size + 1} (vocab_size + [MASK]); pass the checkpoint's own tokenizer, or "
                "--tokenizer none to convert without one."
            )
    model.save_pretrained(args.output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output_dir)
    logger.info("wrote %s (%.1fM parameters)", args.output_dir, model.num_parameters() / 1e6)
    return model


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (args,) = HfArgumentParser(ConvertArguments).parse_args_into_dataclasses(args=argv)
    convert(args)


if __name__ == "__main__":
    main()
