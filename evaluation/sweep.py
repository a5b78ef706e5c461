"""Step-budget sweeps: quality against denoiser calls for checkpoints x samplers x step budgets (``dsl-evaluate``).

For every cell of the grid the sweep draws ``num_samples`` unconditional samples through the
``diffusion-text-generation`` pipeline, decodes them WITHOUT skipping special tokens (the protocol), and computes
MAUVE against reference text, a Frechet distance between the same features, generative perplexity under a judge,
unigram entropy and the mean NFE. It writes, under ``output_dir``:

- ``cells/<checkpoint>/<sampler>/T<steps>/``: ``generation.json`` (how the samples were drawn), ``samples.jsonl``
  (one record per sample: ``token_ids``, ``nfe``, ``text``) and ``results.json`` (the cell's metrics);
- ``references/``: the reference texts, their features and their own Gen PPL and entropy (the "data" row);
- ``sweep_results.json`` (every row and every setting), ``results.md`` (a Markdown table) and
  ``mauve_vs_nfe.png`` / ``gen_ppl_vs_nfe.png`` (one line per checkpoint and sampler).

Seeds: sample ``i`` of every cell is drawn with its own generator seeded with ``seed + i`` (the pipeline's
per-row seeding), so a sample does not depend on the batch size, and the cells of a sweep share their seeds.

Resuming: every finished file is written to a temporary name and moved into place with ``os.replace``; samples
are appended one sampler call (``batch_size`` samples) at a time to ``samples.partial.jsonl``, so an interrupted
cell resumes at its first missing chunk and ends with exactly the samples of an uninterrupted run. A
rerun skips cells whose ``results.json`` was computed with the same metric settings, recomputes only the metrics
when those changed, and refuses to mix samples drawn with different generation settings in one cell.

Protocol defaults (METHOD.md section 6): 5000 samples of the model's full length, top-p 0.9, seed 1, batch 1;
MAUVE on gpt2-large features against 5000 OpenWebText validation rows in the wrapped format; Gen PPL under
gpt2-large. Offline, pass local folders (see :mod:`dsl_diffusion.evaluation.assets`) and local reference files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, HfArgumentParser
from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()

from ..pipelines.samplers import NUCLEUS_RULES, get_sampler, resolve_sampler_name, sampler_knobs
from .metrics import (
    PROTOCOL_FEATURIZER,
    PROTOCOL_JUDGE,
    TextFeaturizer,
    compute_generative_perplexity,
    compute_mauve,
    compute_unigram_entropy,
    frechet_distance,
    load_judge,
)
from .plots import compare_curves, curves_from_rows, measure_noise_floor, plot_metric_vs_nfe
from .report import protocol_caption, render_markdown
from .utils import atomic_write_json, atomic_write_text, read_json


logger = logging.getLogger(__name__)

__all__ = ["SweepArguments", "run_sweep", "load_reference_texts", "resolve_reference_split", "main"]

REFERENCE_FORMATS = ("wrapped", "documents")
REFERENCE_SPLITS = ("auto", "validation", "train", "all")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SweepArguments:
    """Arguments of ``dsl-evaluate``. Defaults are the published protocol."""

    checkpoints: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Model folders or Hub ids, optionally labelled: `label=path`. Label default: the folder name."
        },
    )
    samplers: list[str] = field(
        default_factory=lambda: ["mdlm", "remdm"],
        metadata={"help": "Sampler names of the pipeline: mdlm, remdm, remdm-cap, remdm-loop, dsl-sde, hybrid, roar."},
    )
    steps: list[int] = field(default_factory=lambda: [128, 256, 512, 1024], metadata={"help": "Step budgets T."})
    sampler_kwargs: str | None = field(
        default=None,
        metadata={"help": 'JSON object of extra pipeline knobs per sampler name, e.g. \'{"remdm": {"eta": 0.04}}\'.'},
    )
    num_samples: int = field(default=5000, metadata={"help": "Samples per cell."})
    seq_len: int | None = field(default=None, metadata={"help": "Sample length (default: the model's length)."})
    batch_size: int = field(default=1, metadata={"help": "Samples per sampler call."})
    seed: int = field(default=1, metadata={"help": "Sample i of a cell is drawn with seed `seed + i`."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus mass of the samplers."})
    nucleus_rule: str = field(
        default="mdlm",
        metadata={"help": "How top_p cuts: 'mdlm' (the published protocol: the tokens of cumulative mass <= top_p) or "
                  "'transformers' (the smallest set of mass >= top_p)."},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (default: the checkpoint's)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub checkpoints' remote code."})
    dtype: str = field(default="float32", metadata={"help": f"Model dtype: {', '.join(DTYPES)}."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    output_dir: str = field(default="outputs/sweep", metadata={"help": "Where results, samples and plots go."})

    reference_source: str = field(
        default="Skylion007/openwebtext",
        metadata={"help": "Reference text: a Hub dataset id, local .txt/.json/.jsonl file(s) or folder, or 'bbc'."},
    )
    reference_split: str = field(
        default="auto",
        metadata={"help": "validation, train or all documents ('auto': all for local files, else validation)."},
    )
    reference_format: str = field(
        default="wrapped",
        metadata={
            "help": "'wrapped': rows of seq_len tokens as the model was trained on; 'documents': raw documents."
        },
    )
    num_references: int | None = field(default=None, metadata={"help": "Reference rows (default: num_samples)."})

    featurizer: str = field(default=PROTOCOL_FEATURIZER, metadata={"help": "MAUVE featurizer: Hub id or folder."})
    featurizer_max_length: int = field(default=1024, metadata={"help": "Featurizer truncation length (tokens)."})
    featurizer_batch_size: int = field(default=8, metadata={"help": "Texts per featurizer forward pass."})
    mauve_seeds: list[int] = field(default_factory=lambda: [25], metadata={"help": "k-means seeds (averaged)."})
    mauve_scaling_factor: float = field(default=5.0, metadata={"help": "MAUVE scaling factor c."})
    mauve_num_buckets: str = field(default="auto", metadata={"help": "'auto' (n / 10) or an integer."})

    judge: str = field(default=PROTOCOL_JUDGE, metadata={"help": "Gen PPL judge: Hub id or folder."})
    judge_gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside the judge folder."})
    judge_max_length: int = field(default=1024, metadata={"help": "Judge truncation length (tokens)."})
    judge_batch_size: int = field(default=8, metadata={"help": "Texts per judge forward pass."})

    baseline: str | None = field(
        default=None, metadata={"help": "Curve `checkpoint / sampler` whose MAUVE the candidate must reach."}
    )
    candidate: str | None = field(default=None, metadata={"help": "Curve `checkpoint / sampler` to compare."})

    def __post_init__(self):
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (MAUVE clusters samples), got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.steps or any(steps < 1 for steps in self.steps):
            raise ValueError(f"steps must be a non-empty list of integers >= 1, got {self.steps}")
        if not self.samplers:
            raise ValueError("samplers is empty")
        for sampler in self.samplers:
            resolve_sampler_name(sampler)  # raises with the accepted names
        # Settings the metrics read only after every cell is sampled: checked now, not hours later.
        for name, minimum in (("seq_len", 1), ("num_references", 2), ("featurizer_max_length", 1),
                              ("featurizer_batch_size", 1), ("judge_max_length", 2), ("judge_batch_size", 1)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum} (or unset for its default), got {value}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (sample i uses seed + i), got {self.seed}")
        if not self.mauve_seeds:
            raise ValueError("mauve_seeds is empty: give at least one k-means seed (the protocol uses 25)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.nucleus_rule not in NUCLEUS_RULES:
            raise ValueError(f"nucleus_rule={self.nucleus_rule!r} is not supported; accepted: {NUCLEUS_RULES}")
        if self.reference_format not in REFERENCE_FORMATS:
            raise ValueError(f"reference_format must be one of {REFERENCE_FORMATS}, got {self.reference_format!r}")
        if self.reference_split not in REFERENCE_SPLITS:
            raise ValueError(f"reference_split must be one of {REFERENCE_SPLITS}, got {self.reference_split!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.mauve_num_buckets != "auto":
            try:
                self.mauve_num_buckets = int(self.mauve_num_buckets)
            except ValueError:
                raise ValueError(f"mauve_num_buckets must be 'auto' or an integer, got {self.mauve_num_buckets!r}")
        if not (math.isfinite(self.mauve_scaling_factor) and self.mauve_scaling_factor > 0):
            raise ValueError(
                f"mauve_scaling_factor must be a finite number > 0 (the protocol uses 5), got {self.mauve_scaling_factor}"
            )
        if (self.baseline is None) != (self.candidate is None):
            raise ValueError("Give both --baseline and --candidate (curve labels `checkpoint / sampler`) or neither")
        self.parsed_sampler_kwargs = self._parse_sampler_kwargs()

    def _parse_sampler_kwargs(self) -> dict[str, dict]:
        if self.sampler_kwargs is None:
            return {}
        try:
            parsed = json.loads(self.sampler_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"sampler_kwargs is not valid JSON: {err}") from err
        if not isinstance(parsed, dict) or not all(isinstance(value, dict) for value in parsed.values()):
            raise ValueError('sampler_kwargs must be a JSON object of objects: {"<sampler>": {"<knob>": value}}')
        unknown = sorted(set(parsed) - set(self.samplers))
        if unknown:
            raise ValueError(f"sampler_kwargs names samplers {unknown} that are not in --samplers {self.samplers}")
        for sampler, knobs in parsed.items():
            canonical, implied = resolve_sampler_name(sampler)
            accepted = set(sampler_knobs(canonical)) - {"num_steps"}
            wrong = sorted(set(knobs) - accepted)
            if wrong:
                # The pipeline would only warn and ignore them: the sweep would report a setting it did not use.
                raise ValueError(
                    f"--sampler_kwargs for {sampler!r}: {wrong} cannot be set there (num_steps comes from --steps); "
                    f"knobs of {canonical!r}: {sorted(accepted)}"
                )
            # The values too, at every step budget, before any checkpoint is loaded.
            budgets = self.steps if "num_steps" in sampler_knobs(canonical) else [None]
            for steps in budgets:
                try:
                    get_sampler(canonical, **{**knobs, **implied, **({"num_steps": steps} if steps else {})})
                except (TypeError, ValueError) as err:
                    raise ValueError(f"--sampler_kwargs for {sampler!r} (at --steps {steps}): {err}") from err
        return parsed

    def checkpoint_labels(self) -> dict[str, str]:
        """``{label: path}`` from ``label=path`` entries (label default: the last path component)."""
        if not self.checkpoints:
            raise ValueError("No --checkpoints given")
        labels = {}
        for entry in self.checkpoints:
            label, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
            label = label or Path(path.rstrip("/")).name or path
            if label in labels:
                raise ValueError(f"Two checkpoints share the label {label!r}: name them with `label=path`")
            labels[label] = path
        return labels


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ---------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------


def resolve_reference_split(source: str, split: str) -> str:
    """``"auto"`` means every document of local files and the validation split of a Hub dataset (or ``"bbc"``)."""
    if split != "auto":
        return split
    return "all" if Path(source).exists() else "validation"


def load_reference_texts(
    source: str,
    num_references: int,
    tokenizer,
    seq_len: int,
    split: str = "auto",
    reference_format: str = "wrapped",
) -> tuple[list[str], list[list[int]]]:
    """``(texts, token_ids)`` of ``num_references`` reference rows, through :mod:`dsl_diffusion.trainer.data`.

    ``"wrapped"`` builds the rows the model was trained on (documents tokenized, EOS-separated, concatenated, cut
    into ``[BOS] + (seq_len - 2) tokens + [EOS]``) and decodes them without skipping special tokens, as the
    samples are decoded; ``"documents"`` takes raw documents (their token ids: the tokenizer's, without special
    tokens). Rows are taken in order from the split; too few rows is an error.
    """
    from ..trainer.data import load_text_dataset, pack_wrapped, tokenize_dataset

    split = resolve_reference_split(source, split)
    documents = load_text_dataset(source)
    if split == "all":
        from datasets import concatenate_datasets

        documents = concatenate_datasets([documents["train"], documents["validation"]])
    else:
        documents = documents[split]
    if reference_format == "wrapped":
        rows = pack_wrapped(tokenize_dataset(documents, tokenizer), block_size=seq_len, tokenizer=tokenizer)
        if len(rows) < num_references:
            raise ValueError(
                f"The {split} split of {source!r} gives {len(rows)} wrapped rows of {seq_len} tokens, fewer than the "
                f"{num_references} references needed: use more reference text or fewer samples"
            )
        token_ids = [list(map(int, ids)) for ids in rows.select(range(num_references))["input_ids"]]
        texts = tokenizer.batch_decode(token_ids, skip_special_tokens=False)
    else:
        texts = [text for text in documents["text"] if text.strip()][:num_references]
        if len(texts) < num_references:
            raise ValueError(
                f"The {split} split of {source!r} has {len(texts)} non-empty documents, fewer than the "
                f"{num_references} references needed"
            )
        token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return texts, token_ids


# ---------------------------------------------------------------------------------------------------------------
# Sample generation (resumable)
# ---------------------------------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict]:
    """The complete JSON lines of ``path`` (a torn last line, from an interrupted write, is dropped)."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
    return records


def _flatten_outputs(outputs) -> list[dict]:
    if isinstance(outputs, dict):
        return [outputs]
    flat = []
    for item in outputs:
        flat.extend(_flatten_outputs(item))
    return flat


def generate_cell_samples(pipe, tokenizer, cell_dir: Path, generation: dict, pipeline_kwargs: dict) -> list[dict]:
    """Draw (or resume, or reload) the samples of one cell; returns their records in order."""
    final_path, partial_path = cell_dir / "samples.jsonl", cell_dir / "samples.partial.jsonl"
    generation_path = cell_dir / "generation.json"
    if generation_path.exists() and read_json(generation_path) != generation:
        raise ValueError(
            f"{cell_dir} holds samples drawn with other generation settings ({generation_path}); use another "
            "--output_dir or delete that cell to redraw it"
        )
    if final_path.exists():
        records = _read_records(final_path)
        if len(records) == generation["num_samples"]:
            return records
        raise ValueError(f"{final_path} has {len(records)} samples, expected {generation['num_samples']}")
    atomic_write_json(generation_path, generation)

    num_samples, chunk_size = generation["num_samples"], generation["batch_size"]
    records = _read_records(partial_path)
    # Chunks are written whole; a chunk cut short by an interruption is redrawn (its samples have fixed seeds).
    records = records[: len(records) // chunk_size * chunk_size]
    atomic_write_text(partial_path, "".join(json.dumps(record) + "\n" for record in records))
    label = f"{generation['checkpoint']} / {generation['sampler']} / T={generation['num_steps']}"
    with (
        open(partial_path, "a", encoding="utf-8") as handle,
        tqdm(total=num_samples, initial=len(records), desc=f"sampling {label}") as progress,
    ):
        for chunk in range(len(records) // chunk_size, math.ceil(num_samples / chunk_size)):
            size = min(chunk_size, num_samples - chunk * chunk_size)
            outputs = _flatten_outputs(
                pipe(
                    None,
                    sampler=generation["sampler"],
                    num_steps=generation["num_steps"],
                    max_length=generation["seq_len"],
                    num_return_sequences=size,
                    batch_size=size,
                    seed=generation["seed"] + chunk * chunk_size,
                    return_tensors=True,
                    progress_bar=False,
                    **pipeline_kwargs,
                )
            )
            if len(outputs) != size:
                raise RuntimeError(f"The pipeline returned {len(outputs)} samples for a chunk of {size}")
            lines = []
            for output in outputs:
                token_ids = [int(token) for token in torch.as_tensor(output["generated_token_ids"]).reshape(-1)]
                text = tokenizer.decode(token_ids, skip_special_tokens=False)
                record = {"token_ids": token_ids, "nfe": int(output["nfe"]), "text": text}
                records.append(record)
                lines.append(json.dumps(record) + "\n")
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            progress.update(size)
    os.replace(partial_path, final_path)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


class MetricSuite:
    """Loads the featurizer and the judge once (lazily) and computes every cell's metrics."""

    def __init__(self, args: SweepArguments):
        self.args = args
        self._featurizer = None
        self._judge = None

    @property
    def featurizer(self) -> TextFeaturizer:
        if self._featurizer is None:
            self._featurizer = TextFeaturizer(
                self.args.featurizer,
                max_text_length=self.args.featurizer_max_length,
                batch_size=self.args.featurizer_batch_size,
                device=self.args.device,
            )
        return self._featurizer

    @property
    def judge(self):
        if self._judge is None:
            self._judge = load_judge(self.args.judge, gguf_file=self.args.judge_gguf_file, device=self.args.device)
        return self._judge

    def settings(self) -> dict:
        """Everything the metrics depend on: a cell whose results were computed with other settings is redone."""
        args = self.args
        return {
            "featurizer": args.featurizer,
            "featurizer_max_length": args.featurizer_max_length,
            "mauve_seeds": list(args.mauve_seeds),
            "mauve_scaling_factor": args.mauve_scaling_factor,
            "mauve_num_buckets": args.mauve_num_buckets,
            "judge": args.judge,
            "judge_gguf_file": args.judge_gguf_file,
            "judge_max_length": args.judge_max_length,
            "num_references": args.num_references,
            "reference_source": args.reference_source,
            "reference_split": resolve_reference_split(args.reference_source, args.reference_split),
            "reference_format": args.reference_format,
        }

    def mauve(self, reference_features: np.ndarray, texts: list[str]) -> tuple[dict, float]:
        features = self.featurizer(texts, desc="featurizing samples")
        result = compute_mauve(
            p_features=reference_features,
            q_features=features,
            seeds=self.args.mauve_seeds,
            num_buckets=self.args.mauve_num_buckets,
            mauve_scaling_factor=self.args.mauve_scaling_factor,
            # An explicit --num_references different from --num_samples is a deliberate choice (warned about).
            allow_unequal_sizes=self.args.num_references is not None,
        )
        result.featurizer = self.featurizer.describe()
        return result.to_dict(), frechet_distance(reference_features, features)

    def gen_ppl(self, texts: list[str]) -> dict:
        return compute_generative_perplexity(
            texts, self.judge, max_length=self.args.judge_max_length, batch_size=self.args.judge_batch_size
        ).to_dict()


def _reference_bundle(args: SweepArguments, suite: MetricSuite, tokenizer, seq_len: int, num_references: int):
    """``(texts, features, metrics)`` of the references: the texts, their features and their own Gen PPL and entropy
    (the "data" row), each cached under ``references/`` with the settings it depends on and redone when they
    change."""
    folder = Path(args.output_dir) / "references"
    key = {
        "source": args.reference_source,
        "split": resolve_reference_split(args.reference_source, args.reference_split),
        "format": args.reference_format,
        "num_references": num_references,
        "seq_len": seq_len,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
    }
    texts_path, texts_key_path = folder / "references.jsonl", folder / "references.json"
    if texts_path.exists() and texts_key_path.exists() and read_json(texts_key_path) == key:
        records = _read_records(texts_path)
    else:
        texts, token_ids = load_reference_texts(
            args.reference_source, num_references, tokenizer, seq_len, args.reference_split, args.reference_format
        )
        records = [{"token_ids": ids, "text": text} for ids, text in zip(token_ids, texts)]
        atomic_write_text(texts_path, "".join(json.dumps(record) + "\n" for record in records))
        atomic_write_json(texts_key_path, key)
    texts = [record["text"] for record in records]

    features_settings = {**key, "featurizer": args.featurizer, "featurizer_max_length": args.featurizer_max_length}
    features_path, features_key_path = folder / "features.npy", folder / "features.json"
    if features_path.exists() and features_key_path.exists() and read_json(features_key_path) == features_settings:
        features = np.load(features_path)
    else:
        features = suite.featurizer(texts, desc="featurizing references")
        tmp_path = folder / "features.tmp.npy"
        np.save(tmp_path, features)
        os.replace(tmp_path, features_path)
        atomic_write_json(features_key_path, features_settings)

    judge_settings = {
        **key,
        "judge": args.judge,
        "judge_gguf_file": args.judge_gguf_file,
        "judge_max_length": args.judge_max_length,
    }
    metrics_path = folder / "reference_metrics.json"
    metrics = read_json(metrics_path) if metrics_path.exists() else None
    if metrics is None or metrics["settings"] != judge_settings:
        metrics = {
            "settings": judge_settings,
            "num_references": len(texts),
            "gen_ppl": suite.gen_ppl(texts)["gen_ppl"],
            "entropy": compute_unigram_entropy([record["token_ids"] for record in records]).mean,
            "judge": suite.judge.describe(),
        }
        atomic_write_json(metrics_path, metrics)
    return texts, features, metrics


def _cell_row(results: dict) -> dict:
    """The flat summary of one cell used by the table, the plots and the model card."""
    return {
        "checkpoint": results["checkpoint"],
        "sampler": results["sampler"],
        "num_steps": results["num_steps"],
        "nfe": results["nfe_mean"],
        "mauve": results["mauve"]["mauve"],
        "mauve_std": results["mauve"]["mauve_std"],
        "frechet_distance": results["frechet_distance"],
        "gen_ppl": results["gen_ppl"]["gen_ppl"],
        "entropy": results["entropy"]["mean"],
        "num_samples": results["num_samples"],
        "num_references": results["mauve"]["num_p_samples"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def _write_reports(args: SweepArguments, report: dict) -> dict:
    output_dir = Path(args.output_dir)
    rows = report["rows"]
    caption = protocol_caption(report)
    plots = {}
    for metric, name, log_y in (("mauve", "MAUVE", False), ("gen_ppl", "Gen PPL", True)):
        curves = curves_from_rows(rows, metric)
        if curves:
            path = plot_metric_vs_nfe(
                curves,
                output_dir / f"{metric}_vs_nfe.png",
                name,
                title=f"{name} against NFE",
                log_y=log_y,
                caption=caption,
            )
            plots[metric] = path.name
    report["plots"] = plots
    if args.baseline is not None:
        curves = {curve.label: curve for curve in curves_from_rows(rows, "mauve")}
        missing = [label for label in (args.baseline, args.candidate) if label not in curves]
        if missing:
            raise ValueError(f"--baseline/--candidate curves {missing} not in the sweep; curves: {sorted(curves)}")
        # A sweep has one sampling seed per cell: its noise floor is the k-means spread of MAUVE.
        floor = measure_noise_floor(rows, "mauve", cell_keys=("checkpoint", "sampler", "num_steps"), std_key="mauve_std")
        points = compare_curves(curves[args.baseline], curves[args.candidate], noise_floor=floor.value)
        report["nfe_comparison"] = {
            "baseline": args.baseline,
            "candidate": args.candidate,
            "metric": "mauve",
            "noise_floor": floor.to_dict(),
            "points": [{**point.to_dict(), "description": point.describe("MAUVE")} for point in points],
        }
    atomic_write_json(output_dir / "sweep_results.json", report)
    atomic_write_text(output_dir / "results.md", render_markdown(report))
    return report


# ---------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------


def _check_sweep_checkpoint(label: str, path: str) -> None:
    """A local checkpoint must exist and hold a readable model (config.json and weights)."""
    from ..modeling_dsl.modeling_dsl import check_checkpoint_files

    try:
        check_checkpoint_files(path)
    except (OSError, ValueError) as err:
        raise type(err)(f"--checkpoints {label}={path}: {err}") from err
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"--checkpoints {label}={path}: the folder has no config.json; pass a folder written by "
            "save_pretrained (dsl-finetune's --output_dir or a checkpoint-N folder)."
        )


def _load_checkpoint(path: str, args: SweepArguments):
    import transformers

    from .. import pipelines  # noqa: F401  (registers the DSL model classes and the pipeline task)
    from ..trainer.tokenization import load_tokenizer

    model = AutoModel.from_pretrained(path, trust_remote_code=args.trust_remote_code, dtype=DTYPES[args.dtype])
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tokenizer = load_tokenizer(args.tokenizer or path)
    pipe = transformers.pipeline("diffusion-text-generation", model=model, tokenizer=tokenizer, device=device)
    return model, tokenizer, pipe


def _sampler_knobs(pipe, sampler: str, args: SweepArguments) -> tuple[dict, dict]:
    """(the knobs to pass to the pipeline, every knob the sampler will run with) for one sampler of the sweep.

    ``--top_p`` (with ``--nucleus_rule``, the published MDLM rule by default) goes to the samplers that have the
    knob, ``--sampler_kwargs`` add theirs, and the rest comes from the model's generation config
    (``generation_config.json``).
    """
    canonical, implied = resolve_sampler_name(sampler)
    knobs = dict(args.parsed_sampler_kwargs.get(sampler, {}))  # validated by SweepArguments
    if "top_p" in sampler_knobs(canonical):
        knobs.setdefault("top_p", args.top_p)
        knobs.setdefault("nucleus_rule", args.nucleus_rule)
    effective = {**pipe.model.generation_config.knobs_for(canonical), **knobs, **implied}
    return knobs, effective


def run_sweep(args: SweepArguments) -> dict:
    """Run (or resume) the sweep described by ``args``; returns the report also written to ``sweep_results.json``."""
    checkpoints = args.checkpoint_labels()
    for curve in filter(None, (args.baseline, args.candidate)):
        label, _, sampler = curve.partition(" / ")
        if label not in checkpoints or sampler not in args.samplers:
            raise ValueError(
                f"--baseline/--candidate {curve!r} is not a curve of this sweep: use `<checkpoint label> / <sampler>` "
                f"with a label of {sorted(checkpoints)} and a sampler of {args.samplers}"
            )
    for label, path in checkpoints.items():
        _check_sweep_checkpoint(label, path)  # before anything is written or sampled
    num_references = args.num_references or args.num_samples
    if num_references != args.num_samples:
        logger.warning("MAUVE compares %d references with %d samples per cell", num_references, args.num_samples)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    suite = MetricSuite(args)
    metric_settings = suite.settings()
    atomic_write_json(output_dir / "sweep_config.json", {key: value for key, value in asdict(args).items()})

    cell_results, references, generation = [], None, None
    cells = [(label, sampler, steps) for label in checkpoints for sampler in args.samplers for steps in args.steps]
    loaded = None
    for label, sampler, steps in tqdm(cells, desc="sweep cells"):
        if loaded is None or loaded[0] != label:
            loaded = (label, *_load_checkpoint(checkpoints[label], args))
        _, model, tokenizer, pipe = loaded
        seq_len = args.seq_len or int(model.config.max_position_embeddings)
        if references is None:
            references = _reference_bundle(args, suite, tokenizer, seq_len, num_references)
        _, reference_features, _ = references

        cell_dir = output_dir / "cells" / _slug(label) / _slug(sampler) / f"T{steps}"
        pipeline_kwargs, effective_knobs = _sampler_knobs(pipe, sampler, args)
        generation = {
            "checkpoint": label,
            "checkpoint_path": checkpoints[label],
            "sampler": sampler,
            "sampler_kwargs": args.parsed_sampler_kwargs.get(sampler, {}),
            "sampler_knobs": {**effective_knobs, "num_steps": steps},
            "num_steps": steps,
            "num_samples": args.num_samples,
            "seq_len": seq_len,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "top_p": args.top_p,
            "nucleus_rule": args.nucleus_rule,
            "dtype": args.dtype,
        }
        results_path = cell_dir / "results.json"
        if results_path.exists():
            previous = read_json(results_path)
            if previous.get("metric_settings") == metric_settings and previous.get("generation") == generation:
                cell_results.append(previous)
                continue
        records = generate_cell_samples(pipe, tokenizer, cell_dir, generation, pipeline_kwargs)
        texts = [record["text"] for record in records]
        mauve_result, frechet = suite.mauve(reference_features, texts)
        nfe = [record["nfe"] for record in records]
        results = {
            "checkpoint": label,
            "sampler": sampler,
            "num_steps": steps,
            "num_samples": len(records),
            "nfe_mean": float(np.mean(nfe)),
            "nfe_min": int(min(nfe)),
            "nfe_max": int(max(nfe)),
            "mauve": mauve_result,
            "frechet_distance": frechet,
            "gen_ppl": suite.gen_ppl(texts),
            "entropy": compute_unigram_entropy([record["token_ids"] for record in records]).to_dict(),
            "generation": generation,
            "metric_settings": metric_settings,
        }
        atomic_write_json(results_path, results)
        cell_results.append(results)

    reference_metrics = references[2]
    scores = ("mauve", "mauve_std", "mauve_per_seed", "mauve_star", "frontier_integral")
    mauve_settings = {key: value for key, value in cell_results[0]["mauve"].items() if key not in scores}
    mauve_settings["num_references"] = reference_metrics["num_references"]
    report = {
        "rows": [_cell_row(results) for results in cell_results],
        "references": {
            "source": args.reference_source,
            "split": resolve_reference_split(args.reference_source, args.reference_split),
            "format": args.reference_format,
            "num_references": reference_metrics["num_references"],
            "gen_ppl": reference_metrics["gen_ppl"],
            "entropy": reference_metrics["entropy"],
        },
        "mauve_settings": mauve_settings,
        "judge": reference_metrics["judge"],
        "judge_max_length": args.judge_max_length,
        "generation": {key: generation[key] for key in ("num_samples", "seq_len", "batch_size", "seed", "top_p", "nucleus_rule")},
        "sampler_kwargs": args.parsed_sampler_kwargs,
        "checkpoints": checkpoints,
    }
    return _write_reports(args, report)


def main(argv: list[str] | None = None) -> int:
    """``dsl-evaluate``: run a step-budget sweep (see ``dsl-evaluate --help``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(SweepArguments).parse_args_into_dataclasses(args=argv)
    report = run_sweep(args)
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
