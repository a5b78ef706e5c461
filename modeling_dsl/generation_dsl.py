"""`model.generate` for the DSL denoiser: a `GenerationConfig` that names a sampler and its knobs, and a mixin that
lays out the sequence, builds the sampler and runs it. The sampling math lives in the samplers'
modules (`samplers.py`, the registry, and its siblings by family); this file only routes to it, and the modeling
file only inherits the mixin (as transformers' DiffusionGemma does).

Why the samplers sit next to the modeling files: a model saved with `save_pretrained` carries its code as remote code,
and transformers copies the modeling file together with the files it imports relatively (`from .x import`), all into
one flat folder. `modeling_dsl.py` imports this file, this file imports `samplers.py` and that one its siblings
(`sampling_utils.py`, `samplers_discrete.py`, `samplers_continuous.py`, `samplers_hybrid.py`), so they all (with
`configuration_dsl.py`) travel together and `AutoModel.from_pretrained(folder, trust_remote_code=True).generate(...)`
works without this library. In-library the same relative imports resolve inside `dsl_diffusion.modeling_dsl`.

This file travels as remote code: it imports only torch, transformers and its flat siblings.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.utils import ModelOutput, cached_file, logging

from .samplers import SAMPLERS, get_sampler, resolve_sampler_name, sampler_knobs


logger = logging.get_logger(__name__)

LEGACY_GENERATION_CONFIG_NAME = "diffusion_generation_config.json"
# Every knob of every sampler (a config may store knobs of several samplers; each applies where it exists).
ALL_SAMPLER_KNOBS = tuple(sorted({knob for name in SAMPLERS for knob in sampler_knobs(name)}))
# What a generation config holds besides the sampler and its knobs.
LENGTH_AND_FORMAT_FIELDS = ("max_length", "max_new_tokens", "num_return_sequences", "return_dict_in_generate")
SPECIAL_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# Options of a `generate` call that describe the run, not the sampling distribution: never stored in a config.
RUN_OPTIONS = ("return_trajectory", "return_confidences", "progress_bar", "synced_gpus", "snr_grid")
CONFIG_FIELDS = ("sampler", *LENGTH_AND_FORMAT_FIELDS, *SPECIAL_TOKEN_FIELDS, *ALL_SAMPLER_KNOBS)


@dataclass
class DSLGenerateOutput(ModelOutput):
    """Output of [`DSLGenerationMixin.generate`] (like transformers' `GenerateDecoderOnlyOutput`).

    Args:
        sequences: `[batch * num_return_sequences, length]` the generated ids, prompt and fixed tokens included
            (no `[MASK]` left; left padding unchanged).
        nfe: number of real network forward passes of the run.
        trajectory: with `return_trajectory=True`, one `[batch, length]` draft per sampler step (on CPU, `[MASK]`
            where still masked); the last draft equals `sequences`.
        confidences: with `return_confidences=True`, `[batch, length]` float32: the probability each token had
            under the sampling distribution when it was (last) decoded; 1 for fixed tokens, 0 for padding.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    trajectory: tuple[torch.LongTensor, ...] | None = None
    confidences: torch.FloatTensor | None = None


class DSLGenerationConfig(GenerationConfig):
    """Generation defaults of a DSL model, saved as `generation_config.json` next to the weights.

    Holds the sampler's name and any of its knobs, flat (one attribute per knob), plus the length and output fields
    of transformers' `GenerationConfig`. Like DiffusionGemma's config it does not call `GenerationConfig.__init__`:
    the autoregressive options (beams, caches, repetition penalties, ...) do not apply to a masked-diffusion sampler,
    and an unknown field is an error rather than a silently stored attribute. A field left `None` is unset and takes
    the next default in line: the `generate` call's kwargs > this config > `default_generation_params()`.

    Args:
        sampler: "mdlm", "remdm" (or "remdm-cap" / "-rescale" / "-conf" / "-loop" / "-rescore", which set
            `strategy`), "dsl-sde", "hybrid", "roar", "confidence".
        max_length: total length of a generated sequence, prompt included. max_new_tokens: positions to generate
            after the prompt instead. Neither: a prompt with `[MASK]`s fills only those, otherwise the sequence runs
            to the model's `max_position_embeddings`.
        num_return_sequences: samples per input row.
        do_sample, temperature, top_k, top_p, nucleus_rule: the categorical draw (see `sampling_utils.SamplingConfig`):
            `top_p` keeps the smallest set of mass >= p, as in transformers, unless `nucleus_rule="mdlm"` (the
            published MDLM / ReMDM rule: mass <= p).
        return_dict_in_generate: True (default) returns a [`DSLGenerateOutput`], False the sequences only.
        **knobs: any sampler knob (`num_steps`, `eta`, `strategy`, `snr_schedule`, ...).

    Example:
        >>> DSLGenerationConfig(sampler="remdm-loop", num_steps=1024, top_p=0.9, nucleus_rule="mdlm")
    """

    def __init__(self, **kwargs):
        for name in CONFIG_FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        # Metadata that transformers writes and reads back.
        self._commit_hash = kwargs.pop("_commit_hash", None)
        self._from_model_config = kwargs.pop("_from_model_config", None)
        self.transformers_version = kwargs.pop("transformers_version", None)
        if kwargs:
            raise ValueError(
                f"{sorted(kwargs)} are not fields of {type(self).__name__}; accepted: the sampler, "
                f"{sorted(LENGTH_AND_FORMAT_FIELDS + SPECIAL_TOKEN_FIELDS)} and the sampler knobs {list(ALL_SAMPLER_KNOBS)}."
            )
        self.validate()

    # -- validation ---------------------------------------------------------------------------------------------

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None, **unused):
        """Check every set field now (not at the first call): the sampler name, the lengths, and the knobs of the
        chosen sampler (by building it). A sampler alias ("remdm-loop") becomes its name plus the knob it implies."""
        if self.sampler is not None:
            canonical, implied = resolve_sampler_name(self.sampler)
            self.sampler = canonical
            for name, value in implied.items():
                setattr(self, name, value)
        for name in ("max_length", "max_new_tokens", "num_return_sequences"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if self.max_length is not None and self.max_new_tokens is not None:
            raise ValueError(
                f"max_length={self.max_length} and max_new_tokens={self.max_new_tokens} are both set; pass one."
            )
        if self.return_dict_in_generate is not None and not isinstance(self.return_dict_in_generate, bool):
            raise ValueError(f"return_dict_in_generate={self.return_dict_in_generate!r} must be True or False.")
        self.build_sampler()

    # -- what a run uses ----------------------------------------------------------------------------------------

    @staticmethod
    def default_generation_params() -> dict[str, Any]:
        """Defaults for fields left unset by the call and the model's config: ReMDM-cap with T = 128 steps, sampled
        from the full distribution (the published OWT nucleus, top-p 0.9 with `nucleus_rule="mdlm"`, is in
        [`published_defaults`] and in the configs that `dsl-push` and `dsl-evaluate` write)."""
        return {"sampler": "remdm", "strategy": "cap", "num_steps": 128, "num_return_sequences": 1,
                "return_dict_in_generate": True}  # fmt: skip

    @classmethod
    def published_defaults(cls) -> DSLGenerationConfig:
        """ReMDM-cap, T = 128, top-p 0.9 under the published MDLM / ReMDM nucleus rule: the OWT setting for T < 1024.
        eta is left to the strategy's published default (0.04 for cap, 0.02 for loop)."""
        return cls(sampler="remdm", strategy="cap", num_steps=128, top_p=0.9, nucleus_rule="mdlm")

    def sampler_name(self) -> str:
        return self.sampler if self.sampler is not None else self.default_generation_params()["sampler"]

    def knobs_for(self, sampler: str | None = None) -> dict:
        """The set (non-None) knobs that `sampler` (default: this config's) has."""
        accepted = sampler_knobs(sampler or self.sampler_name())
        return {name: getattr(self, name) for name in accepted if getattr(self, name) is not None}

    def build_sampler(self, sampler: str | None = None):
        """The sampler this config describes (or `sampler`, with the knobs of this config that it has)."""
        return get_sampler(sampler or self.sampler_name(), **self.knobs_for(sampler))

    # -- transformers plumbing ----------------------------------------------------------------------------------

    def to_diff_dict(self) -> dict[str, Any]:
        """The set fields only (None means unset), so `generation_config.json` lists what was chosen."""
        return {key: value for key, value in self.to_dict().items() if value is not None}

    def get_generation_mode(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no autoregressive generation mode: it names a sampler.")

    @classmethod
    def from_model_config(cls, model_config) -> DSLGenerationConfig:
        """The special-token ids of the model config; everything else stays unset."""
        config_dict = model_config if isinstance(model_config, dict) else model_config.to_dict()
        config = cls(**{name: config_dict.get(name) for name in SPECIAL_TOKEN_FIELDS})
        config._original_object_hash = hash(config)
        return config

    @classmethod
    def from_legacy_dict(cls, legacy: dict) -> DSLGenerationConfig:
        """Read a `diffusion_generation_config.json` (the format before this class): its `top_p` meant the MDLM
        rule, so that rule is kept explicitly."""
        legacy = dict(legacy)
        if legacy.get("top_p") is not None:
            legacy.setdefault("nucleus_rule", "mdlm")
        return cls(**legacy)

    @classmethod
    def from_model_folder(cls, pretrained_model_name_or_path, **hub_kwargs) -> DSLGenerationConfig | None:
        """`generation_config.json` of a folder or Hub repo, else its legacy `diffusion_generation_config.json`,
        else None."""
        try:
            return cls.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except OSError:
            pass
        path = cached_file(
            pretrained_model_name_or_path,
            LEGACY_GENERATION_CONFIG_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{key: value for key, value in hub_kwargs.items() if not key.startswith("_")},
        )
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            return cls.from_legacy_dict(json.load(f))


class DSLGenerationMixin:
    """`generate` for a DSL / masked-diffusion denoiser; routes every call to a sampler of the `samplers.py` registry."""

    generation_config_class = DSLGenerationConfig

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: DSLGenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        streamer=None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        callback_on_step_end: Callable | None = None,
        **kwargs,
    ) -> DSLGenerateOutput | torch.LongTensor:
        r"""Generate with a sampler (MDLM, ReMDM, DSL-SDE, hybrid, ROAR).

        Args:
            input_ids: `[batch, length]` prompts. Without `[MASK]`, the prompt is a prefix and `max_new_tokens` (or
                `max_length - length`) `[MASK]`s are appended; with `[MASK]`s and no length given, only those are
                generated (infilling). None: `batch` = 1 unconditional row of `max_new_tokens` / `max_length` /
                `max_position_embeddings` positions.
            attention_mask: `[batch, length]`, 0 at left padding.
            generation_config: defaults for this call (default: `model.generation_config`).
            logits_processor: a `LogitsProcessorList` applied to the per-position scores before every categorical
                draw; it receives, for each position drawn, its row's current ids `[N, length]` and its scores
                `[N, V]` (float64).
            streamer: transformers' streamer protocol: `put(prompt_ids)` first, `put_draft(value=draft)` once per
                sampler step when the streamer has it (DiffusionGemma's `TextDiffusionStreamer`), then
                `put(generated_ids)` and `end()`.
            generator: a `torch.Generator` for the whole batch, or one per output row (`batch *
                num_return_sequences`), which makes each row independent of the others.
            seed: an int (output row r draws from a generator seeded with `seed + r`) or one seed per output row.
                With `do_sample=False` and neither seed nor generator, seed 0 is used, so that a greedy call is
                deterministic (the samplers' unmasking order and the SDE's noise are random even when every token
                is the argmax).
            callback_on_step_end: `callback_on_step_end(model, step_index, callback_kwargs)` after every step, as in
                diffusers; `callback_kwargs` holds `tokens` (the draft) and `state` (the sampler state).
            kwargs: `sampler`, any sampler knob, any field of [`DSLGenerationConfig`] (`max_new_tokens`, `do_sample`,
                `temperature`, `top_k`, `top_p`, `nucleus_rule`, ...), and the run options `return_trajectory`,
                `return_confidences`, `progress_bar` (default False), `synced_gpus`, `snr_grid` (the SDE's grid).

        Returns:
            a [`DSLGenerateOutput`], or the sequences alone with `return_dict_in_generate=False`.
        """
        run_options = {name: kwargs.pop(name) for name in RUN_OPTIONS if name in kwargs}
        run_options.setdefault("progress_bar", False)
        config, explicit = self._prepare_generation_config(generation_config, kwargs)
        sampler = self._prepare_sampler(config, explicit)
        if logits_processor is not None and not isinstance(logits_processor, LogitsProcessorList):
            logits_processor = LogitsProcessorList(logits_processor)

        tokens, attention_mask, prompt_length = self._prepare_sequences(input_ids, attention_mask, config)
        num_return_sequences = config.num_return_sequences
        if num_return_sequences > 1:
            tokens = tokens.repeat_interleave(num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        generator = self._prepare_generators(generator, seed, tokens.shape[0], tokens.device, config)

        if streamer is not None and input_ids is not None:
            streamer.put(input_ids.cpu())
        output = sampler.run(
            self,
            tokens,
            None if bool(attention_mask.all()) else attention_mask,
            generator=generator,
            callback=self._step_callback(callback_on_step_end),
            logits_processor=logits_processor,
            streamer=streamer,
            **run_options,
        )
        if streamer is not None:
            streamer.put(output.sequences[:, prompt_length:].cpu())
            streamer.end()
        if not config.return_dict_in_generate:
            return output.sequences
        return DSLGenerateOutput(
            sequences=output.sequences,
            nfe=output.nfe,
            trajectory=tuple(output.trajectory) if output.trajectory is not None else None,
            confidences=output.confidences,
        )

    # -- the steps of generate ----------------------------------------------------------------------------------

    def _prepare_generation_config(self, generation_config, kwargs) -> tuple[DSLGenerationConfig, set[str]]:
        """The call's config: kwargs > `generation_config` > `self.generation_config` > the global defaults.
        Returns it with the names the call set explicitly."""
        base = generation_config if generation_config is not None else getattr(self, "generation_config", None)
        if base is not None and not isinstance(base, DSLGenerationConfig):
            # e.g. a plain GenerationConfig(max_new_tokens=...): keep the fields a DSL config has.
            base = DSLGenerationConfig(
                **{key: value for key, value in base.to_dict().items() if key in CONFIG_FIELDS and value is not None}
            )
        config = copy.deepcopy(base) if base is not None else DSLGenerationConfig()
        model_config = getattr(self, "generation_config", None)
        if generation_config is not None and isinstance(model_config, DSLGenerationConfig):
            # What the given config leaves unset comes from the model's (a length only if it sets none).
            stored = model_config.to_diff_dict()
            if config.max_length is not None or config.max_new_tokens is not None:
                stored = {key: value for key, value in stored.items() if key not in ("max_length", "max_new_tokens")}
            config.update(defaults_only=True, **{key: value for key, value in stored.items() if key in CONFIG_FIELDS})
        if "max_length" in kwargs and kwargs["max_length"] is not None:
            config.max_new_tokens = None  # the call's length replaces the stored one
        if "max_new_tokens" in kwargs and kwargs["max_new_tokens"] is not None:
            config.max_length = None
        unused = config.update(**kwargs)
        if unused:
            accepted = sorted({"sampler", *LENGTH_AND_FORMAT_FIELDS, *ALL_SAMPLER_KNOBS, *RUN_OPTIONS})
            raise ValueError(f"generate() got unexpected arguments {sorted(unused)}; accepted: {accepted}.")
        config.update(defaults_only=True, **config.default_generation_params())
        return config, set(kwargs)

    def _prepare_sampler(self, config: DSLGenerationConfig, explicit: set[str]):
        name = config.sampler_name()
        ignored = sorted((explicit & set(ALL_SAMPLER_KNOBS)) - set(sampler_knobs(name)))
        if ignored:
            logger.warning(f"{ignored} are not knobs of sampler {name!r} and are ignored.")
        return config.build_sampler()

    def _prepare_sequences(self, input_ids, attention_mask, config) -> tuple[torch.LongTensor, torch.Tensor, int]:
        """(tokens with `[MASK]` where to generate, attention mask, index of the first appended position)."""
        mask_token_id = self.config.mask_token_id
        device = self.device
        if input_ids is None:
            if attention_mask is not None:
                raise ValueError("attention_mask needs input_ids: unconditional generation has no padding.")
            length = config.max_new_tokens or config.max_length or self.config.max_position_embeddings
            tokens = torch.full((1, length), mask_token_id, dtype=torch.long, device=device)
            return tokens, torch.ones_like(tokens), 0
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a LongTensor of shape [batch, length], got {input_ids!r:.80}.")
        input_ids = input_ids.to(device)
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids has {[batch, length]}.")
        attention_mask = attention_mask.to(device)
        if config.max_new_tokens is not None:
            num_new = config.max_new_tokens
        elif config.max_length is not None:
            num_new = config.max_length - length
            if num_new < 0:
                raise ValueError(
                    f"the input has {length} positions, more than max_length={config.max_length}: shorten it or "
                    "raise max_length."
                )
        elif bool((input_ids == mask_token_id).any()):
            num_new = 0  # infilling: only the [MASK]s
        else:
            num_new = max(self.config.max_position_embeddings - length, 0)
        tokens = torch.cat([input_ids, input_ids.new_full((batch, num_new), mask_token_id)], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, num_new))], dim=1)
        if not bool(((tokens == mask_token_id) & attention_mask.bool()).any()):
            raise ValueError("nothing to generate: give max_new_tokens > 0, max_length > the input length, or [MASK]s.")
        return tokens, attention_mask, length

    def _step_callback(self, callback_on_step_end):
        """The sampler's `callback(step_index, state)` calling `callback_on_step_end(model, step_index, kwargs)`,
        the diffusers signature."""
        if callback_on_step_end is None:
            return None
        if not callable(callback_on_step_end):
            raise TypeError(
                f"callback_on_step_end must be callable as callback_on_step_end(model, step_index, callback_kwargs), "
                f"got {type(callback_on_step_end).__name__}."
            )
        return lambda step_index, state: callback_on_step_end(self, step_index, {"tokens": state.tokens, "state": state})

    @staticmethod
    def _prepare_generators(generator, seed, num_rows: int, device, config):
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both.")
        if seed is None and generator is None and config.do_sample is False:
            seed = 0
        if seed is None:
            return generator
        seeds = [seed + row for row in range(num_rows)] if isinstance(seed, int) else list(seed)
        if len(seeds) != num_rows or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise ValueError(
                f"seed={seed!r} must be an integer >= 0 or one such integer per output row ({num_rows} rows)."
            )
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    # -- loading ------------------------------------------------------------------------------------------------

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             cache_dir=None, force_download=False, proxies=None, local_files_only=False, token=None,
                             revision=None, subfolder="", trust_remote_code=None, **kwargs):  # fmt: skip
        """Called by `from_pretrained`: set the model's generation config from `generation_config=` or the folder's
        `generation_config.json` (else its legacy `diffusion_generation_config.json`)."""
        if generation_config is not None:
            self.generation_config = DSLGenerationConfig.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        hub_kwargs = dict(cache_dir=cache_dir, force_download=force_download, proxies=proxies,
                          local_files_only=local_files_only, token=token, revision=revision, subfolder=subfolder)  # fmt: skip
        loaded = DSLGenerationConfig.from_model_folder(pretrained_model_name_or_path, **hub_kwargs)
        if loaded is not None:
            self.generation_config = loaded


__all__ = ["DSLGenerationConfig", "DSLGenerationMixin", "DSLGenerateOutput", "LEGACY_GENERATION_CONFIG_NAME"]
