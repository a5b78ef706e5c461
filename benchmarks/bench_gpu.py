"""GPU check and throughput: the DSL model, its trainer and its samplers on CUDA, in bf16 as real users run them.

Prints figures and writes JSON (default benchmarks/results/gpu.json):
- forward of the MDLM-small shape (L = 1024) in fp32 and bf16, discrete vs continuous path: tokens/s, peak memory,
  and how far bf16 logits are from fp32 ones;
- `DSLTrainer` steps (bf16 autocast) for the `dsl` and `mdlm` objectives: finite, decreasing loss and tokens/s;
- samplers on CUDA: seconds per NFE at L = 1024.

    python benchmarks/bench_gpu.py            # on a GPU machine
    python benchmarks/bench_gpu.py --tiny     # a CPU-sized dry run of the same code paths
"""

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion
from dsl_diffusion.pipelines.samplers import get_sampler
from dsl_diffusion.trainer import DSLTrainer, DSLTrainingArguments

MDLM_SMALL = dict(vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128,
                  max_position_embeddings=1024, embed_dim=64)
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
            max_position_embeddings=32, embed_dim=8)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def peak_memory_mib(device):
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def forward_rows(config, device, batch, repeats):
    rows, reference = [], None
    ids = torch.randint(0, config.vocab_size + 1, (batch, config.max_position_embeddings), device=device)
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(config).to(device).eval()
    z = model.noisy_states(ids, 10.0)
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        for path, inputs in (("discrete", {"input_ids": ids}), ("continuous", {"noisy_states": z.to(dtype)})):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                seconds = timed(lambda: model(**inputs), device, repeats)
                logits = model(**inputs).logits
            if dtype == torch.float32:
                reference = {**(reference or {}), path: logits}
            drift = (logits.log_softmax(-1) - reference[path].log_softmax(-1)).abs().mean().item()
            rows.append({"dtype": str(dtype).split(".")[-1], "path": path, "batch": batch,
                         "tokens_per_s": ids.numel() / seconds, "seconds": seconds,
                         "peak_memory_mib": peak_memory_mib(device), "mean_abs_logprob_drift_vs_fp32": drift})
            print(f"forward {rows[-1]['dtype']:>8} {path:>10}: {rows[-1]['tokens_per_s']:10.0f} tok/s, "
                  f"drift vs fp32 {drift:.2e}")
    return rows


class RandomRows(torch.utils.data.Dataset):
    """A fixed set of random rows: the loss must drop on data the model can memorize."""

    def __init__(self, vocab_size, length, count=16):
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab_size, (count, length), generator=generator)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "attention_mask": torch.ones_like(self.rows[index])}


def training_rows(config, device, steps, batch):
    rows = []
    for objective in ("dsl", "mdlm"):
        torch.manual_seed(0)
        model = DSLForMaskedDiffusion(config)
        with tempfile.TemporaryDirectory() as out:
            args = DSLTrainingArguments(
                output_dir=out, objective=objective, max_steps=steps, per_device_train_batch_size=batch,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], bf16=device.type == "cuda",
                use_cpu=device.type != "cuda", dataloader_num_workers=0, disable_tqdm=True,
            )
            trainer = DSLTrainer(model=model, args=args, train_dataset=RandomRows(config.vocab_size, config.max_position_embeddings, 4 * batch))
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        rows.append({"objective": objective, "steps": steps, "bf16": args.bf16, "first_loss": losses[0],
                     "last_loss": losses[-1], "all_finite": all(map(torch.isfinite, torch.tensor(losses))),
                     "tokens_per_s": steps * batch * config.max_position_embeddings / seconds})
        print(f"train {objective}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {rows[-1]['tokens_per_s']:.0f} tok/s")
    return rows


def sampler_rows(config, device, batch, steps):
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(config).to(device, torch.bfloat16).eval()
    rows = []
    for name, knobs in (("mdlm", {}), ("remdm", {"strategy": "cap"}), ("remdm", {"strategy": "loop", "eta": 0.02}),
                        ("dsl-sde", {}), ("hybrid", {})):
        sampler = get_sampler(name, num_steps=steps, **knobs)
        synchronize(device)
        start = time.perf_counter()
        out = sampler.run(model, batch_size=batch, seq_len=config.max_position_embeddings,
                          generator=torch.Generator().manual_seed(0), progress_bar=False)
        synchronize(device)
        seconds = time.perf_counter() - start
        label = name + ("-" + knobs["strategy"] if "strategy" in knobs else "")
        assert out.sequences.device.type == device.type and int(out.sequences.max()) < config.vocab_size
        rows.append({"sampler": label, "steps": steps, "nfe": int(out.nfe), "batch": batch,
                     "seconds_per_nfe": seconds / max(1, out.nfe)})
        print(f"sample {label:>11}: NFE {out.nfe:4d}, {rows[-1]['seconds_per_nfe'] * 1e3:.1f} ms/NFE")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized dry run")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "gpu.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    config = DSLConfig(dropout=0.0, **(TINY if args.tiny else MDLM_SMALL))
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "shape": "tiny" if args.tiny else "mdlm-small",
        "forward": forward_rows(config, device, batch=2 if args.tiny else 8, repeats=2 if args.tiny else 10),
        "training": training_rows(config, device, steps=5 if args.tiny else 30, batch=2 if args.tiny else 8),
        "sampling": sampler_rows(config, device, batch=2 if args.tiny else 4, steps=4 if args.tiny else 32),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
