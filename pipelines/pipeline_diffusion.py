"""The `diffusion-text-generation` pipeline: text from a masked-diffusion / DSL denoiser through `model.generate`.

This file travels to the Hugging Face Hub as remote code, so that `pipeline(model=repo_or_folder,
trust_remote_code=True)` works without the `dsl_diffusion` library: it imports only torch, transformers and the
standard library. It holds no sampler: every row goes to `model.generate` (the model's own remote code carries the
samplers), and the defaults are the model's `generation_config.json`.

    >>> pipe = pipeline("diffusion-text-generation", model=model, tokenizer=tokenizer)   # after import dsl_diffusion.pipelines
    >>> pipe(None, sampler="remdm", strategy="loop", num_steps=1024, top_p=0.9, nucleus_rule="mdlm", seed=1)
    [{'generated_text': '...', 'nfe': 1024}]
    >>> pipe(KeyDataset(dataset, "text"), batch_size=8, max_new_tokens=64, seed=1)   # a stream, as TextGenerationPipeline
    >>> pipe.save_pretrained(folder)  # model (+ its remote code and generation_config.json), tokenizer, this code
    >>> pipeline(model=folder, trust_remote_code=True)  # anywhere, without the library

A saved folder names its own copy of this code in `config.custom_pipelines`, and transformers then insists on
that remote code when the folder is loaded by path; in-library, pass
`pipeline_class=DiffusionTextGenerationPipeline` to use the installed class instead.
"""

from __future__ import annotations

import collections.abc
import copy
import re

import torch
from transformers import AutoModel, Pipeline
from transformers.utils import logging


logger = logging.get_logger(__name__)

TASK = "diffusion-text-generation"
# Text that looks like an infill marker ("[mask]", "[MASK", "MASK]", "< mask >"): once the tokenizer's own mask token
# is removed from a prompt, such a fragment is a typo that would otherwise turn an infill into a continuation.
MALFORMED_MASK_MARKER = re.compile(r"\[\s*mask\w*\s*\]?|\bmask\s*\]|<\s*mask\s*>", re.IGNORECASE)


class NumberedInput:
    """An input and its position in the call: the position, not the batch it lands in, decides its seeds."""

    def __init__(self, index: int, value):
        self.index = index
        self.value = value


class NumberedInputs(torch.utils.data.Dataset):
    """A sized input (list, `KeyDataset`, ...) whose items come with their position (also in DataLoader workers)."""

    def __init__(self, inputs):
        self.inputs = inputs

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return NumberedInput(index, self.inputs[index])


class DiffusionTextGenerationPipeline(Pipeline):
    """Generate text with a masked-diffusion / DSL denoiser: every call runs `model.generate`.

    Inputs: `None` (unconditional), a prompt string, a list of them, a generator, or a `torch` dataset such as
    `KeyDataset(datasets.Dataset, "text")`; `batch_size` and `num_workers` work as in `TextGenerationPipeline`. A
    prompt is a fixed prefix; if it contains the tokenizer's mask token (e.g. `"The [MASK] [MASK] sat"`), only those
    positions are generated (infilling).

    Call parameters:
        sampler, every sampler knob (`num_steps`, `eta`, `strategy`, ...), `do_sample`, `temperature`, `top_k`,
            `top_p`, `nucleus_rule`, `logits_processor`, `streamer`, `callback_on_step_end`, `generation_config`,
            `synced_gpus`, `progress_bar` (default False): passed to `model.generate`, whose defaults are the model's
            `generation_config`.
        max_length: total sequence length, prompt included (default: the generation config's, else the model's
            `max_position_embeddings`). max_new_tokens: instead, the positions to generate after the prompt.
        num_return_sequences: samples per prompt.
        seed: sample j of input i uses a generator seeded with `seed + i * num_return_sequences + j` (the seed
            travels with the row from `preprocess`), so results do not depend on `batch_size` or `num_workers`.
            generator: a torch.Generator that draws the base seed. Neither: each row's seed comes from torch's
            global RNG.
        return_trajectory, return_confidences, return_tensors, return_text, return_full_text,
            skip_special_tokens (default False: the evaluation protocol decodes special tokens),
            clean_up_tokenization_spaces, add_special_tokens (when tokenizing prompts, default False).

    Returns, per input, a list of `num_return_sequences` dicts: `generated_text`, `nfe` (network calls of the run
    that produced it), and on request `generated_token_ids`, `trajectory` (decoded drafts) /
    `trajectory_token_ids`, `confidences`.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    _preprocess_keys = ("max_length", "max_new_tokens", "add_special_tokens", "seed", "num_return_sequences")
    _postprocess_keys = ("return_tensors", "return_text", "return_full_text", "skip_special_tokens", "clean_up_tokenization_spaces")  # fmt: skip
    # Passed to `model.generate` as they are (not generation-config fields).
    _generate_objects = ("logits_processor", "streamer", "callback_on_step_end", "generation_config", "synced_gpus",
                         "progress_bar", "return_trajectory", "return_confidences")  # fmt: skip

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask_token_id = getattr(self.model.config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(
                f"the model ({type(self.model).__name__}) has no mask token: its config must set `mask_token_id`, the "
                "[MASK] input id that marks the positions to generate."
            )
        if not callable(getattr(self.model, "generate", None)) or getattr(self.model, "generation_config", None) is None:
            raise ValueError(f"the model ({type(self.model).__name__}) has no DSL `generate` and `generation_config`.")
        if self.tokenizer is None:
            raise ValueError("this pipeline needs a tokenizer to encode prompts and decode samples.")
        tokenizer_mask = getattr(self.tokenizer, "mask_token_id", None)
        if tokenizer_mask is not None and tokenizer_mask != mask_token_id:
            raise ValueError(
                f"the tokenizer's mask token id {tokenizer_mask} differs from the model's mask_token_id={mask_token_id}."
            )
        self.mask_token_id = mask_token_id
        self.model.eval()  # dropout would break determinism and the output cache

    # -- parameters ---------------------------------------------------------------------------------------------

    def _sanitize_parameters(self, generator=None, **kwargs):
        preprocess = {key: kwargs.pop(key) for key in self._preprocess_keys if key in kwargs}
        postprocess = {key: kwargs.pop(key) for key in self._postprocess_keys if key in kwargs}
        if generator is not None:
            if "seed" in preprocess:
                raise ValueError("pass either seed or generator, not both.")
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
            preprocess["seed"] = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        seed = preprocess.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed={seed!r} must be an integer >= 0.")
        count = preprocess.get("num_return_sequences")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"num_return_sequences={count!r} must be an integer >= 1.")
        forward = {key: kwargs.pop(key) for key in self._generate_objects if key in kwargs}
        # The rest must be generation-config fields (the sampler and its knobs, do_sample, top_k, ...): validate
        # them now, with the model's own config class, instead of at the first forward pass.
        unknown = copy.deepcopy(self.model.generation_config).update(**kwargs)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {sorted(unknown)}; accepted: the generation config's "
                f"fields, {sorted(self._preprocess_keys + self._postprocess_keys + self._generate_objects)} and "
                "generator."
            )
        forward.update(kwargs)
        if "num_return_sequences" in preprocess:
            forward["num_return_sequences"] = preprocess["num_return_sequences"]
        return preprocess, forward, postprocess

    # -- the three stages ---------------------------------------------------------------------------------------

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # Number the inputs, so that each row's seed depends on its position in the call (not on the batch or the
        # DataLoader worker that preprocesses it); everything else is the stock Pipeline iteration.
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1 (inputs per forward pass).")
        if isinstance(inputs, collections.abc.Sized):
            inputs = NumberedInputs(inputs)
        else:
            inputs = (NumberedInput(index, value) for index, value in enumerate(inputs))
        return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params)

    def preprocess(self, prompt, max_length=None, max_new_tokens=None, add_special_tokens=False, seed=None,
                   num_return_sequences=None):  # fmt: skip
        """Tokenize a prompt and lay out the row: the prompt fixed, `[MASK]` where to generate, and its seeds."""
        index = 0
        if isinstance(prompt, NumberedInput):
            index, prompt = prompt.index, prompt.value
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"an input must be None or a string, got {type(prompt).__name__} ({prompt!r:.80}).")
        if max_length is not None and max_new_tokens is not None:
            raise ValueError("pass either max_length or max_new_tokens, not both.")
        for name, value in (("max_length", max_length), ("max_new_tokens", max_new_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be a non-negative integer.")
        if prompt:
            self._check_mask_markers(prompt)
            if getattr(self.tokenizer, "mask_token", None) is None and "[MASK]" in prompt:
                raise ValueError(
                    "the prompt contains '[MASK]' but the tokenizer has no mask token, so it cannot mark positions "
                    "to infill: add it with tokenizer.add_special_tokens({'mask_token': '[MASK]'}) (it must get id "
                    f"{self.mask_token_id})."
                )
            prompt_ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        else:
            prompt_ids = []

        # The row is laid out here (not by generate's max_length), so that prompts of different lengths batch
        # together and each gets its own number of positions.
        generation_config = self.model.generation_config
        model_length = getattr(self.model.config, "max_position_embeddings", None)
        if max_new_tokens is None and max_length is None:
            max_new_tokens, max_length = generation_config.max_new_tokens, generation_config.max_length
        if max_new_tokens is not None:
            num_new = max_new_tokens
        else:
            if max_length is None and self.mask_token_id not in prompt_ids:
                max_length = model_length
            num_new = 0 if max_length is None else max_length - len(prompt_ids)
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
        count = num_return_sequences or 1
        # Sample j of input i: seed + i * count + j. Without a seed, each row draws one from torch's global RNG.
        seeds = [seed + index * count + j for j in range(count)] if seed is not None else torch.randint(0, 2**62, (count,)).tolist()
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "attention_mask": torch.ones((1, len(input_ids)), dtype=torch.long),
            # `return_full_text=False` returns the text from the first generated position on.
            "prompt_length": torch.tensor([input_ids.index(self.mask_token_id)]),
            "seeds": torch.tensor([seeds], dtype=torch.long),
        }

    def _check_mask_markers(self, prompt: str) -> None:
        """Reject a prompt whose would-be infill markers are not the tokenizer's exact mask token."""
        tokenizer_mask = getattr(self.tokenizer, "mask_token", None) or "[MASK]"
        malformed = MALFORMED_MASK_MARKER.search(prompt.replace(tokenizer_mask, " "))
        if malformed:
            raise ValueError(
                f"the prompt contains {malformed.group(0)!r}, which looks like a malformed infill marker: write the "
                f"mask token exactly as {tokenizer_mask!r} (case and brackets included), once per position to fill."
            )

    def _forward(self, model_inputs, num_return_sequences=None, **generate_kwargs):
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        batch_size = input_ids.shape[0]
        count = num_return_sequences or 1
        output = self.model.generate(
            input_ids,
            attention_mask=None if bool(attention_mask.all()) else attention_mask,
            seed=model_inputs["seeds"].reshape(-1).tolist(),
            num_return_sequences=count,
            max_length=None,  # preprocess laid out the row: generate fills its [MASK]s and appends nothing
            max_new_tokens=None,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        # Shape every output [batch, count, ...], so that the stock loader unbatches one input at a time.
        def per_input(tensor):  # noqa: E306
            return tensor.reshape(batch_size, count, *tensor.shape[1:])

        return {
            "sequences": per_input(output.sequences),
            "attention_mask": attention_mask,
            "prompt_lengths": model_inputs["prompt_length"],
            "nfe": torch.full((batch_size,), output.nfe),
            "trajectory": per_input(torch.stack(output.trajectory, dim=1)) if output.trajectory is not None else None,
            "confidences": per_input(output.confidences) if output.confidences is not None else None,
        }

    def postprocess(self, model_outputs, return_tensors=False, return_text=True, return_full_text=True,
                    skip_special_tokens=False, clean_up_tokenization_spaces=None):  # fmt: skip
        # A string such as "no" is truthy: reject it instead of reading it as True.
        for name, flag in (("return_tensors", return_tensors), ("return_text", return_text),
                           ("return_full_text", return_full_text), ("skip_special_tokens", skip_special_tokens)):  # fmt: skip
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        decode = dict(skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up_tokenization_spaces)
        valid = model_outputs["attention_mask"][0].bool()
        start = 0 if return_full_text else int(model_outputs["prompt_lengths"][0])
        records = []
        for sample, sequence in enumerate(model_outputs["sequences"][0]):
            tokens = sequence[valid]
            record = {}
            if return_text:
                record["generated_text"] = self.tokenizer.decode(tokens[start:].tolist(), **decode)
            if return_tensors:
                record["generated_token_ids"] = tokens[start:]
            record["nfe"] = int(model_outputs["nfe"][0])
            if model_outputs["trajectory"] is not None:
                drafts = model_outputs["trajectory"][0][sample][:, valid]
                record["trajectory"] = [self._decode_draft(draft[start:].tolist(), decode) for draft in drafts]
                if return_tensors:
                    record["trajectory_token_ids"] = drafts[:, start:]
            if model_outputs["confidences"] is not None:
                confidences = model_outputs["confidences"][0][sample][valid][start:]
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

    def save_pretrained(self, save_directory, **kwargs):
        """Save the model (its remote code and `generation_config.json` included), the tokenizer and this file as
        the folder's custom pipeline, so that `pipeline(model=folder, trust_remote_code=True)` works without the
        library."""
        if not hasattr(type(self), "_registered_impl"):
            # Loaded as remote code, the class was never registered: describe it the way PIPELINE_REGISTRY would.
            type(self)._registered_impl = {TASK: {"impl": type(self), "pt": (AutoModel,)}}
        super().save_pretrained(save_directory, **kwargs)


__all__ = ["DiffusionTextGenerationPipeline", "TASK"]
