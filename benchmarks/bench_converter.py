"""The converter, before and after its fused form, in one process: the plain formula of METHOD.md
(softmax(beta [<z, E>, 0] + b) W with the padded [N, V + 1] scores) against `convert_noisy_states`, alone and inside
the whole continuous forward pass, with and without autograd. Prints a table and writes JSON
(default benchmarks/results/converter.json).

    python benchmarks/bench_converter.py            # MDLM-small shape, L = 1024, batch 1
    python benchmarks/bench_converter.py --quick
"""

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion


def plain_converter(model, noisy_states):
    scores = model.converter_beta * (noisy_states @ model.token_directions().T)
    slot_probs = (F.pad(scores, (0, 1)) + model.converter_bias).softmax(dim=-1)
    return slot_probs @ model.backbone.vocab_embed.embedding


def seconds(function, repeats: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one timed repeat per cell")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "converter.json"))
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    config = DSLConfig(vocab_size=50257, embed_dim=64, max_position_embeddings=args.length, dropout=0.0)  # MDLM-small
    model = DSLForMaskedDiffusion(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.length))
    z = model.noisy_states(ids, 14.7).detach()
    fused_forward = model.convert_noisy_states

    def forward_with(converter, grad: bool):
        model.convert_noisy_states = converter
        try:
            with torch.set_grad_enabled(grad):
                output = model(noisy_states=z.requires_grad_(grad)).logits
                if grad:
                    output.float().square().mean().backward()
        finally:
            model.convert_noisy_states = fused_forward

    plain = lambda states: plain_converter(model, states)  # noqa: E731
    rows = {}
    for name, grad in (("inference", False), ("training (forward + backward)", True)):
        for part, make in (("converter", None), ("continuous forward", forward_with)):
            if make is None:
                def run(converter, grad=grad):
                    with torch.set_grad_enabled(grad):
                        out = converter(z.requires_grad_(grad))
                        if grad:
                            out.square().mean().backward()
                before, after = seconds(lambda: run(plain), repeats), seconds(lambda: run(fused_forward), repeats)
            else:
                before = seconds(lambda: make(plain, grad), repeats)
                after = seconds(lambda: make(fused_forward, grad), repeats)
            rows[f"{part}, {name}"] = {"plain_s": before, "fused_s": after, "speedup": before / after}
    print(f"{'cell':<48} {'plain s':>9} {'fused s':>9} {'ratio':>7}")
    for cell, row in rows.items():
        print(f"{cell:<48} {row['plain_s']:9.3f} {row['fused_s']:9.3f} {row['speedup']:6.2f}x")
    report = {
        "shape": {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                  "embed_dim": config.embed_dim, "length": args.length, "batch": 1},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "repeats": repeats, "cells": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
