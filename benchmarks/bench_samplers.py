"""Sampler speed benchmark (not a test): wall time per network call (NFE) and tokens/s for every sampler, and the
NFE saved by MDLM's output cache.

    python benchmarks/bench_samplers.py --quick            # CPU, a few minutes
    python benchmarks/bench_samplers.py --device cuda --steps 32

Shapes (random weights, vocabulary 50257 as GPT-2, batch 1): "mdlm-small" = the public MDLM checkpoint (hidden 768,
12 layers, 12 heads, L = 1024, ~170M parameters) and "small" (hidden 256, 4 layers, 4 heads). Each sampler runs a
few steps only; "forward_s" is one bare network call, so s_per_nfe - forward_s is the sampler's own overhead per call
(categorical draws in float64 over the vocabulary, nucleus sort, bookkeeping). ROAR fills one position per call: it
is timed on `steps` masked positions inside an otherwise fixed sequence.

The cache experiment counts real calls of MDLM / ReMDM at L = 1024 with and without the cache for growing T, using
a free stand-in network (uniform logits over 16 tokens): MDLM's unmasking decisions do not depend on the logits, so
its call count is the one a real model would make. The cache acts with full logits (`logits_where_needed=False`);
the default (`logits_where_needed=True`) calls only in the steps that unmask a position ("nfe_where_needed").
"""

import argparse
import json
import os
import platform
import time
from types import SimpleNamespace

import torch
from torch import nn

from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion
from dsl_diffusion.pipelines.samplers import get_sampler

SHAPES = {
    "mdlm-small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4),
}
SAMPLERS = {  # name -> (sampler name, knobs)
    "mdlm": ("mdlm", {}),
    "remdm-cap": ("remdm", {"strategy": "cap"}),
    "remdm-conf": ("remdm", {"strategy": "conf"}),
    "remdm-loop": ("remdm", {"strategy": "loop"}),
    "dsl-sde": ("dsl-sde", {}),
    "hybrid": ("hybrid", {}),
    "roar": ("roar", {}),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: str, seq_len: int, device, dtype):
    torch.manual_seed(0)
    config = DSLConfig(vocab_size=50257, max_position_embeddings=seq_len, **SHAPES[shape])
    return DSLForMaskedDiffusion(config).to(device=device, dtype=dtype).eval()


def time_forward(model, seq_len, device, repeats=2) -> float:
    input_ids = torch.full((1, seq_len), model.config.mask_token_id, device=device)
    with torch.no_grad():
        model(input_ids=input_ids)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=input_ids)
        synchronize(device)
    return (time.perf_counter() - start) / repeats


def time_sampler(model, name, steps, seq_len, top_p, device) -> dict:
    sampler_name, knobs = SAMPLERS[name]
    mask = model.config.mask_token_id
    generator = torch.Generator(device=device).manual_seed(0)
    if sampler_name == "roar":
        sampler = get_sampler("roar", top_p=top_p)
        input_ids = torch.randint(0, mask, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
        input_ids[0, :steps] = mask  # `steps` positions to fill: NFE = steps
        run_inputs = dict(input_ids=input_ids)
        generated = steps
    else:
        if sampler_name == "hybrid":
            knobs = {**knobs, "num_steps": max(steps, 2)}
        else:
            knobs = {**knobs, "num_steps": steps}
        if sampler_name != "dsl-sde":
            knobs["top_p"] = top_p
        sampler = get_sampler(sampler_name, **knobs)
        run_inputs = dict(batch_size=1, seq_len=seq_len)
        generated = seq_len
    synchronize(device)
    start = time.perf_counter()
    output = sampler.run(model, generator=generator, progress_bar=False, **run_inputs)
    synchronize(device)
    wall = time.perf_counter() - start
    return {
        "steps": knobs.get("num_steps", steps),
        "nfe": output.nfe,
        "wall_s": round(wall, 3),
        "s_per_nfe": round(wall / output.nfe, 4),
        "tokens_per_s": round(generated / wall, 2),
        "generated_tokens": generated,
    }


class UniformLogits(nn.Module):
    """A free stand-in network with the model interface: uniform logits over 16 tokens."""

    def __init__(self, seq_len):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=16, max_position_embeddings=seq_len, time_conditioning=False)
        self.eval()

    def forward(self, input_ids=None, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 16))


def cache_savings(seq_len, step_counts) -> list[dict]:
    model = UniformLogits(seq_len)
    rows = []
    for name, knobs in (("mdlm", {}), ("remdm-cap", {"strategy": "cap"}), ("remdm-loop", {"strategy": "loop"})):
        sampler_name = "mdlm" if name == "mdlm" else "remdm"
        for steps in step_counts:
            nfe = {}
            for setting, setting_knobs in (("cached", dict(use_cache=True, logits_where_needed=False)),
                                           ("uncached", dict(use_cache=False, logits_where_needed=False)),
                                           ("where_needed", {})):  # fmt: skip
                sampler = get_sampler(sampler_name, num_steps=steps, **setting_knobs, **knobs)
                output = sampler.run(model, batch_size=1, seq_len=seq_len, generator=torch.Generator().manual_seed(0), progress_bar=False)
                nfe[setting] = output.nfe
            rows.append(
                {"sampler": name, "seq_len": seq_len, "steps": steps, "nfe_cached": nfe["cached"],
                 "nfe_uncached": nfe["uncached"], "saved_fraction": round(1 - nfe["cached"] / nfe["uncached"], 4),
                 "nfe_where_needed": nfe["where_needed"]}
            )  # fmt: skip
            print(f"  cache {name:10s} L={seq_len} T={steps:5d}: NFE {nfe['cached']:5d} with cache vs {nfe['uncached']:5d} "
                  f"({rows[-1]['saved_fraction']:.1%} saved); {nfe['where_needed']:5d} with logits where needed")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 steps on mdlm-small, 4 on small, short cache sweep")
    parser.add_argument("--steps", type=int, default=None, help="steps per sampler (default: 2 quick, 8 otherwise)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (the published setting)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "samplers.json"))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    results = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "top_p": args.top_p,
        "batch_size": 1,
        "shapes": {},
    }
    for shape in args.shapes:
        steps = args.steps or ((2 if shape == "mdlm-small" else 4) if args.quick else 8)
        model = build_model(shape, args.seq_len, device, dtype)
        forward_s = time_forward(model, args.seq_len, device, repeats=1 if args.quick else 3)
        entry = {
            "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "forward_s": round(forward_s, 4),
            "samplers": {},
        }
        print(f"{shape}: {entry['parameters_millions']}M parameters, one forward at L={args.seq_len}: {forward_s:.3f}s")
        for name in args.samplers:
            timing = time_sampler(model, name, steps, args.seq_len, args.top_p, device)
            timing["overhead_s_per_nfe"] = round(timing["s_per_nfe"] - forward_s, 4)
            entry["samplers"][name] = timing
            print(
                f"  {name:10s} T={timing['steps']:3d} NFE={timing['nfe']:3d} {timing['wall_s']:8.2f}s "
                f"{timing['s_per_nfe']:.3f} s/NFE (overhead {timing['overhead_s_per_nfe']:+.3f}) "
                f"{timing['tokens_per_s']:.1f} tokens/s"
            )
        results["shapes"][shape] = entry
        del model

    step_counts = [128, 512, 1024, 4096] if args.quick else [128, 256, 512, 1024, 2048, 4096]
    results["cache"] = cache_savings(args.seq_len, step_counts)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
