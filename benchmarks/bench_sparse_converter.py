"""What the opt-in sparse converter (`config.converter_top_k`) does to a trained DSL model, per SNR: the exact slot
mass the top k keep, the relative change of the converter's output h, and the change of the network's output
distribution (KL from the exact one, and how often its argmax moves). Prints a table, writes JSON.

    python benchmarks/bench_sparse_converter.py --model_dir outputs/demo/arm-dsl \\
        --corpus bbc --top_k 16 64 256     # make demo's DSL arm (its folder holds the tokenizer)

Random weights say nothing here (their outputs barely depend on the input), so this needs a DSL-trained model; the
time of the sparse converter is in `bench_speed.py`.
"""

import argparse
import contextlib
import os

import torch
from transformers import AutoTokenizer

from dsl_diffusion.evaluation.utils import atomic_write_json
from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@contextlib.contextmanager
def with_top_k(model, top_k: int | None):
    """`model.config.converter_top_k = top_k` inside the block (None = the exact converter)."""
    previous, model.config.converter_top_k = model.config.converter_top_k, top_k
    try:
        yield model
    finally:
        model.config.converter_top_k = previous


def exact_slot_probs(model, noisy_states: torch.Tensor) -> torch.Tensor:
    """The exact converter's slot probabilities `[N, V + 1]` (the V tokens, then `[MASK]`)."""
    flat = noisy_states.reshape(-1, noisy_states.shape[-1]).float()
    scores = model.converter_beta.float() * flat @ model.token_directions().float().T + model.converter_bias[:-1].float()
    return torch.cat([scores, model.converter_bias[-1:].float().expand(len(flat), 1)], dim=-1).softmax(dim=-1)


def validation_ids(tokenizer, corpus: str, length: int, rows: int) -> torch.Tensor:
    """`[rows, length]` token ids of the corpus's validation split, wrapped as in training."""
    from dsl_diffusion.trainer.data import load_text_dataset, pack_wrapped, tokenize_dataset

    split = load_text_dataset(corpus, seed=0)["validation"]
    packed = pack_wrapped(tokenize_dataset(split, tokenizer), length, tokenizer).with_format("torch")
    return packed[:rows]["input_ids"]


@torch.inference_mode()
def drift(model, input_ids: torch.Tensor, top_ks, snrs, seed: int = 0, outputs: bool = True) -> dict:
    """Per SNR and k: the exact slot mass the top k keep and the relative change of h; with `outputs`, also the KL
    of the network's output distribution from the exact one and how often its argmax moves."""
    rows = {}
    for snr in snrs:
        z = model.noisy_states(input_ids, snr, generator=torch.Generator(input_ids.device).manual_seed(seed))
        slot_probs = exact_slot_probs(model, z)
        exact_hidden = model.convert_noisy_states(z).float()
        if outputs:
            exact_log_probs = model(noisy_states=z).logits.float().log_softmax(dim=-1)
        for top_k in top_ks:
            with with_top_k(model, top_k):
                sparse_hidden = model.convert_noisy_states(z).float()
                if outputs:
                    sparse_log_probs = model(noisy_states=z).logits.float().log_softmax(dim=-1)
            kept_mass = slot_probs[:, -1] + slot_probs[:, :-1].topk(top_k, dim=-1).values.sum(dim=-1)
            row = rows[f"snr_{snr:g}_top_{top_k}"] = {
                "snr": snr, "top_k": top_k,
                "kept_mass_mean": float(kept_mass.mean()), "kept_mass_min": float(kept_mass.min()),
                "hidden_relative_change": float((sparse_hidden - exact_hidden).norm() / exact_hidden.norm()),
            }
            if outputs:
                kl = (exact_log_probs.exp() * (exact_log_probs - sparse_log_probs)).sum(dim=-1)
                row.update({
                    "output_kl_mean": float(kl.mean()), "output_kl_max": float(kl.max()),
                    "argmax_changed": float((sparse_log_probs.argmax(-1) != exact_log_probs.argmax(-1)).float().mean()),
                })
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a DSL-trained model (save_pretrained folder)")
    parser.add_argument("--tokenizer", help="default: --model_dir")
    parser.add_argument("--corpus", default="bbc", help="an embedded corpus name or local text files")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--top_k", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--snrs", type=float, nargs="+", default=[0.5, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0])
    parser.add_argument("--output", default=os.path.join(RESULTS, "sparse_converter.json"))
    args = parser.parse_args(argv)
    model = DSLForMaskedDiffusion.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    if any(k >= model.config.vocab_size for k in args.top_k):
        parser.error(f"--top_k {args.top_k}: each must be < the model's vocab_size {model.config.vocab_size}.")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model_dir)
    input_ids = validation_ids(tokenizer, args.corpus, model.config.max_position_embeddings, args.rows)
    rows = drift(model, input_ids, args.top_k, args.snrs)
    print(f"{'SNR':>6} {'top k':>6} {'kept mass (mean / min)':>24} {'h change':>9} {'KL mean / max':>18} {'argmax moved':>13}")
    for row in rows.values():
        print(f"{row['snr']:6g} {row['top_k']:6d} {row['kept_mass_mean']:11.4f} / {row['kept_mass_min']:.4f} "
              f"{row['hidden_relative_change']:9.4f} {row['output_kl_mean']:8.5f} / {row['output_kl_max']:.4f} "
              f"{row['argmax_changed']:13.4f}")
    report = {"model_dir": args.model_dir, "vocab_size": model.config.vocab_size, "beta": float(model.converter_beta.detach()),
              "corpus": args.corpus, "rows": int(input_ids.shape[0]), "length": int(input_ids.shape[1]), "drift": rows}
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
