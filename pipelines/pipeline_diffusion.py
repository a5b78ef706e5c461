"""The `diffusion-text-generation` pipeline: text from a masked-diffusion / DSL denoiser with any sampler of
`samplers.py` (MDLM, ReMDM cap / rescale / conf / loop, DSL-SDE, hybrid, ROAR).

This file travels to the Hugging Face Hub as remote code (with `samplers.py`), so that
`pipeline(model=repo_or_folder, trust_remote_code=True)` works without the `dsl_diffusion` library: it imports only
torch, transformers and the standard library.

    >>> pipe = pipeline("diffusion-text-generation", model=model, tokenizer=tokenizer)   # after import dsl_diffusion.pipelines
    >>> pipe(None, sampler="remdm", strategy="loop", num_steps=1024, top_p=0.9, max_length=1024, seed=1)
    [{'generated_text': '...', 'nfe': 1024}]
    >>> pipe.save_pretrained(folder)  # model, tokenizer, this code, samplers.py, diffusion_generation_config.json
    >>> pipeline(model=folder, trust_remote_code=True)  # anywhere, without the library

A saved folder names its own copy of this code in `config.custom_pipelines`, and transformers then insists on
that remote code when the folder is loaded by path; in-library, pass
`pipeline_class=DiffusionTextGenerationPipeline` to use the installed class instead.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoModel, Pipeline
from transformers.utils import PushToHubMixin, cached_file, logging

from ..modeling_dsl.samplers import SAMPLERS, get_sampler, resolve_sampler_name, sampler_knobs


logger = logging.get_logger(__name__)

TASK = "diffusion-text-generation"
DIFFUSION_GENERATION_CONFIG_NAME = "diffusion_generation_config.json"
# Every knob of every sampler: a call may name any of them (those the chosen sampler lacks are ignored, with a warning).
ALL_SAMPLER_KNOBS = sorted({knob for name in SAMPLERS for knob in sampler_knobs(name)})
# Settings a generation config may store besides the sampler knobs.
GENERATION_SETTINGS = ("max_length",)


class DiffusionGenerationConfig(PushToHubMixin):
    """Sampler defaults stored with a model, in the spirit of `transformers.GenerationConfig`.

    Saved as `diffusion_generation_config.json` next to the weights; the pipeline loads it from the model folder or
    Hub repo and every call can override it. A knob the chosen sampler lacks is kept (it applies when a call picks
    a sampler that has it).

    Args:
        sampler: a sampler name (see `samplers.SAMPLERS`, or "remdm-<strategy>").
        max_length: default sequence length (None = the model's `max_position_embeddings`).
        **knobs: sampler knobs (`num_steps`, `eta`, `top_p`, ...).

    Example:
        >>> DiffusionGenerationConfig(sampler="remdm", strategy="loop", eta=0.02, num_steps=1024).save_pretrained(folder)
    """

    def __init__(self, sampler: str = "remdm", max_length: int | None = None, **knobs):
        canonical, implied = resolve_sampler_name(sampler)
        unknown = sorted(set(knobs) - set(ALL_SAMPLER_KNOBS))
        if unknown:
            raise ValueError(f"{unknown} are not sampler knobs; accepted: {ALL_SAMPLER_KNOBS}.")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length={max_length!r} must be an integer >= 1.")
        self.sampler = canonical
        self.max_length = max_length
        self.knobs = {**knobs, **implied}
        self.build_sampler()  # validate the knobs of the chosen sampler now, not at the first call

    @classmethod
    def published_defaults(cls) -> DiffusionGenerationConfig:
        """ReMDM-cap, top-p 0.9, T = 128 steps: the published OWT setting for T < 1024. eta is left to the
        strategy's published default (0.04 for cap, 0.02 for loop), so a call that switches strategy gets its own."""
        return cls(sampler="remdm", strategy="cap", top_p=0.9, num_steps=128)

    def knobs_for(self, sampler: str) -> dict:
        """The stored knobs that `sampler` has."""
        accepted = set(sampler_knobs(sampler))
        return {name: value for name, value in self.knobs.items() if name in accepted}

    def build_sampler(self, sampler: str | None = None, **overrides):
        """A sampler built from the stored knobs, overridden by `overrides` (which must all be its knobs)."""
        name = sampler or self.sampler
        canonical, implied = resolve_sampler_name(name)
        return get_sampler(canonical, **{**self.knobs_for(canonical), **overrides, **implied})

    def to_dict(self) -> dict:
        config = {"sampler": self.sampler, **self.knobs}
        if self.max_length is not None:
            config["max_length"] = self.max_length
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other):
        return isinstance(other, DiffusionGenerationConfig) and self.to_dict() == other.to_dict()

    def update(self, **kwargs) -> DiffusionGenerationConfig:
        """A copy with `kwargs` (sampler, max_length or knobs) changed."""
        return type(self)(**{**self.to_dict(), **kwargs})

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Write `diffusion_generation_config.json` in `save_directory` (`push_to_hub(repo_id)` uploads it; other
        keyword arguments, such as the `max_shard_size` that `push_to_hub` passes, do not apply and are ignored)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={str(save_directory)!r} is a file, expected a folder.")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, DIFFUSION_GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> DiffusionGenerationConfig:
        """Load from a folder or a Hub repo; raises OSError if it has no `diffusion_generation_config.json`."""
        config = cls.from_model_folder(pretrained_model_name_or_path, **hub_kwargs)
        if config is None:
            raise OSError(f"{pretrained_model_name_or_path!r} has no {DIFFUSION_GENERATION_CONFIG_NAME}.")
        return config

    @classmethod
    def from_model_folder(cls, pretrained_model_name_or_path, **hub_kwargs) -> DiffusionGenerationConfig | None:
        """Like `from_pretrained`, but None when the folder or repo has no generation config."""
        path = cached_file(
            pretrained_model_name_or_path,
            DIFFUSION_GENERATION_CONFIG_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


class DiffusionTextGenerationPipeline(Pipeline):
    """Generate text with a masked-diffusion / DSL denoiser.

    Inputs: `None` (unconditional), a prompt string or a list of them. A prompt is a fixed prefix; if it contains
    the tokenizer's mask token (e.g. `"The [MASK] [MASK] sat"`), only those positions are generated (infilling).

    Call parameters:
        sampler: "mdlm", "remdm" (or "remdm-cap" / "-rescale" / "-conf" / "-loop"), "dsl-sde", "hybrid", "roar".
        num_steps and every sampler knob (eta, strategy, t_on, t_off, alpha_on, top_p, temperature, use_cache,
            s_hi, snr_schedule, snr_min, snr_max, lognormal_mean, lognormal_std, continuous_steps,
            snr_star, commit_rule, commit_threshold, commit_fraction, commit_mode, discrete_strategy, discrete_t_start,
            t_min).
            Defaults come from the model's `diffusion_generation_config.json` (else
            `DiffusionGenerationConfig.published_defaults()`).
        max_length: total sequence length, prompt included (default: the model's `max_position_embeddings`).
        max_new_tokens: instead of `max_length`, the number of positions to generate after the prompt (a batch of
            prompts of different lengths is then left-padded).
        num_return_sequences: samples per prompt. batch_size: sequences per sampler run.
        seed: sequence r of the call (prompt i, sample j: r = i * num_return_sequences + j) uses a generator seeded
            with seed + r, so results do not depend on batch_size. generator: a torch.Generator that draws the base
            seed. Neither: the base seed comes from torch's global RNG.
        return_trajectory, return_confidences, return_tensors, return_text, return_full_text,
            skip_special_tokens (default False: the evaluation protocol decodes special tokens),
            clean_up_tokenization_spaces, add_special_tokens (when tokenizing prompts, default False),
            progress_bar, callback (`callback(step_index, state)`), synced_gpus.

    Returns, per prompt, a list of dicts: `generated_text`, `nfe` (network calls of the run that produced it), and
    on request `generated_token_ids`, `trajectory` (decoded drafts) / `trajectory_token_ids`, `confidences`.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    _preprocess_keys = ("max_length", "max_new_tokens", "add_special_tokens")
    _forward_keys = ("sampler", *ALL_SAMPLER_KNOBS, "return_trajectory", "return_confidences", "progress_bar", "callback", "synced_gpus")
    _postprocess_keys = ("return_tensors", "return_text", "return_full_text", "skip_special_tokens", "clean_up_tokenization_spaces")
    _call_keys = ("num_return_sequences", "seed", "generator")

    def __init__(self, *args, diffusion_generation_config: DiffusionGenerationConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        mask_token_id = getattr(self.model.config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(
                f"the model ({type(self.model).__name__}) has no mask token: its config must set `mask_token_id`, the "
                "[MASK] input id that marks the positions to generate."
            )
        if self.tokenizer is None:
            raise ValueError("this pipeline needs a tokenizer to encode prompts and decode samples.")
        tokenizer_mask = getattr(self.tokenizer, "mask_token_id", None)
        if tokenizer_mask is not None and tokenizer_mask != mask_token_id:
            raise ValueError(
                f"the tokenizer's mask token id {tokenizer_mask} differs from the model's mask_token_id={mask_token_id}."
            )
        self.mask_token_id = mask_token_id
        self.model.eval()  # dropout would break determinism and the output cache
        if diffusion_generation_config is None and self.model.name_or_path:
            diffusion_generation_config = DiffusionGenerationConfig.from_model_folder(self.model.name_or_path)
        self.diffusion_generation_config = diffusion_generation_config or DiffusionGenerationConfig.published_defaults()
        self._call_defaults = {key: kwargs[key] for key in self._call_keys if key in kwargs}

    # -- parameters ---------------------------------------------------------------------------------------------

    def _sanitize_parameters(self, **kwargs):
        accepted = (*self._preprocess_keys, *self._forward_keys, *self._postprocess_keys, *self._call_keys)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unknown}; accepted: {sorted(accepted)}.")
        preprocess = {key: kwargs[key] for key in self._preprocess_keys if key in kwargs}
        forward = {key: kwargs[key] for key in self._forward_keys if key in kwargs}
        postprocess = {key: kwargs[key] for key in self._postprocess_keys if key in kwargs}
        if "sampler" in forward:
            resolve_sampler_name(forward["sampler"])  # fail early with the list of accepted names
        return preprocess, forward, postprocess

    # -- the call -----------------------------------------------------------------------------------------------

    def __call__(self, inputs: str | list[str] | None = None, batch_size: int | None = None, **kwargs):
        """Generate. `inputs`: None (unconditional), a prompt, or a list of prompts. See the class docstring."""
        call_options = {**self._call_defaults, **{key: kwargs.pop(key) for key in self._call_keys if key in kwargs}}
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        batch_size = batch_size if batch_size is not None else (self._batch_size or 1)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
        num_return_sequences = call_options.get("num_return_sequences", 1)
        if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences={num_return_sequences!r} must be an integer >= 1.")

        single = inputs is None or isinstance(inputs, str)
        prompts = [inputs] if single else inputs
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, (str, type(None))) for p in prompts):
            raise TypeError(f"inputs must be None, a string or a non-empty list of strings, got {inputs!r}.")
        base_seed = self._base_seed(call_options.get("seed"), call_options.get("generator"))

        rows = []
        for prompt_index, prompt in enumerate(prompts):
            encoded = self.preprocess(prompt, **preprocess_params)
            for sample_index in range(num_return_sequences):
                row_index = prompt_index * num_return_sequences + sample_index
                rows.append({**encoded, "prompt_index": prompt_index, "seed": base_seed + row_index})

        results = [[] for _ in prompts]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            model_outputs = self.forward(self._collate(chunk), **forward_params)
            for row, record in zip(chunk, self.postprocess(model_outputs, **postprocess_params)):
                results[row["prompt_index"]].append(record)
        return results[0] if single else results

    def _base_seed(self, seed, generator) -> int:
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both.")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seed={seed!r} must be an integer >= 0.")
            return seed
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        device = generator.device if generator is not None else "cpu"
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))

    # -- the three stages ---------------------------------------------------------------------------------------

    def preprocess(self, prompt, max_length=None, max_new_tokens=None, add_special_tokens=False):
        """Tokenize a prompt and lay out the sequence: prompt tokens fixed, `[MASK]` where to generate."""
        if max_length is not None and max_new_tokens is not None:
            raise ValueError("pass either max_length or max_new_tokens, not both.")
        for name, value in (("max_length", max_length), ("max_new_tokens", max_new_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be a non-negative integer.")
        if prompt:
            tokenizer_mask = getattr(self.tokenizer, "mask_token", None)
            if tokenizer_mask is None and "[MASK]" in prompt:
                raise ValueError(
                    "the prompt contains '[MASK]' but the tokenizer has no mask token, so it cannot mark positions "
                    "to infill: add it with tokenizer.add_special_tokens({'mask_token': '[MASK]'}) (it must get id "
                    f"{self.mask_token_id})."
                )
            prompt_ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        else:
            prompt_ids = []
        is_infilling = self.mask_token_id in prompt_ids

        model_length = getattr(self.model.config, "max_position_embeddings", None)
        if max_new_tokens is not None:
            num_new = max_new_tokens
        else:
            if max_length is None:
                max_length = self.diffusion_generation_config.max_length
            if max_length is None and not is_infilling:
                max_length = model_length
            if max_length is None:
                num_new = 0
            else:
                num_new = max_length - len(prompt_ids)
                if num_new < 0:
                    raise ValueError(
                        f"the prompt has {len(prompt_ids)} tokens, more than the sequence length max_length={max_length}: "
                        "shorten the prompt or raise max_length."
                    )
        input_ids = prompt_ids + [self.mask_token_id] * num_new
        if self.mask_token_id not in input_ids:
            raise ValueError("nothing to generate: give max_length > prompt length, max_new_tokens > 0 or [MASK]s.")
        if model_length is not None and len(input_ids) > model_length:
            logger.warning_once(
                f"generating {len(input_ids)} tokens, more than the model's max_position_embeddings={model_length}."
            )
        # `return_full_text=False` returns the text from the first generated position on.
        first_generated = input_ids.index(self.mask_token_id)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "prompt_length": first_generated}

    def _collate(self, rows: list[dict]) -> dict:
        """Left-pad the rows into one batch and build the per-row generators."""
        width = max(len(row["input_ids"]) for row in rows)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, width - length :] = row["input_ids"]
            attention_mask[index, width - length :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompt_lengths": torch.tensor([row["prompt_length"] for row in rows]),
            "seeds": [row["seed"] for row in rows],
        }

    def _forward(self, model_inputs, sampler=None, return_trajectory=False, return_confidences=False,
                 progress_bar=True, callback=None, synced_gpus=None, **knobs):  # fmt: skip
        sampler_object = self._build_sampler(sampler, knobs)
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in model_inputs["seeds"]]
        attention_mask = model_inputs["attention_mask"]
        output = sampler_object.run(
            self.model,
            model_inputs["input_ids"],
            None if bool(attention_mask.all()) else attention_mask,
            generator=generators,
            callback=callback,
            return_trajectory=return_trajectory,
            return_confidences=return_confidences,
            progress_bar=progress_bar,
            synced_gpus=synced_gpus,
        )
        return {
            "sequences": output.sequences,
            "attention_mask": attention_mask,
            "prompt_lengths": model_inputs["prompt_lengths"],
            "nfe": output.nfe,
            "trajectory": torch.stack(output.trajectory, dim=1) if return_trajectory else None,
            "confidences": output.confidences,
        }

    def _build_sampler(self, sampler, knobs):
        config = self.diffusion_generation_config
        name = sampler or config.sampler
        canonical, _ = resolve_sampler_name(name)
        accepted = set(sampler_knobs(canonical))
        ignored = sorted(set(knobs) - accepted)
        if ignored:
            logger.warning(f"{ignored} are not knobs of sampler {canonical!r} and are ignored.")
        return config.build_sampler(name, **{key: value for key, value in knobs.items() if key in accepted})

    def postprocess(self, model_outputs, return_tensors=False, return_text=True, return_full_text=True,
                    skip_special_tokens=False, clean_up_tokenization_spaces=None):  # fmt: skip
        decode = dict(skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up_tokenization_spaces)
        records = []
        for row, sequence in enumerate(model_outputs["sequences"]):
            valid = model_outputs["attention_mask"][row].bool()
            tokens = sequence[valid]
            start = 0 if return_full_text else int(model_outputs["prompt_lengths"][row])
            record = {}
            if return_text:
                record["generated_text"] = self.tokenizer.decode(tokens[start:].tolist(), **decode)
            if return_tensors:
                record["generated_token_ids"] = tokens[start:]
            record["nfe"] = model_outputs["nfe"]
            if model_outputs["trajectory"] is not None:
                drafts = model_outputs["trajectory"][row][:, valid]
                record["trajectory"] = [self._decode_draft(draft[start:].tolist(), decode) for draft in drafts]
                if return_tensors:
                    record["trajectory_token_ids"] = drafts[:, start:]
            if model_outputs["confidences"] is not None:
                confidences = model_outputs["confidences"][row][valid][start:]
                record["confidences"] = confidences if return_tensors else confidences.tolist()
            records.append(record)
        return records

    def _decode_draft(self, ids: list[int], decode_kwargs: dict) -> str:
        """Decode a draft that may hold `[MASK]` ids, even with a tokenizer that has no mask token."""
        if getattr(self.tokenizer, "mask_token_id", None) is not None:
            return self.tokenizer.decode(ids, **{**decode_kwargs, "skip_special_tokens": False})
        pieces, run = [], []
        for token in ids + [None]:
            if token is None or token == self.mask_token_id:
                if run:
                    pieces.append(self.tokenizer.decode(run, **decode_kwargs))
                    run = []
                if token is not None:
                    pieces.append("[MASK]")
            else:
                run.append(token)
        return "".join(pieces)

    # -- saving -------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Save the model, tokenizer and `diffusion_generation_config.json`; the model config gets
        `custom_pipelines` and the folder this file and `samplers.py`, so that
        `pipeline(model=folder, trust_remote_code=True)` works without the library."""
        if not hasattr(type(self), "_registered_impl"):
            # Loaded as remote code, the class was never registered: describe it the way PIPELINE_REGISTRY would.
            type(self)._registered_impl = {TASK: {"impl": type(self), "pt": (AutoModel,)}}
        super().save_pretrained(save_directory, **kwargs)
        self.diffusion_generation_config.save_pretrained(save_directory)


__all__ = ["DiffusionTextGenerationPipeline", "DiffusionGenerationConfig", "TASK", "DIFFUSION_GENERATION_CONFIG_NAME"]
