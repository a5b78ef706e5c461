"""Forward-pass throughput and peak memory of the DSL denoiser on CPU: discrete path vs continuous path.

Each (shape, path) cell runs in a fresh subprocess, so its peak resident memory is its own. Prints a table and
writes JSON (default benchmarks/results/forward.json).

    python benchmarks/bench_forward.py            # MDLM-small at L = 1024 and a small shape
    python benchmarks/bench_forward.py --quick    # fewer repeats
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

SHAPES = {
    # The public MDLM OpenWebText backbone (169.6M parameters) at its training length.
    "mdlm-small": dict(vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128,
                       max_position_embeddings=1024, embed_dim=64, length=1024),
    # The CPU-sized model of the embedded default.
    "small": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, cond_dim=64,
                  max_position_embeddings=128, embed_dim=64, length=128),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(shape: str, path: str, batch: int, repeats: int) -> dict:
    import torch

    from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion

    spec = dict(SHAPES[shape])
    length = spec.pop("length")
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(DSLConfig(dropout=0.0, **spec)).eval()
    ids = torch.randint(0, spec["vocab_size"] + 1, (batch, length))
    inputs = {"input_ids": ids} if path == "discrete" else {"noisy_states": model.noisy_states(ids, 10.0)}
    rss_before = peak_rss_mib()
    with torch.inference_mode():
        model(**inputs)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(**inputs)
        seconds = (time.perf_counter() - start) / repeats
    return {
        "shape": shape, "path": path, "batch": batch, "length": length, "parameters_m": model.num_parameters() / 1e6,
        "seconds_per_forward": seconds, "tokens_per_s": batch * length / seconds,
        "peak_rss_mib": peak_rss_mib(), "forward_peak_mib_over_weights": peak_rss_mib() - rss_before,
        "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one timed repeat per cell")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "forward.json"))
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    if args.worker:
        print(json.dumps(worker(*args.worker, batch=args.batch, repeats=repeats)))
        return

    rows = []
    for shape in args.shapes:
        for path in ("discrete", "continuous"):
            command = [sys.executable, __file__, "--worker", shape, path, "--batch", str(args.batch),
                       "--repeats", str(repeats)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{shape:>10} {path:>10}  {row['tokens_per_s']:10.0f} tok/s  {row['seconds_per_forward']:7.3f} s/fwd  "
                  f"peak {row['peak_rss_mib']:7.0f} MiB (+{row['forward_peak_mib_over_weights']:.0f} MiB in forward)")
    for shape in args.shapes:
        by_path = {r["path"]: r for r in rows if r["shape"] == shape}
        ratio = by_path["continuous"]["seconds_per_forward"] / by_path["discrete"]["seconds_per_forward"]
        print(f"{shape}: continuous path costs {ratio:.2f}x the discrete path")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
