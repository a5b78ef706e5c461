"""Where a DSL model's gradient norm comes from: the gradient norm of each parameter group (E, beta, b, the value
table W, the rest of the backbone) under the DSL objective (mixture and log-normal paths) and the MDLM NELBO, on one
batch of fresh law samples. The known-law DSL arm's logged norms grow to 60-100 while MDLM's stay near 1; this shows
which parameters carry them.

    python -m benchmarks.known_law.grad_norms MODEL_DIR [MODEL_DIR ...] --output grad_norms.json
"""

import argparse
import json

import torch

from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion
from dsl_diffusion.trainer.corruption import build_snr_path
from dsl_diffusion.trainer.losses import dsl_loss, mdlm_loss

from .law import HMMLawConfig, LawSampleStream, build_law

PARAMETER_GROUPS = {
    "E": "token_directions",
    "beta": "converter_beta",
    "b": "converter_bias",
    "W": "backbone.vocab_embed",
}


def group_norms(model, loss) -> dict[str, float]:
    model.zero_grad()
    loss.backward()
    squares: dict[str, float] = {}
    for name, param in model.named_parameters():
        group = next((key for key, prefix in PARAMETER_GROUPS.items() if name.startswith(prefix)), "backbone (rest)")
        squares[group] = squares.get(group, 0.0) + float(param.grad.double().norm() ** 2)
    squares["total"] = sum(squares.values())
    return {group: value**0.5 for group, value in squares.items()}


def measure(model_dir: str, rows: torch.LongTensor) -> dict:
    model = DSLForMaskedDiffusion.from_pretrained(model_dir)
    model.config.endpoint_inputs = "converter"  # what the DSL objective's ROAR rows and the samplers show it
    record = {
        "converter_beta": float(model.converter_beta),
        "mask_slot_weight_at_z0": float(model.converter_bias.softmax(-1)[model.config.mask_token_id]),
    }
    for path in ("mixture", "lognormal"):
        loss = dsl_loss(model, rows, None, build_snr_path(path), generator=torch.Generator().manual_seed(0)).loss
        record[f"dsl_{path}"] = group_norms(model, loss)
    record["mdlm"] = group_norms(model, mdlm_loss(model, rows, None, generator=torch.Generator().manual_seed(0)).loss)
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dirs", nargs="+")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    law = build_law(HMMLawConfig())
    stream = iter(LawSampleStream(law, args.length, seed=7))
    rows = torch.stack([torch.as_tensor(next(stream)["input_ids"]) for _ in range(args.batch_size)])
    report = {model_dir: measure(model_dir, rows) for model_dir in args.model_dirs}
    print(json.dumps(report, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
