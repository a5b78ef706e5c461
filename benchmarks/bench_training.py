"""Training throughput and peak memory on CPU: the MDLM objective vs the DSL objective.

A training step is the loss of :mod:`dsl_diffusion.trainer.losses` (``mdlm_loss``, or ``dsl_loss`` on the default
mixture path), ``backward`` and a torch AdamW step, in fp32 with dropout 0.1, as the trainer runs it.

* Each (shape, objective) cell runs in a fresh subprocess, so its peak resident memory is its own.
* The DSL overhead is measured in ONE more subprocess per shape that alternates MDLM and DSL steps on the same model,
  so that load from other processes on a shared CPU hits both objectives alike; it is the ratio of the median
  step times.

Prints a table and writes JSON (default benchmarks/results/training.json; the rows of shapes not measured in
this invocation are kept). On a shared CPU the per-cell times vary with the load; the interleaved ratio does not.

    python benchmarks/bench_training.py            # a small shape and MDLM-small (L = 1024, batch 1), 3 steps
    python benchmarks/bench_training.py --quick    # 1 timed step per cell (after one warm-up step)
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    # The public MDLM OpenWebText backbone (169.6M parameters) at its training length, GPT-2 vocabulary.
    "mdlm-small": dict(vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128,
                       max_position_embeddings=1024, embed_dim=64, length=1024, batch=1),
    # A CPU-sized model with the GPT-2 vocabulary (the converter's softmax over |V| + 1 slots is DSL's extra cost).
    "small": dict(vocab_size=50257, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, cond_dim=64,
                  max_position_embeddings=128, embed_dim=64, length=128, batch=4),
}
OBJECTIVES = ("mdlm", "dsl")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(shape: str):
    import torch

    from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion

    spec = dict(SHAPES[shape])
    length, batch = spec.pop("length"), spec.pop("batch")
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(DSLConfig(dropout=0.1, **spec)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    input_ids = torch.randint(0, spec["vocab_size"], (batch, length))
    return model, optimizer, input_ids


def training_step(objective: str, model, optimizer, input_ids, snr_path) -> float:
    """One optimizer step; returns its wall time in seconds."""
    from dsl_diffusion.trainer.losses import dsl_loss, mdlm_loss

    start = time.perf_counter()
    if objective == "mdlm":
        out = mdlm_loss(model, input_ids, None)
    else:
        out = dsl_loss(model, input_ids, None, snr_path)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def worker(shape: str, objectives: list[str], steps: int) -> dict:
    import torch

    from dsl_diffusion.trainer.corruption import build_snr_path

    rss_before_model = peak_rss_mib()
    model, optimizer, input_ids = build(shape)
    snr_path = build_snr_path("mixture")
    times = {objective: [] for objective in objectives}
    for objective in objectives:  # warm-up (also allocates the AdamW state)
        training_step(objective, model, optimizer, input_ids, snr_path)
    for _ in range(steps):
        for objective in objectives:
            times[objective].append(training_step(objective, model, optimizer, input_ids, snr_path))
    tokens = input_ids.numel()
    return {
        "shape": shape,
        "batch": input_ids.shape[0],
        "length": input_ids.shape[1],
        "parameters_m": round(model.num_parameters() / 1e6, 2),
        "steps_timed": steps,
        "seconds_per_step": {objective: statistics.median(values) for objective, values in times.items()},
        "tokens_per_s": {objective: tokens / statistics.median(values) for objective, values in times.items()},
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_mib_over_start": round(peak_rss_mib() - rss_before_model, 1),
        "threads": torch.get_num_threads(),
    }


def run_worker(shape: str, objectives: list[str], steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", shape, ",".join(objectives), "--steps", str(steps)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell (after one warm-up step)")
    parser.add_argument("--quick", action="store_true", help="one timed step per cell")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "training.json"))
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "OBJECTIVES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 1 if args.quick else args.steps

    if args.worker:
        shape, objectives = args.worker
        print(json.dumps(worker(shape, objectives.split(","), steps)))
        return

    cells, overheads = [], []
    for shape in args.shapes:
        for objective in OBJECTIVES:
            row = run_worker(shape, [objective], steps)
            cells.append(
                {
                    "shape": shape, "objective": objective, "batch": row["batch"], "length": row["length"],
                    "parameters_m": row["parameters_m"], "seconds_per_step": row["seconds_per_step"][objective],
                    "tokens_per_s": row["tokens_per_s"][objective], "peak_rss_mib": row["peak_rss_mib"],
                    "peak_rss_mib_over_start": row["peak_rss_mib_over_start"], "threads": row["threads"],
                }
            )
            print(
                f"{shape:>10s} {objective:>4s}  {row['seconds_per_step'][objective]:8.2f} s/step  "
                f"{row['tokens_per_s'][objective]:9.1f} tok/s  peak RSS {row['peak_rss_mib']:8.0f} MiB",
                flush=True,
            )
        interleaved = run_worker(shape, list(OBJECTIVES), steps)
        ratio = interleaved["seconds_per_step"]["dsl"] / interleaved["seconds_per_step"]["mdlm"]
        overheads.append({"shape": shape, "dsl_over_mdlm_step_time": ratio, **interleaved})
        print(f"{shape:>10s} DSL / MDLM step time, interleaved in one run: {ratio:.3f}", flush=True)

    for cell in cells + overheads:
        cell["steps_timed"] = steps
    # Keep the results of shapes not measured in this invocation (e.g. `--shapes small` re-run on a quieter CPU).
    if os.path.isfile(args.output):
        with open(args.output) as f:
            previous = json.load(f)
        cells = [cell for cell in previous.get("cells", []) if cell["shape"] not in args.shapes] + cells
        overheads = [row for row in previous.get("dsl_overhead", []) if row["shape"] not in args.shapes] + overheads
    result = {
        "benchmark": "training step (loss + backward + AdamW), fp32, CPU",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "cells": cells,
        "dsl_overhead": overheads,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
