"""`DSLForMaskedDiffusion.generate`, `DSLGenerationConfig` (generation_config.json), the model contract (labels ->
loss, base_model_prefix, the attention registry) and generate through remote code in a fresh process."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, GenerationConfig, LogitsProcessor, LogitsProcessorList

from dsl_diffusion.modeling_dsl import DSLGenerateOutput, DSLGenerationConfig
from dsl_diffusion.modeling_dsl.generation_dsl import LEGACY_GENERATION_CONFIG_NAME
from helpers import run_remote_code, tiny_dsl_model

MASK = 32
SAMPLERS = ("mdlm", "remdm", "remdm-loop", "dsl-sde", "hybrid", "roar")


@pytest.fixture(scope="module")
def model():
    return tiny_dsl_model(pad_token_id=0, eos_token_id=2)


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_generate_with_each_sampler(model, sampler):
    prompt = torch.tensor([[4, 5, 6]])
    output = model.generate(prompt, max_new_tokens=7, sampler=sampler, num_steps=4, seed=0, num_return_sequences=2)
    assert isinstance(output, DSLGenerateOutput)
    assert output.sequences.shape == (2, 10) and (output.sequences[:, :3] == prompt).all()
    assert (output.sequences < MASK).all()  # no [MASK] left, none sampled
    if sampler == "roar":
        assert output.nfe == 7  # one call per generated position
    if sampler == "dsl-sde":
        assert output.nfe == 4 + 1  # one call per Euler step and the final read
    again = model.generate(prompt, max_new_tokens=7, sampler=sampler, num_steps=4, seed=0, num_return_sequences=2)
    assert torch.equal(again.sequences, output.sequences)
    assert not torch.equal(output.sequences[0], output.sequences[1])  # two seeds, two samples


def test_length_options_and_infilling(model):
    assert model.generate(num_steps=2, seed=0).sequences.shape == (1, model.config.max_position_embeddings)
    assert model.generate(max_length=9, num_steps=2, seed=0).sequences.shape == (1, 9)
    prompt = torch.tensor([[4, 5]])
    assert model.generate(prompt, max_length=9, num_steps=2, seed=0).sequences.shape == (1, 9)
    infill = torch.tensor([[4, MASK, 6, MASK, MASK]])
    filled = model.generate(infill, num_steps=3, seed=0).sequences
    assert filled.shape == (1, 5) and filled[0, 0] == 4 and filled[0, 2] == 6 and (filled < MASK).all()
    assert isinstance(model.generate(max_length=5, num_steps=2, seed=0, return_dict_in_generate=False), torch.Tensor)


def test_left_padded_batch_rows_equal_the_rows_alone(model):
    rows = [torch.tensor([[7, 8, 9]]), torch.tensor([[10]])]
    alone = [model.generate(row, max_new_tokens=5, num_steps=4, seed=[3 + i]).sequences[0] for i, row in enumerate(rows)]
    batch = torch.tensor([[7, 8, 9], [0, 0, 10]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=5, num_steps=4, seed=3).sequences
    # Exact ids, though a batch of 2 and a row alone may round their logits differently: a flip needs a draw within
    # ~3e-7 of a decision boundary, about a 1e-4 event per run (measured in test_samplers' docstring).
    assert torch.equal(batched[0], alone[0]) and torch.equal(batched[1, 2:], alone[1])


def test_greedy_takes_the_argmax_at_every_unmasking_and_is_deterministic(model):
    seen = []

    def record(step_model, step_index, callback_kwargs):
        seen.append(callback_kwargs["tokens"].clone())

    output = model.generate(max_length=12, num_steps=6, do_sample=False, callback_on_step_end=record)
    assert len(seen) == 6 and torch.equal(seen[-1], output.sequences)
    before = torch.full_like(seen[0], MASK)
    for after in seen:
        newly = (before == MASK) & (after != MASK)
        logits = model(input_ids=before).logits  # every position, where generate kept only the unmasking ones:
        # the argmaxes differ only if a row's top two logits lie within the last bits (here they are >= 1e-3 apart)
        assert torch.equal(after[newly], logits.argmax(-1)[newly])  # the argmax of p(x | state before the step)
        before = after
    # greedy ignores temperature / top-k / top-p (they never move the argmax), and needs no seed to repeat
    assert torch.equal(model.generate(max_length=12, num_steps=6, do_sample=False, temperature=0.3, top_k=3).sequences,
                       output.sequences)  # fmt: skip
    sampled = [model.generate(max_length=12, num_steps=6, seed=s).sequences for s in range(3)]
    assert any(not torch.equal(s, output.sequences) for s in sampled)


def test_top_k_one_and_the_logits_processor_reach_every_draw(model):
    class OnlyToken(LogitsProcessor):
        """Allows one token; records the shapes it is called with."""

        def __init__(self, token):
            self.token, self.calls = token, []

        def __call__(self, input_ids, scores):
            self.calls.append((tuple(input_ids.shape), tuple(scores.shape), scores.dtype))
            return torch.full_like(scores, -torch.inf).index_fill(-1, torch.tensor([self.token]), 0.0)

    for sampler in ("mdlm", "remdm", "roar", "hybrid"):
        processor = OnlyToken(17)
        out = model.generate(max_length=8, sampler=sampler, num_steps=4, seed=1, logits_processor=LogitsProcessorList([processor]))
        if sampler != "hybrid":  # the hybrid's SDE phase and commit make no draw; its discrete phase does
            assert (out.sequences == 17).all(), sampler
        assert processor.calls and all(ids[1] == 8 and scores[1] == 32 and dtype == torch.float64
                                       for ids, scores, dtype in processor.calls)  # fmt: skip
    with pytest.raises(ValueError, match="logits_processor does not apply to sampler 'dsl-sde'"):
        model.generate(max_length=8, sampler="dsl-sde", num_steps=2, logits_processor=LogitsProcessorList([OnlyToken(1)]))
    # top_k=1 samples the argmax: the same as greedy on the same random path
    top1 = model.generate(max_length=8, num_steps=4, seed=5, top_k=1).sequences
    assert torch.equal(top1, model.generate(max_length=8, num_steps=4, seed=5, do_sample=False).sequences)


def test_streamer_gets_one_draft_per_step(model):
    class DraftRecorder:
        def __init__(self):
            self.events = []

        def put(self, value):
            self.events.append(("put", value.clone()))

        def put_draft(self, value, **kwargs):
            self.events.append(("draft", value.clone()))

        def end(self):
            self.events.append(("end", None))

    for sampler, num_steps in (("mdlm", 5), ("dsl-sde", 3), ("roar", None)):
        streamer = DraftRecorder()
        prompt = torch.tensor([[4, 5]])
        knobs = {"num_steps": num_steps} if num_steps else {}
        out = model.generate(prompt, max_new_tokens=4, sampler=sampler, seed=0, streamer=streamer, return_trajectory=True, **knobs)
        kinds = [kind for kind, _ in streamer.events]
        expected_steps = num_steps or 4  # ROAR: one step per position
        assert kinds == ["put"] + ["draft"] * expected_steps + ["put", "end"], sampler
        assert torch.equal(streamer.events[0][1], prompt)
        drafts = [value for kind, value in streamer.events if kind == "draft"]
        assert all(torch.equal(draft, step) for draft, step in zip(drafts, out.trajectory))
        assert torch.equal(drafts[-1], out.sequences) and torch.equal(streamer.events[-2][1], out.sequences[:, 2:])


def test_trajectory_confidences_and_nfe_on_request(model):
    out = model.generate(max_length=10, num_steps=4, seed=0, return_trajectory=True, return_confidences=True)
    assert len(out.trajectory) == 4 and (out.trajectory[0] == MASK).any() and torch.equal(out.trajectory[-1], out.sequences)
    assert out.confidences.shape == (1, 10) and ((out.confidences > 0) & (out.confidences <= 1)).all()
    plain = model.generate(max_length=10, num_steps=4, seed=0)
    assert plain.trajectory is None and plain.confidences is None and 1 <= plain.nfe <= 5


def test_generate_errors_are_clear(model):
    with pytest.raises(ValueError, match=r"unexpected arguments \['etta'\]"):
        model.generate(max_length=8, etta=0.1)
    with pytest.raises(ValueError, match=r"sampler='ddpm' is not supported"):
        model.generate(max_length=8, sampler="ddpm")
    with pytest.raises(ValueError, match="either seed or generator"):
        model.generate(max_length=8, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"more than max_length=2"):
        model.generate(torch.tensor([[4, 5, 6]]), max_length=2)
    with pytest.raises(ValueError, match="nothing to generate"):
        model.generate(torch.tensor([[4, 5, 6]]), max_length=3)
    with pytest.raises(ValueError, match=r"one such integer per output row \(2 rows\)"):
        model.generate(max_length=8, num_return_sequences=2, seed=[1])


# ---------------------------------------------------------------------------------------------------------------
# The generation config
# ---------------------------------------------------------------------------------------------------------------


def test_generation_config_defaults_kwargs_and_config_priority(model, tmp_path):
    config = DSLGenerationConfig(sampler="remdm-loop", num_steps=32, eta=0.01, top_p=0.9, nucleus_rule="mdlm", max_length=16)
    assert (config.sampler, config.strategy) == ("remdm", "loop")  # the alias becomes the sampler and its knob
    sampler = config.build_sampler()
    assert (sampler.config.eta, sampler.config.num_steps, sampler.config.nucleus_rule) == (0.01, 32, "mdlm")
    # the call's kwargs > generation_config= > model.generation_config > defaults
    out = model.generate(generation_config=DSLGenerationConfig(sampler="dsl-sde", num_steps=3, max_length=6), seed=0)
    assert out.nfe == 4 and out.sequences.shape == (1, 6)
    out = model.generate(generation_config=DSLGenerationConfig(sampler="dsl-sde", num_steps=3, max_length=6), num_steps=5, seed=0)
    assert out.nfe == 6
    # what generation_config= leaves unset comes from the model's config
    original, model.generation_config = model.generation_config, DSLGenerationConfig(sampler="dsl-sde", num_steps=2, max_length=7)
    try:
        out = model.generate(generation_config=DSLGenerationConfig(num_steps=3), seed=0)
        assert out.nfe == 4 and out.sequences.shape == (1, 7)
        assert model.generate(generation_config=DSLGenerationConfig(max_new_tokens=5), seed=0).sequences.shape == (1, 5)
    finally:
        model.generation_config = original
    # a plain GenerationConfig works too (its length fields are kept)
    assert model.generate(generation_config=GenerationConfig(max_new_tokens=7), num_steps=2, seed=0).sequences.shape == (1, 7)
    assert DSLGenerationConfig.published_defaults().to_diff_dict() | {"transformers_version": None} == {
        "sampler": "remdm", "strategy": "cap", "num_steps": 128, "top_p": 0.9, "nucleus_rule": "mdlm",
        "transformers_version": None,
    }  # fmt: skip


def test_generation_config_json_round_trip_through_save_pretrained(tmp_path):
    model = tiny_dsl_model()
    model.generation_config = DSLGenerationConfig(sampler="hybrid", num_steps=6, continuous_steps=2, top_k=5, max_length=9)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "generation_config.json").read_text())
    assert {key: stored[key] for key in ("sampler", "num_steps", "continuous_steps", "top_k", "max_length")} == {
        "sampler": "hybrid", "num_steps": 6, "continuous_steps": 2, "top_k": 5, "max_length": 9,
    }  # fmt: skip
    assert None not in stored.values()  # only what was set
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, DSLGenerationConfig) and loaded.generation_config == model.generation_config
    # Exact ids from bit-identical weights: the loaded ones sit at other memory alignments and may round the logits
    # differently (~3e-7), which flips a draw only where it falls that close to a boundary (about 1e-4 per run).
    assert torch.equal(loaded.generate(seed=4).sequences, model.generate(seed=4).sequences)
    # the legacy file is read when generation_config.json is absent
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / LEGACY_GENERATION_CONFIG_NAME).write_text(json.dumps({"sampler": "mdlm", "num_steps": 3, "top_p": 0.8}))
    legacy = AutoModel.from_pretrained(tmp_path).generation_config
    assert (legacy.sampler, legacy.num_steps, legacy.top_p, legacy.nucleus_rule) == ("mdlm", 3, 0.8, "mdlm")


def test_generate_through_remote_code_in_a_fresh_process(tmp_path):
    model = tiny_dsl_model()
    model.generation_config = DSLGenerationConfig(sampler="remdm", strategy="conf", num_steps=5, max_length=11)
    folder = tmp_path / "remote"
    model.save_pretrained(folder)
    assert {"modeling_dsl.py", "generation_dsl.py", "samplers.py", "sampling_utils.py", "samplers_discrete.py", "samplers_continuous.py", "samplers_hybrid.py", "configuration_dsl.py"} <= set(os.listdir(folder))
    script = (
        "import sys, json, torch\n"
        "sys.modules['dsl_diffusion'] = None  # block the installed library: only the folder's code may run\n"
        "from transformers import AutoModel\n"
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "out = model.generate(seed=2, return_confidences=True)\n"
        "print(json.dumps({'module': type(model).__module__, 'config': type(model.generation_config).__name__,\n"
        "                  'sampler': model.generation_config.strategy, 'sequences': out.sequences.tolist(), 'nfe': out.nfe}))\n"
    )
    remote = run_remote_code(script, folder, tmp_path)
    assert remote["module"].startswith("transformers_modules.") and remote["config"] == "DSLGenerationConfig"
    assert remote["sampler"] == "conf"
    expected = model.generate(seed=2)
    assert remote["sequences"] == expected.sequences.tolist() and remote["nfe"] == expected.nfe


# ---------------------------------------------------------------------------------------------------------------
# The model contract
# ---------------------------------------------------------------------------------------------------------------


def test_labels_give_the_endpoint_cross_entropy_at_masked_positions(model):
    input_ids = torch.tensor([[4, MASK, 6, MASK], [MASK, 5, 5, 5]])
    labels = torch.tensor([[4, 9, 6, 11], [12, 5, -100, 5]])
    output = model(input_ids=input_ids, labels=labels)
    masked = input_ids == MASK
    expected = F.cross_entropy(output.logits[masked], labels[masked])
    assert torch.allclose(output.loss, expected)
    # unmasked positions carry no loss: changing their labels changes nothing
    assert torch.allclose(model(input_ids=input_ids, labels=labels.where(masked, torch.tensor(3))).loss, expected)
    loss, logits = model(input_ids=input_ids, labels=labels, return_dict=False)
    assert torch.allclose(loss, expected) and torch.equal(logits, output.logits)
    # the continuous path: every labelled position
    z = model.noisy_states(torch.tensor([[4, 9, 6, 11]]), snr=5.0, generator=torch.Generator().manual_seed(0))
    continuous = model(noisy_states=z, labels=torch.tensor([[4, 9, -100, 11]]))
    assert torch.allclose(continuous.loss, F.cross_entropy(continuous.logits[0, [0, 1, 3]], torch.tensor([4, 9, 11])))
    with pytest.raises(ValueError, match=r"labels must be clean token ids in \[0, 31\] or -100.*got 32"):
        model(input_ids=input_ids, labels=torch.full_like(labels, MASK))
    with pytest.raises(ValueError, match=r"labels must be a LongTensor of shape \[2, 4\]"):
        model(input_ids=input_ids, labels=labels[:, :2])


def test_base_model_prefix_names_the_backbone(model):
    assert model.base_model_prefix == "backbone" and model.base_model is model.backbone


def test_attention_backends_of_the_registry_agree_and_mask_padding():
    model = tiny_dsl_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adaLN-zero starts every block as the identity: give attention something to do
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    input_ids = torch.tensor([[0, 0, 4, MASK, 6], [7, MASK, 9, 10, 11]])
    other_padding = input_ids.clone()
    other_padding[0, :2] = 25  # what sits at padded positions must not matter
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    results = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            moved = model(input_ids=other_padding, attention_mask=attention_mask).logits
            unmasked = model(input_ids=input_ids).logits
        assert torch.allclose(logits[0, 2:], moved[0, 2:], atol=1e-6)
        assert not torch.allclose(logits[0, 2:], unmasked[0, 2:], atol=1e-2)  # the mask is applied
        results[implementation] = logits
    assert torch.allclose(results["eager"], results["sdpa"], atol=1e-5)
    model.set_attn_implementation("sdpa")
