"""The speed benchmark: one process, one table, one JSON (default benchmarks/results/speed.json).

    python benchmarks/bench_speed.py --quick     # small-cpu only, T = 8, one run per sampler setting (~3-6 min)
    python benchmarks/bench_speed.py             # small-cpu (T = 32) and mdlm-small-cpu (~8 min on a quiet 2-core CPU)
    python benchmarks/bench_speed.py --device cuda --dtype bfloat16

What it measures (random weights; every figure keeps its repeats and reports their median):

1. samplers: the wall time of a whole run divided by its NFE, over one bare forward of the same shape (all-[MASK]
   `input_ids` for the discrete samplers; random noisy states for dsl-sde and the hybrid, whose default
   `commit_mode="evidence"` shows every state as noisy states). When the sampler configs have the
   `logits_where_needed` knob, each discrete sampler runs with it on ("after") and off ("before"), and the two
   are also compared by whole-run time: with the knob a step that unmasks nothing makes no call, so the same
   samples take fewer NFE and a per-NFE figure alone undersells it.
   ROAR fills one position per call, so it runs on T masked positions per row (NFE = T).
2. the discrete forward against the independent MDLM reference forward (`tests/mdlm_reference.py`) on the same
   weights, and, when `forward` accepts `logits_to_keep`, the forward with half the positions kept over the full one
   (what a T = L sampling run averages).
3. the continuous forward over the discrete forward, with the peak memory of each.
4. a training step (loss + backward + AdamW step, dropout 0.1) of the DSL and MDLM objectives, interleaved so that
   load from other processes hits both alike, with the peak memory of each.
5. a torch.profiler table of one ReMDM-cap run (benchmarks/results/sampler_profile.txt): where a sampler's time goes.
6. before / after in one process: ReMDM-cap on a converter-endpoint (DSL-trained) model with and without the run's
   endpoint cache, and the nucleus filter through its top candidates against one full sort of the vocabulary.
7. before / after in one process: the converter alone (inference, and forward + backward), its previous one-pass
   form (one `[N, V]` score tensor, exponentials in place) against the chunked online softmax of the library, with
   the peak memory of each.
8. the opt-in sparse converter (`converter_top_k`): its time against the exact converter, and per SNR the exact
   slot mass it keeps and the relative change of h, at the initial converter (beta = 1 / sqrt(d), soft) and at
   beta = 1 (sharper). Its effect on a trained model's outputs: `bench_sparse_converter.py`.
9. with `--compile`: ReMDM-cap with `torch_compile=True` against the eager model (full logits, and logits where
   needed), once the compiled graph is warm; the first compiled run's time is reported apart.

A shared CPU's load changes within seconds, so every ratio is taken between calls that ran back to back (a sampler
run and the bare forwards just before and after it; one round of the forwards; an MDLM and a DSL step), round by
round, and the median of those per-round ratios is reported. Peak memory: `torch.cuda.max_memory_allocated`
on CUDA; on CPU the process RSS sampled every millisecond by a thread (psutil), over the RSS right before the
measured call (after glibc's `malloc_trim`, so that memory freed earlier is not counted as still in use).
"""

import argparse
import ctypes
import dataclasses
import functools
import inspect
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import nullcontext

import psutil
import torch

from bench_samplers import SAMPLERS, synchronize
from bench_sparse_converter import drift, with_top_k
from bench_training import training_step
from dsl_diffusion.evaluation.utils import atomic_write_json
from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion
from dsl_diffusion.pipelines.samplers import get_sampler
from dsl_diffusion.trainer.corruption import build_snr_path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from mdlm_reference import mdlm_logits, random_mdlm_state_dict  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = {
    # The public MDLM OpenWebText backbone (169.6M parameters) at its training length.
    "mdlm-small-cpu": dict(vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, cond_dim=128,
                           embed_dim=64, length=1024, batch=1, samplers=False),
    # A CPU-sized backbone with the GPT-2 vocabulary: the output head and the converter dominate its cost.
    "small-cpu": dict(vocab_size=50257, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, cond_dim=64,
                      embed_dim=64, length=128, batch=4, samplers=True),
    # The smoke test's shape (seconds).
    "tiny": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
                 embed_dim=8, length=32, batch=2, samplers=True),
}
TOP_P = 0.9  # the published nucleus mass: the sort over the vocabulary is part of a real sampler's cost
KNOB = "logits_where_needed"
PROFILED_SAMPLER = "remdm-cap"
FORWARD_LABEL = "model.forward"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def median_entry(values: list[float]) -> dict:
    return {"median": statistics.median(values), "repeats": values}


# --- peak memory -------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of the enclosed code over what was in use right before it, in MiB (`self.mib`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return self
        try:  # return freed heap pages to the OS, or the baseline would count them as in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.process = psutil.Process()
        self.baseline = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.baseline) / 2**20
        else:
            self.done.set()
            self.thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.mib = (self.peak - self.baseline) / 2**20
        return False


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated minus memory_allocated right before the call",
    "cpu": "process RSS sampled every 1 ms by a psutil thread, minus the RSS right before the call (after malloc_trim)",
}


# --- models and timing -------------------------------------------------------------------------------------------


def model_config(shape: str, dropout: float, **overrides) -> DSLConfig:
    spec = SHAPES[shape]
    sizes = {key: spec[key] for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "cond_dim", "embed_dim")}
    return DSLConfig(max_position_embeddings=spec["length"], dropout=dropout, **sizes, **overrides)


def build_model(shape: str, device, dtype) -> DSLForMaskedDiffusion:
    torch.manual_seed(0)
    return DSLForMaskedDiffusion(model_config(shape, dropout=0.0)).to(device=device, dtype=dtype).eval()


def forward_inputs(model, shape: str, path: str, device) -> dict:
    """All-[MASK] input_ids (a sampler's first call) or random noisy states at a mid SNR."""
    spec = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    if path == "discrete":
        return {"input_ids": torch.full((spec["batch"], spec["length"]), model.config.mask_token_id, device=device)}
    ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["length"]), generator=generator).to(device)
    return {"noisy_states": model.noisy_states(ids, 10.0).to(model.dtype)}


def timed(function, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


# --- 1. samplers -------------------------------------------------------------------------------------------------


def sampler_variants(steps: int) -> list[dict]:
    """Every sampler of bench_samplers.SAMPLERS, with and without `logits_where_needed` where its config has it."""
    variants = []
    for name, (sampler_name, knobs) in SAMPLERS.items():
        knobs = dict(knobs)
        if sampler_name != "roar":  # ROAR's step count is its number of masked positions (see `run_sampler`)
            knobs["num_steps"] = steps
        if sampler_name != "dsl-sde":
            knobs["top_p"] = TOP_P
        fields = {field.name for field in dataclasses.fields(get_sampler(sampler_name, **knobs).config)}
        path = "continuous" if sampler_name in ("dsl-sde", "hybrid") else "discrete"
        settings = {"after": True, "before": False} if KNOB in fields else {"default": None}
        for setting, value in settings.items():
            variant_knobs = knobs if value is None else {**knobs, KNOB: value}
            variants.append({"name": name, "setting": setting, "sampler": sampler_name, "knobs": variant_knobs,
                             "forward": path})
    return variants


def run_sampler(model, variant: dict, shape: str, steps: int, device):
    spec = SHAPES[shape]
    sampler = get_sampler(variant["sampler"], **variant["knobs"])
    generator = torch.Generator(device=device).manual_seed(0)
    if variant["sampler"] == "roar":
        input_ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["length"]),
                                  generator=torch.Generator().manual_seed(0)).to(device)
        input_ids[:, :steps] = model.config.mask_token_id
        inputs = {"input_ids": input_ids}
    else:
        inputs = {"batch_size": spec["batch"], "seq_len": spec["length"]}
    return sampler.run(model, generator=generator, progress_bar=False, **inputs)


def bench_samplers(model, shape: str, steps: int, repeats: int, device) -> dict:
    """Each sampler run sits between two bare forwards of its path, and its figure is its time per NFE over their
    mean: on a shared CPU the load changes within seconds, so a baseline timed minutes apart would not be its own."""
    variants = sampler_variants(steps)
    inputs = {path: forward_inputs(model, shape, path, device) for path in ("discrete", "continuous")}
    runs = {(v["name"], v["setting"]): {"s_per_nfe": [], "forward_s": [], "ratio": []} for v in variants}
    nfe = {}
    with torch.inference_mode():
        for path in inputs:  # warm-up
            model(**inputs[path])
        get_sampler("mdlm", num_steps=2, top_p=TOP_P).run(model, batch_size=1, seq_len=8, progress_bar=False)
        for round_index in range(repeats):
            for variant in variants:
                key, output = (variant["name"], variant["setting"]), None

                def run():
                    nonlocal output
                    output = run_sampler(model, variant, shape, steps, device)

                def bare_forward():
                    return timed(lambda: model(**inputs[variant["forward"]]), device)

                forward_before = bare_forward()
                wall = timed(run, device)
                forward_s = (forward_before + bare_forward()) / 2
                nfe[key] = output.nfe
                runs[key]["s_per_nfe"].append(wall / output.nfe)
                runs[key]["forward_s"].append(forward_s)
                runs[key]["ratio"].append(wall / output.nfe / forward_s)
                log(f"  {shape} round {round_index + 1}/{repeats} {variant['name']:<10} {variant['setting']:<7} "
                    f"NFE {output.nfe:3d}  {wall / output.nfe * 1e3:8.1f} ms/NFE, {forward_s * 1e3:6.1f} ms/forward")
    result = {"steps": steps, "top_p": TOP_P, "samplers": {}}
    for variant in variants:
        key = (variant["name"], variant["setting"])
        entry = result["samplers"].setdefault(variant["name"], {"forward": variant["forward"]})
        entry[variant["setting"]] = {
            "knobs": variant["knobs"], "nfe": nfe[key], "s_per_nfe": median_entry(runs[key]["s_per_nfe"]),
            "adjacent_forward_s": median_entry(runs[key]["forward_s"]),
            "per_nfe_over_forward": median_entry(runs[key]["ratio"]),
        }
    for name, entry in result["samplers"].items():
        if "after" in entry:  # the two settings ran back to back in each round: compare them round by round
            pairs = list(zip(runs[(name, "before")]["ratio"], runs[(name, "after")]["ratio"]))
            entry["before_over_after"] = median_entry([before / after for before, after in pairs])
            calls = entry["before"]["nfe"] / entry["after"]["nfe"]  # the same samples, fewer calls with the knob
            entry["run_before_over_after"] = median_entry([before / after * calls for before, after in pairs])
    return result


# --- 2 and 3. forwards -------------------------------------------------------------------------------------------


def bench_forwards(shape: str, repeats: int, device, dtype) -> dict:
    """Discrete vs continuous vs the MDLM reference (same weights) vs half the logits kept, interleaved."""
    spec = SHAPES[shape]
    state_dict = random_mdlm_state_dict(vocab_with_mask=spec["vocab_size"] + 1, hidden=spec["hidden_size"],
                                        blocks=spec["num_hidden_layers"], cond=spec["cond_dim"], scale=0.02)
    model = DSLForMaskedDiffusion.from_mdlm(state_dict, num_attention_heads=spec["num_attention_heads"],
                                            embed_dim=spec["embed_dim"], max_position_embeddings=spec["length"],
                                            dropout=0.0)
    model = model.to(device=device, dtype=dtype).eval()
    state_dict = {key: value.to(device=device, dtype=dtype) for key, value in state_dict.items()}
    ids = torch.randint(0, spec["vocab_size"] + 1, (spec["batch"], spec["length"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    noisy_states = forward_inputs(model, shape, "continuous", device)["noisy_states"]
    calls = {
        "discrete": lambda: model(input_ids=ids),
        "continuous": lambda: model(noisy_states=noisy_states),
        "mdlm_reference": lambda: mdlm_logits(state_dict, ids, n_heads=spec["num_attention_heads"], dtype=dtype),
    }
    if accepts_logits_to_keep(model):
        # Half of each row's positions, at random: a T = L sampling run keeps (L + 1) / 2 of them on average.
        half = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)).argsort(-1) < spec["length"] // 2
        calls["discrete_half_kept"] = lambda: model(input_ids=ids, logits_to_keep=half.to(device))
    seconds = {name: [] for name in calls}
    peak_mib = {}
    with torch.inference_mode():
        for name, call in calls.items():  # warm-up, then the peak memory of one call
            call()
            with PeakMemory(device) as memory:
                call()
            peak_mib[name] = memory.mib
        for _ in range(repeats):
            for name, call in calls.items():
                seconds[name].append(timed(call, device))
    figures = {name: {"s": median_entry(values), "peak_mib_over_start": peak_mib[name]} for name, values in seconds.items()}

    def ratio(numerator, denominator):  # round by round: the calls of one round ran back to back
        return median_entry([a / b for a, b in zip(seconds[numerator], seconds[denominator])])

    ratios = {
        "ours_over_mdlm_reference": ratio("discrete", "mdlm_reference"),
        "continuous_over_discrete": ratio("continuous", "discrete"),
    }
    if "discrete_half_kept" in seconds:
        ratios["half_kept_over_full"] = ratio("discrete_half_kept", "discrete")
    log(f"  {shape} forwards: " + ", ".join(f"{name} {entry['s']['median'] * 1e3:.0f} ms" for name, entry in figures.items()))
    return {"parameters_m": model.num_parameters() / 1e6, "forwards": figures, "ratios": ratios}


# --- 4. training step --------------------------------------------------------------------------------------------


def bench_training(shape: str, repeats: int, device, dtype) -> dict:
    """DSL and MDLM steps interleaved on one model (fp32 weights; bf16 runs under autocast, as the trainer does)."""
    spec = SHAPES[shape]
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(model_config(shape, dropout=0.1)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    input_ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["length"]),
                              generator=torch.Generator().manual_seed(0)).to(device)
    snr_path = build_snr_path("mixture")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    objectives = ("mdlm", "dsl")

    def step(objective):
        with autocast:
            training_step(objective, model, optimizer, input_ids, snr_path)

    seconds = {objective: [] for objective in objectives}
    peak_mib = {}
    for objective in objectives:  # warm-up (also allocates the AdamW state)
        step(objective)
    for _ in range(repeats):
        for objective in objectives:
            seconds[objective].append(timed(lambda: step(objective), device))
    for objective in objectives:  # the memory of one more step, untimed (the sampling thread takes CPU)
        with PeakMemory(device) as memory:
            step(objective)
        peak_mib[objective] = memory.mib
    figures = {objective: {"s_per_step": median_entry(seconds[objective]), "peak_mib_over_start": peak_mib[objective],
                           "tokens_per_s": input_ids.numel() / statistics.median(seconds[objective])}
               for objective in objectives}
    figures["dsl_over_mdlm"] = median_entry([dsl / mdlm for dsl, mdlm in zip(seconds["dsl"], seconds["mdlm"])])
    figures["dsl_over_mdlm_peak_memory"] = peak_mib["dsl"] / peak_mib["mdlm"]
    log(f"  {shape} training: MDLM {statistics.median(seconds['mdlm']):.2f} s, DSL {statistics.median(seconds['dsl']):.2f} s"
        f" per step; peak +{peak_mib['mdlm']:.0f} / +{peak_mib['dsl']:.0f} MiB")
    return figures


# --- 5. profile --------------------------------------------------------------------------------------------------


def profile_sampler(model, shape: str, steps: int, device, path: str) -> dict:
    variant = next(v for v in sampler_variants(steps) if v["name"] == PROFILED_SAMPLER and v["setting"] != "before")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # Label the network calls, so that the table splits the run into the forward passes and the sampler's own work.
    # `functools.wraps` keeps the forward's signature visible: the samplers look for `logits_to_keep` in it.
    forward = model.forward
    calls_keeping_logits = 0

    @functools.wraps(forward)
    def labelled_forward(*args, **kwargs):
        nonlocal calls_keeping_logits
        calls_keeping_logits += kwargs.get("logits_to_keep") is not None
        with torch.profiler.record_function(FORWARD_LABEL):
            return forward(*args, **kwargs)

    model.forward = labelled_forward
    try:
        with torch.inference_mode(), torch.profiler.profile(activities=activities) as profiler:
            start = time.perf_counter()
            output = run_sampler(model, variant, shape, steps, device)
            synchronize(device)
            wall_s = time.perf_counter() - start
    finally:
        del model.forward  # back to the class's method
    averages = profiler.key_averages()
    forward_s = next(event.cpu_time_total for event in averages if event.key == FORWARD_LABEL) / 1e6
    table = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    header = (f"torch.profiler: one {PROFILED_SAMPLER} run ({variant['knobs']}) at {shape}, batch "
              f"{SHAPES[shape]['batch']}, L = {SHAPES[shape]['length']}, NFE {output.nfe}, {device}, "
              f"{torch.get_num_threads()} threads.\nWall time {wall_s:.2f} s (under the profiler), of which "
              f"{forward_s:.2f} s inside the {output.nfe} network calls ('{FORWARD_LABEL}', CPU total) and "
              f"{wall_s - forward_s:.2f} s in the sampler's own work.\nTop 25 ops by self CPU time ('{FORWARD_LABEL}' "
              f"self = the Python time of the forwards between their ops):\n\n")
    with open(path, "w") as f:
        f.write(header + table + "\n")
    top = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)[:10]
    total_us = sum(event.self_cpu_time_total for event in averages)
    return {"sampler": PROFILED_SAMPLER, "shape": shape, "knobs": variant["knobs"], "nfe": output.nfe, "file": path,
            "wall_s": wall_s, "forward_s": forward_s, "forward_share": forward_s / wall_s,
            "calls_keeping_logits": calls_keeping_logits,
            "top_ops_by_self_cpu": [{"op": event.key, "calls": event.count,
                                     "self_cpu_share": event.self_cpu_time_total / total_us} for event in top]}


# --- the command -------------------------------------------------------------------------------------------------


# --- 6. before / after, in one process: the endpoint cache and the nucleus --------------------------------------


def bench_endpoint_cache(shape: str, steps: int, repeats: int, device, dtype) -> dict:
    """ReMDM-cap on a converter-endpoint model (what DSL training leaves: every discrete state goes through the
    converter) with the run's endpoint cache (the default) and without it (every call converts every distinct token
    of the batch again), run after run."""
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(model_config(shape, dropout=0.0, endpoint_inputs="converter"))
    model = model.to(device=device, dtype=dtype).eval()
    variant = {"sampler": "remdm", "knobs": {"strategy": "cap", "num_steps": steps, "top_p": TOP_P}}
    cached_method = model.endpoint_cache
    times = {"cached": [], "uncached": []}
    with torch.inference_mode():
        run_sampler(model, variant, shape, 2, device)  # warm-up
        for _ in range(repeats):
            for setting in ("uncached", "cached"):
                model.endpoint_cache = cached_method if setting == "cached" else nullcontext
                output = None

                def run():
                    nonlocal output
                    output = run_sampler(model, variant, shape, steps, device)

                times[setting].append(timed(run, device) / output.nfe)
    model.endpoint_cache = cached_method
    log(f"  {shape} endpoint cache: {statistics.median(times['uncached']) * 1e3:.1f} -> "
        f"{statistics.median(times['cached']) * 1e3:.1f} ms/NFE")
    return {
        "sampler": "remdm-cap", "steps": steps, "s_per_nfe_uncached": median_entry(times["uncached"]),
        "s_per_nfe_cached": median_entry(times["cached"]),
        "uncached_over_cached": median_entry([u / c for u, c in zip(times["uncached"], times["cached"])]),
    }


def bench_nucleus(vocab_size: int, rows: int, repeats: int, device) -> dict:
    """`nucleus_kept` (top 256 / 4,096, then bottom 16,384 candidates) against one full sort of the vocabulary, on rows
    whose nucleus (top_p = 0.9) is small (peaked), medium, about 60% of the vocabulary (wide: the bottom candidates
    miss) or nearly the whole vocabulary (flat)."""
    from dsl_diffusion.pipelines.samplers import nucleus_kept

    def full_sort(probs):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < TOP_P
        keep[:, 0] = True
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep)

    generator = torch.Generator().manual_seed(0)
    result = {"rows": rows, "vocab_size": vocab_size, "top_p": TOP_P}
    for name, scale in (("peaked", 8.0), ("medium", 3.0), ("wide", 1.0), ("flat", 0.3)):
        probs = (torch.randn(rows, vocab_size, generator=generator, dtype=torch.float64) * scale).softmax(-1).to(device)
        assert torch.equal(nucleus_kept(probs, TOP_P), full_sort(probs))
        times = {"full_sort": [], "candidates": []}
        for _ in range(repeats):
            times["full_sort"].append(timed(lambda: full_sort(probs), device))
            times["candidates"].append(timed(lambda: nucleus_kept(probs, TOP_P), device))
        result[name] = {
            "nucleus_size_median": float(nucleus_kept(probs, TOP_P).sum(-1).double().median()),
            "full_sort_s": median_entry(times["full_sort"]), "candidates_s": median_entry(times["candidates"]),
            "full_sort_over_candidates": median_entry([f / c for f, c in zip(times["full_sort"], times["candidates"])]),
        }
    return result


def one_pass_converter(model, noisy_states):
    """The converter as the library computed it before the chunked online softmax: one `[N, V]` float32 score tensor
    (bias fused, the [MASK] slot added on the side, exponentials in place without autograd), then one product with
    W. Kept here as the "before" of the converter's before / after."""
    table = model.backbone.vocab_embed.embedding
    vocab_size = model.config.vocab_size
    bias = model.converter_bias.float()
    flat = noisy_states.reshape(-1, noisy_states.shape[-1]).float()
    token_scores = torch.addmm(bias[:vocab_size], flat * model.converter_beta.float(), model.token_directions().float().T)
    shift = torch.maximum(token_scores.amax(dim=-1, keepdim=True), bias[vocab_size]).detach()
    if torch.is_grad_enabled():
        token_weights = (token_scores - shift).exp()
    else:
        token_weights = token_scores.sub_(shift).exp_()
    mask_weight = (bias[vocab_size] - shift).exp()
    normalizer = token_weights.sum(dim=-1, keepdim=True) + mask_weight
    hidden = torch.addmm((mask_weight * table[vocab_size].float()).to(table.dtype), token_weights.to(table.dtype),
                         table[:vocab_size])
    return (hidden.float() / normalizer).to(table.dtype).reshape(*noisy_states.shape[:-1], table.shape[-1])


def bench_converter(shape: str, repeats: int, device, dtype) -> dict:
    """The converter alone on the shape's noisy states: one pass (before) vs chunked (after), inference and
    forward + backward (gradients into the states and every converter parameter), interleaved, with peak memory."""
    model = build_model(shape, device, dtype)
    noisy_states = forward_inputs(model, shape, "continuous", device)["noisy_states"]
    converters = {"one_pass": lambda states: one_pass_converter(model, states), "chunked": model.convert_noisy_states}
    with torch.no_grad():  # the same function, up to float rounding
        torch.testing.assert_close(converters["chunked"](noisy_states), converters["one_pass"](noisy_states),
                                   atol=1e-4, rtol=1e-3)
    result = {"states": noisy_states.shape[0] * noisy_states.shape[1]}
    for mode in ("inference", "training"):
        def call(converter, mode=mode):
            if mode == "inference":
                with torch.no_grad():
                    converter(noisy_states)
            else:
                states = noisy_states.detach().requires_grad_()
                converter(states).float().square().mean().backward()
                model.zero_grad(set_to_none=True)

        seconds, peak_mib = {name: [] for name in converters}, {}
        for name, converter in converters.items():
            call(converter)
            with PeakMemory(device) as memory:
                call(converter)
            peak_mib[name] = memory.mib
        for _ in range(repeats):
            for name, converter in converters.items():
                seconds[name].append(timed(lambda: call(converter), device))
        result[mode] = {f"{name}_s": median_entry(values) for name, values in seconds.items()}
        result[mode].update({f"{name}_peak_mib_over_start": mib for name, mib in peak_mib.items()})
        result[mode]["one_pass_over_chunked"] = median_entry(
            [before / after for before, after in zip(seconds["one_pass"], seconds["chunked"])])
        log(f"  {shape} converter {mode}: one pass {statistics.median(seconds['one_pass']) * 1e3:.0f} ms "
            f"(+{peak_mib['one_pass']:.0f} MiB), chunked {statistics.median(seconds['chunked']) * 1e3:.0f} ms "
            f"(+{peak_mib['chunked']:.0f} MiB)")
    return result


SPARSE_TOP_K = (64, 1024)
SPARSE_SNRS = (0.0, 1.0, 5.0, 20.0, 100.0)


def bench_sparse_converter(shape: str, repeats: int, device, dtype) -> dict:
    """`converter_top_k` against the exact converter: time (the converter alone, inference) and, per SNR, the slot
    mass it keeps and the change of h it makes (random weights: the network's outputs would say nothing)."""
    spec = SHAPES[shape]
    model = build_model(shape, device, dtype)
    ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["length"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    top_ks = [k for k in SPARSE_TOP_K if k < spec["vocab_size"]] or [spec["vocab_size"] // 4]
    result = {"top_k": top_ks, "snrs": list(SPARSE_SNRS), "time": {}, "converter_drift": {}}
    with torch.inference_mode():
        states = model.noisy_states(ids, 10.0, generator=torch.Generator(device).manual_seed(1)).to(model.dtype)
        seconds = {top_k: [] for top_k in (None, *top_ks)}
        for _ in range(repeats):
            for top_k in seconds:
                with with_top_k(model, top_k):
                    seconds[top_k].append(timed(lambda: model.convert_noisy_states(states), device))
        result["time"]["exact_s"] = median_entry(seconds[None])
        for top_k in top_ks:
            result["time"][f"top_{top_k}"] = {
                "s": median_entry(seconds[top_k]),
                "exact_over_sparse": median_entry([e / t for e, t in zip(seconds[None], seconds[top_k])]),
            }
        for beta_name, beta in (("initial", float(model.converter_beta)), ("beta_1", 1.0)):
            model.converter_beta.fill_(beta)
            rows = drift(model, ids, top_ks, SPARSE_SNRS, seed=2, outputs=False)
            result["converter_drift"][beta_name] = {"beta": beta, **rows}
    log(f"  {shape} sparse converter: " + ", ".join(
        f"top {k} {result['time'][f'top_{k}']['exact_over_sparse']['median']:.2f}x" for k in top_ks))
    return result


def bench_compile(shape: str, steps: int, repeats: int, device, dtype) -> dict:
    """ReMDM-cap per NFE with `torch_compile=True` (inductor; full logits, static shapes) against the eager model with
    full logits and with logits where needed (the default), run after run once the compiled graph is warm."""
    model = build_model(shape, device, dtype)
    settings = {
        "eager_full_logits": {"logits_where_needed": False},
        "eager_logits_where_needed": {},
        "compiled_full_logits": {"torch_compile": True},
    }
    variants = {name: {"sampler": "remdm", "knobs": {"strategy": "cap", "num_steps": steps, "top_p": TOP_P, **knobs}}
                for name, knobs in settings.items()}
    times = {name: [] for name in settings}
    with torch.inference_mode():
        compile_s = timed(lambda: run_sampler(model, variants["compiled_full_logits"], shape, steps, device), device)
        for _ in range(repeats):
            for name, variant in variants.items():
                output = None

                def run():
                    nonlocal output
                    output = run_sampler(model, variant, shape, steps, device)

                times[name].append(timed(run, device) / output.nfe)
    log(f"  {shape} compile: first run {compile_s:.0f} s; " + ", ".join(
        f"{name} {statistics.median(values) * 1e3:.1f} ms/NFE" for name, values in times.items()))
    result = {"sampler": "remdm-cap", "steps": steps, "first_compiled_run_s": compile_s}
    result.update({f"{name}_s_per_nfe": median_entry(values) for name, values in times.items()})
    for name in ("eager_full_logits", "eager_logits_where_needed"):
        result[f"{name}_over_compiled"] = median_entry(
            [e / c for e, c in zip(times[name], times["compiled_full_logits"])]
        )
    return result


def print_table(report: dict) -> None:
    print(f"\n{'figure':<62} {'value':>12}")

    def row(name, value, unit="x"):
        print(f"{name:<62} {value:>11.3f}{unit}")

    for shape, section in report["samplers"].items():
        for name, entry in section["samplers"].items():
            for setting in ("default", "after", "before"):
                if setting in entry:
                    row(f"{shape}: {name} {setting}, per NFE / {entry['forward']} forward",
                        entry[setting]["per_nfe_over_forward"]["median"])
            if "before_over_after" in entry:
                row(f"{shape}: {name} per NFE, before / after {KNOB}", entry["before_over_after"]["median"])
                row(f"{shape}: {name} whole run, before / after {KNOB}", entry["run_before_over_after"]["median"])
    for shape, section in report["forward"].items():
        for name, value in section["ratios"].items():
            row(f"{shape}: forward {name}", value["median"])
    for shape, section in report["endpoint_cache"].items():
        row(f"{shape}: remdm-cap on a converter-endpoint model, per NFE without / with the endpoint cache",
            section["uncached_over_cached"]["median"])
    for shape, section in report["converter"].items():
        for mode in ("inference", "training"):
            row(f"{shape}: converter {mode}, one pass / chunked (time)", section[mode]["one_pass_over_chunked"]["median"])
            row(f"{shape}: converter {mode} peak memory one pass / chunked (MiB)",
                section[mode]["one_pass_peak_mib_over_start"] / max(section[mode]["chunked_peak_mib_over_start"], 1e-9))
    for shape, section in report["sparse_converter"].items():
        for top_k in section["top_k"]:
            row(f"{shape}: converter exact / top {top_k} (time)", section["time"][f"top_{top_k}"]["exact_over_sparse"]["median"])
            for beta_name in ("initial", "beta_1"):
                drift = section["converter_drift"][beta_name]
                lowest = min(drift[f"snr_{snr:g}_top_{top_k}"]["kept_mass_mean"] for snr in SPARSE_SNRS)
                row(f"{shape}: top {top_k}, {beta_name} beta: lowest mean kept slot mass over the SNRs", lowest, " ")
    for shape, section in report["compile"].items():
        for name in ("eager_full_logits", "eager_logits_where_needed"):
            row(f"{shape}: remdm-cap per NFE, {name.replace('_', ' ')} / compiled (full logits)",
                section[f"{name}_over_compiled"]["median"])
    if report["nucleus"]:
        for name in ("peaked", "medium", "wide", "flat"):
            row(f"nucleus (top_p {TOP_P}, {name} rows): full sort / top candidates",
                report["nucleus"][name]["full_sort_over_candidates"]["median"])
    for shape, section in report["training"].items():
        row(f"{shape}: training step DSL / MDLM", section["dsl_over_mdlm"]["median"])
        row(f"{shape}: training step peak memory DSL / MDLM", section["dsl_over_mdlm_peak_memory"])
        for objective in ("mdlm", "dsl"):
            row(f"{shape}: training step {objective} peak memory (MiB over start)",
                section[objective]["peak_mib_over_start"], " ")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small-cpu only, T = 8, one sampler round, 2 repeats")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: small-cpu, mdlm-small-cpu")
    parser.add_argument("--steps", type=int, help="sampler steps T (default 32; 8 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed rounds of the forwards and training steps (default 3; 2 quick)")
    parser.add_argument("--sampler-repeats", type=int,
                        help="timed runs of each sampler setting (default 2; 1 quick)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true",
                        help="also time ReMDM-cap with torch_compile=True (inductor compiles first: minutes on a CPU)")
    parser.add_argument("--output", default=os.path.join(RESULTS, "speed.json"))
    parser.add_argument("--profile-output", help="default: sampler_profile.txt next to --output")
    args = parser.parse_args(argv)
    shapes = args.shapes or (["small-cpu"] if args.quick else ["small-cpu", "mdlm-small-cpu"])
    steps = args.steps or (8 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    sampler_repeats = args.sampler_repeats or (1 if args.quick else 2)
    profile_path = args.profile_output or os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                                       "sampler_profile.txt")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    for path in (args.output, profile_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    report = {
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
        },
        "settings": {"quick": args.quick, "sampler_steps": steps, "repeats": repeats,
                     "sampler_repeats": sampler_repeats, "memory_method": MEMORY_METHOD[device.type]},
        "shapes": {shape: SHAPES[shape] for shape in shapes},
        "samplers": {}, "forward": {}, "training": {}, "endpoint_cache": {}, "nucleus": None, "compile": {},
        "converter": {}, "sparse_converter": {},
        "profile": None,
    }
    started = time.perf_counter()
    for shape in shapes:
        log(f"{shape}: forwards (ours, continuous, MDLM reference)")
        report["forward"][shape] = bench_forwards(shape, repeats, device, dtype)
        log(f"{shape}: the converter, one pass vs chunked")
        report["converter"][shape] = bench_converter(shape, repeats, device, dtype)
        log(f"{shape}: the sparse converter (converter_top_k) against the exact one")
        report["sparse_converter"][shape] = bench_sparse_converter(shape, repeats, device, dtype)
        if SHAPES[shape]["samplers"]:
            model = build_model(shape, device, dtype)
            log(f"{shape}: samplers, T = {steps}, {sampler_repeats} round(s)")
            report["samplers"][shape] = bench_samplers(model, shape, steps, sampler_repeats, device)
            if report["profile"] is None:
                log(f"{shape}: profiling one {PROFILED_SAMPLER} run")
                report["profile"] = profile_sampler(model, shape, steps, device, profile_path)
            del model
            log(f"{shape}: remdm-cap with and without the endpoint cache (converter endpoints)")
            report["endpoint_cache"][shape] = bench_endpoint_cache(shape, steps, sampler_repeats, device, dtype)
            if args.compile:
                log(f"{shape}: remdm-cap compiled (inductor) vs eager")
                report["compile"][shape] = bench_compile(shape, steps, sampler_repeats, device, dtype)
        if report["nucleus"] is None and SHAPES[shape]["samplers"]:
            log("nucleus: top candidates vs a full sort")
            report["nucleus"] = bench_nucleus(SHAPES[shape]["vocab_size"], 64, repeats, device)
        log(f"{shape}: training steps")
        report["training"][shape] = bench_training(shape, repeats, device, dtype)
    report["settings"]["wall_s"] = time.perf_counter() - started

    print_table(report)
    atomic_write_json(args.output, report)
    log(f"wrote {args.output} and {profile_path}")
    return report


if __name__ == "__main__":
    main()
