"""DSLForMaskedDiffusion: MDLM compatibility, both input paths, saving/loading (in-library and as remote code)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion
from dsl_diffusion.modeling_dsl.modeling_dsl import ChunkedConverter, top_k_converter
from mdlm_reference import mdlm_logits, random_mdlm_state_dict, subs_log_probs

MDLM_VOCAB, HIDDEN, HEADS, BLOCKS, COND = 41, 32, 4, 2, 16  # 40 real tokens + [MASK] = 40


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=40, hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
        intermediate_size=64, cond_dim=COND, max_position_embeddings=32, embed_dim=8, dropout=0.0,
    )
    return DSLConfig(**{**kwargs, **overrides})


def randomized_model(config=None, seed=0):
    """A tiny model whose every parameter is random (adaLN included), so no block is the identity."""
    torch.manual_seed(seed)
    model = DSLForMaskedDiffusion(config or tiny_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in ("converter_beta", "converter_bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_mdlm_hub_folder(path, sd, n_heads=HEADS, cond_dim_in_config=129):
    """An MDLM checkpoint in the Hub layout: MDLM's config.json names + model.safetensors."""
    os.makedirs(path, exist_ok=True)
    config = {
        "model_type": "mdlm", "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig"},
        "vocab_size": sd["backbone.vocab_embed.embedding"].shape[0], "model_length": 32,
        "hidden_dim": sd["backbone.vocab_embed.embedding"].shape[1], "cond_dim": cond_dim_in_config,
        "n_blocks": BLOCKS, "n_heads": n_heads, "dropout": 0.1, "time_conditioning": False,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(sd, os.path.join(path, "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def mdlm_sd():
    return random_mdlm_state_dict(vocab_with_mask=MDLM_VOCAB, hidden=HIDDEN, blocks=BLOCKS, cond=COND)


def test_config_accepts_mdlm_names_and_vocab_convention():
    config = DSLConfig(vocab_size=50258, hidden_dim=768, n_blocks=12, n_heads=12, model_length=1024, cond_dim=128)
    assert (config.vocab_size, config.mask_token_id) == (50257, 50257)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.max_position_embeddings == 1024 and config.intermediate_size == 3072


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mask_token_id=3), "mask_token_id=3"),
        (dict(num_attention_heads=5), "num_attention_heads=5"),
        (dict(snr_conditioning="time"), "snr_conditioning='time'"),
        (dict(snr_max=-1.0), "snr_max=-1.0"),
        (dict(pad_token_id=99), "pad_token_id=99"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tiny_config(**overrides)


def test_from_mdlm_reproduces_mdlm_logits(tmp_path, mdlm_sd):
    folder = write_mdlm_hub_folder(tmp_path / "mdlm", mdlm_sd)
    model = DSLForMaskedDiffusion.from_mdlm(str(folder)).eval()
    config = model.config
    assert config.cond_dim == COND, "cond_dim must come from the weights, not the config's 129"
    assert (config.vocab_size, config.mask_token_id, config.num_attention_heads) == (40, 40, HEADS)
    assert config.endpoint_inputs == "table", "MDLM weights were trained on the table rows"

    ids = torch.randint(0, MDLM_VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    ids[0, :5] = config.mask_token_id
    with torch.no_grad():
        dsl = model(input_ids=ids).logits
    reference = mdlm_logits(mdlm_sd, ids, n_heads=HEADS)
    assert dsl.shape == (3, 17, 40)
    # Raw logits of the real classes match, and so do SUBS log-probabilities (mask class removed).
    torch.testing.assert_close(dsl.double(), reference[..., :40], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dsl.double().log_softmax(-1), subs_log_probs(reference, 40)[..., :40], atol=2e-5, rtol=1e-5)
    # The converter's value table is MDLM's input table (mask row = mask slot).
    torch.testing.assert_close(model.backbone.vocab_embed.embedding, mdlm_sd["backbone.vocab_embed.embedding"])


def test_from_mdlm_accepts_a_raw_file_and_a_state_dict(tmp_path, mdlm_sd):
    ids = torch.randint(0, MDLM_VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    path = tmp_path / "weights.safetensors"
    save_file(mdlm_sd, str(path))
    from_file = DSLForMaskedDiffusion.from_mdlm(str(path), num_attention_heads=HEADS).eval()
    from_dict = DSLForMaskedDiffusion.from_mdlm(mdlm_sd, num_attention_heads=HEADS, embed_dim=16).eval()
    assert from_dict.config.embed_dim == 16
    with torch.no_grad():
        torch.testing.assert_close(from_file(input_ids=ids).logits, from_dict(input_ids=ids).logits)


def test_from_mdlm_lists_missing_unexpected_and_misshaped_keys(mdlm_sd):
    broken = dict(mdlm_sd)
    del broken["backbone.blocks.1.attn_out.weight"]
    broken["backbone.blocks.0.extra.weight"] = torch.zeros(2)
    broken["backbone.blocks.0.mlp.2.bias"] = torch.zeros(HIDDEN + 1)
    with pytest.raises(ValueError) as excinfo:
        DSLForMaskedDiffusion.from_mdlm(broken, num_attention_heads=HEADS)
    message = str(excinfo.value)
    assert "missing keys (1): ['backbone.blocks.1.attn_out.weight']" in message
    assert "unexpected keys (1): ['backbone.blocks.0.extra.weight']" in message
    assert "backbone.blocks.0.mlp.2.bias: checkpoint [33] vs model [32]" in message
    with pytest.raises(ValueError, match="not an MDLM checkpoint"):
        DSLForMaskedDiffusion.from_mdlm({"model.embed.weight": torch.zeros(3, 3)})


def test_continuous_path_approaches_the_discrete_endpoints(mdlm_sd):
    """z at s = 0 is [MASK] and z at high SNR is the clean token, up to the converter's softness."""
    model = DSLForMaskedDiffusion.from_mdlm(mdlm_sd, num_attention_heads=HEADS).eval()
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(3))
    masked = torch.full_like(ids, model.config.mask_token_id)
    with torch.no_grad():
        at_mask = model(input_ids=masked).logits.log_softmax(-1)
        at_zero = model(noisy_states=model.noisy_states(ids, 0.0)).logits.log_softmax(-1)
        # At initialization p~(mask | z = 0) = 0.99: the s = 0 state is the mask embedding up to 1% of token mass.
        assert (at_zero - at_mask).abs().max() < 0.15
        # A sharp converter (large beta, no mask prior) at s_max maps z onto the token row almost exactly.
        model.converter_beta.fill_(1.0)
        model.converter_bias.zero_()
        clean = model(input_ids=ids).logits.log_softmax(-1)
        z = model.noisy_states(ids, model.config.snr_max, generator=torch.Generator().manual_seed(0))
        at_snr_max = model(noisy_states=z).logits.log_softmax(-1)
        assert (at_snr_max - clean).abs().max() < 1e-3


def backbone_inputs(model, **model_inputs) -> torch.Tensor:
    """What the first block receives: the backbone input h, `[batch, length, hidden]`."""
    captured = []
    handle = model.backbone.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(**model_inputs)
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("endpoint_snr", [None, 30.0])
def test_converter_endpoints_are_what_dsl_training_shows(endpoint_snr):
    """endpoint_inputs="converter": [MASK] is the converter at z = 0 and a token the converter at z = s_hi e_x."""
    model = randomized_model(tiny_config(endpoint_inputs="converter"))
    with torch.no_grad():  # as after DSL training: the mask slot no longer keeps ~all the weight at z = 0
        model.converter_bias[model.config.mask_token_id] = 1.5
        model.converter_beta.fill_(0.7)
    mask = model.config.mask_token_id
    ids = torch.randint(0, 40, (3, 20), generator=torch.Generator().manual_seed(0))
    ids[:, ::3] = mask
    extra = {} if endpoint_snr is None else {"endpoint_snr": endpoint_snr}
    hidden = backbone_inputs(model, input_ids=ids, **extra)
    s_hi = endpoint_snr or model.config.snr_max
    is_mask = ids == mask
    token_states = s_hi * model.token_directions()[ids.masked_fill(is_mask, 0)]
    with torch.no_grad():
        at_zero = model.convert_noisy_states(torch.zeros(1, 1, model.config.embed_dim))[0, 0]
        at_s_hi = model.convert_noisy_states(token_states)
    torch.testing.assert_close(hidden[is_mask], at_zero.expand(int(is_mask.sum()), -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden[~is_mask], at_s_hi[~is_mask], atol=1e-6, rtol=0)
    # ... which is far from the raw table rows that the "table" path feeds.
    table = model.backbone.vocab_embed.embedding
    assert (hidden[is_mask] - table[mask]).abs().max() > 1e-2
    # The same logits as the continuous path at the same (noise-free) states.
    states = token_states.masked_fill(is_mask[..., None], 0.0)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, **extra).logits, model(noisy_states=states).logits, atol=1e-5, rtol=1e-5
        )


def test_table_and_converter_at_mask_endpoints():
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 5:9] = 40
    is_mask = ids == 40
    table_model = randomized_model(tiny_config(endpoint_inputs="table"))
    table = table_model.backbone.vocab_embed.embedding
    # Exact: the "table" input is a row lookup, a copy of the rows with no arithmetic.
    torch.testing.assert_close(backbone_inputs(table_model, input_ids=ids), table[ids], atol=0, rtol=0)

    model = randomized_model(tiny_config(endpoint_inputs="converter_at_mask"))
    with torch.no_grad():
        model.converter_bias[40] = 0.5
        at_zero = model.convert_noisy_states(torch.zeros(1, 1, model.config.embed_dim))[0, 0]
    hidden = backbone_inputs(model, input_ids=ids)
    # Exact at tokens (the table rows, copied by torch.where); at [MASK] the converter ran on another batch shape.
    torch.testing.assert_close(hidden[~is_mask], model.backbone.vocab_embed.embedding[ids][~is_mask], atol=0, rtol=0)
    torch.testing.assert_close(hidden[is_mask], at_zero.expand(int(is_mask.sum()), -1), atol=1e-6, rtol=0)


def test_endpoint_inputs_are_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match=r"endpoint_inputs='noisy' is not supported; accepted: \('table', 'converter'"):
        tiny_config(endpoint_inputs="noisy")
    model = randomized_model(tiny_config(endpoint_inputs="converter"))
    with pytest.raises(ValueError, match=r"endpoint_snr=-1.0 must be a finite number > 0"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), endpoint_snr=-1.0)
    model.save_pretrained(tmp_path / "m")
    reloaded = DSLForMaskedDiffusion.from_pretrained(tmp_path / "m").eval()
    assert reloaded.config.endpoint_inputs == "converter"
    ids = torch.tensor([[1, 40, 3, 40]])
    # The loaded model computes the same function: the same weights give the same logits up to fp32 rounding (the
    # tolerance of transformers' own save/load tests). Not bit for bit: the loaded tensors live at other memory
    # alignments inside the safetensors buffer, and the CPU kernels then accumulate in another order (a few ulps).
    # The same weights read as endpoint_inputs="table" give logits 5e-3 away: 500 times the tolerance.
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_noisy_states_statistics():
    model = randomized_model()
    ids = torch.randint(0, 40, (1, 1)).expand(20000, 1)
    snr = torch.full((20000,), 9.0)
    z = model.noisy_states(ids, snr, generator=torch.Generator().manual_seed(0))
    e = model.token_directions()[ids[0, 0]].detach()
    torch.testing.assert_close(z.mean(dim=(0, 1)), 9.0 * e, atol=0.07, rtol=0)  # mean s e, se = 3 / sqrt(20000)
    torch.testing.assert_close(z.var(dim=(0, 1)), torch.full_like(e, 9.0), atol=0.4, rtol=0)  # variance s
    per_token = model.noisy_states(torch.tensor([[3, 40]]), torch.tensor([[4.0, 7.0]]))
    assert torch.all(per_token[0, 1] == 0), "a [MASK] position has s = 0 whatever snr says"
    with pytest.raises(ValueError, match="snr must be finite and >= 0"):
        model.noisy_states(ids[:2], -1.0)
    with pytest.raises(ValueError, match=r"per-sequence snr must have shape \[2\]"):
        model.noisy_states(ids[:2], torch.ones(3))


def test_posterior_mean_and_unit_directions():
    model = randomized_model()
    directions = model.token_directions()
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(40))
    logits = torch.full((1, 1, 40), -1e4)
    logits[0, 0, 7] = 0.0
    torch.testing.assert_close(model.posterior_mean(logits)[0, 0], directions[7].detach())


def test_padding_is_not_attended_to():
    model = randomized_model()
    ids = torch.randint(0, 41, (1, 10), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        in_batch = model(input_ids=padded, attention_mask=mask).logits[:, :10]
        z = model.noisy_states(padded, 5.0, generator=torch.Generator().manual_seed(0))
        z_alone = model(noisy_states=z[:, :10]).logits
        z_batch = model(noisy_states=z, attention_mask=mask).logits[:, :10]
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_alone, z_batch, atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_attention_agree():
    model = randomized_model()
    ids = torch.randint(0, 41, (2, 11))
    with torch.no_grad():
        sdpa = model(input_ids=ids).logits
        model.config._attn_implementation = "eager"
        eager = model(input_ids=ids).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_snr_conditioning_norm_depends_on_the_state_norm():
    model = randomized_model(tiny_config(snr_conditioning="norm"))
    ids = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        low = model(noisy_states=model.noisy_states(ids, 1.0, generator=torch.Generator().manual_seed(0))).logits
        # Same direction pattern, rescaled: only the per-token norm (the adaLN input) and converter scores change.
        both = model(input_ids=ids).logits
    assert low.shape == both.shape and torch.isfinite(low).all()
    const = randomized_model(tiny_config())
    assert const.backbone.sigma_map is not None
    with pytest.raises(ValueError, match="pick one"):
        tiny_config(snr_conditioning="norm", time_conditioning=True)


def test_hidden_states_tuple_and_input_validation():
    model = randomized_model()
    out = model(input_ids=torch.randint(0, 41, (2, 6)), output_hidden_states=True)
    assert len(out.hidden_states) == BLOCKS + 1 and out.hidden_states[0].shape == (2, 6, HIDDEN)
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 40\]"):
        model(input_ids=torch.tensor([[41]]))
    with pytest.raises(ValueError, match=r"noisy_states must be \[batch, length, 8\]"):
        model(noisy_states=torch.zeros(1, 3, 5))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomized_model().train()
    ids = torch.randint(0, 41, (2, 8))
    z = model.noisy_states(ids, 3.0, generator=torch.Generator().manual_seed(0)).detach()

    def grads():
        model.zero_grad()
        model(noisy_states=z).logits.logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    model.activation_checkpointing_enable()
    assert model.backbone.blocks[0].gradient_checkpointing
    checkpointed = grads()
    assert set(reference) == set(checkpointed)
    for name in reference:
        torch.testing.assert_close(reference[name], checkpointed[name], atol=1e-5, rtol=1e-4)
    for name in ("token_directions.weight", "converter_beta", "converter_bias", "backbone.vocab_embed.embedding"):
        assert reference[name].abs().sum() > 0, f"no gradient reaches {name}"


def test_save_load_in_library_and_bf16(tmp_path):
    model = randomized_model()
    ids = torch.randint(0, 41, (2, 9))
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "modeling_dsl.py", "configuration_dsl.py"} <= files
    assert not any(f.endswith(".bin") for f in files)
    auto_map = json.load(open(tmp_path / "config.json"))["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_dsl.DSLConfig",
        "AutoModel": "modeling_dsl.DSLForMaskedDiffusion",
        "AutoModelForMaskedLM": "modeling_dsl.DSLForMaskedDiffusion",
    }
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DSLConfig)
    for auto in (AutoModel, AutoModelForMaskedLM):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert type(loaded) is DSLForMaskedDiffusion
        reloaded_state = loaded.state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, reloaded_state[name]), f"{name} changed in the round trip"
        # Bit-identical weights; the logits agree to fp32 rounding, transformers' save/load tolerance (the loaded
        # tensors sit at other memory alignments, where the CPU kernels accumulate in another order).
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    bf16 = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.backbone.blocks[0].attn_qkv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = bf16(input_ids=ids).logits
    assert out.dtype == torch.float32  # logits always in fp32
    torch.testing.assert_close(out, model(input_ids=ids).logits, atol=0.1, rtol=0.05)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(input_ids=ids).logits
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, model(input_ids=ids).logits, atol=0.1, rtol=0.05)


def test_trust_remote_code_in_a_fresh_process_without_the_library(tmp_path):
    """The saved folder alone (remote code) must rebuild the model, with identical logits."""
    model = randomized_model()
    ids = torch.randint(0, 41, (2, 9), generator=torch.Generator().manual_seed(5))
    z = model.noisy_states(ids, 4.0, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = {"discrete": model(input_ids=ids).logits, "continuous": model(noisy_states=z).logits}
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    torch.save({"ids": ids, "z": z, **expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch

        class HideLibrary:  # the library is installed in this venv: make it unimportable for this process
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name.split(".")[0] == "dsl_diffusion":
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, HideLibrary)
        try:
            import dsl_diffusion
            raise AssertionError("the library must not be importable here")
        except ModuleNotFoundError:
            pass
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():  # same weights at other memory alignments: equal up to fp32 rounding
            torch.testing.assert_close(model(input_ids=io["ids"]).logits, io["discrete"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(noisy_states=io["z"]).logits, io["continuous"], atol=1e-5, rtol=1e-5)
        print("REMOTE-CODE-OK")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "REMOTE-CODE-OK" in result.stdout, result.stderr[-3000:]


def test_convert_cli_writes_a_loadable_folder(tmp_path, mdlm_sd):
    from dsl_diffusion.modeling_dsl.convert_mdlm import main

    source = write_mdlm_hub_folder(tmp_path / "mdlm", mdlm_sd)
    out = tmp_path / "dsl"
    main(["--mdlm_checkpoint", str(source), "--output_dir", str(out), "--tokenizer", "none", "--embed_dim", "4"])
    model = AutoModel.from_pretrained(out).eval()
    assert model.config.embed_dim == 4 and model.token_directions.weight.shape == (40, 4)
    ids = torch.randint(0, MDLM_VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits.double(), mdlm_logits(mdlm_sd, ids, n_heads=HEADS)[..., :40], atol=2e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        main(["--mdlm_checkpoint", str(source), "--output_dir", str(out), "--dtype", "float16"])


def plain_converter(model, noisy_states):
    """The converter as METHOD.md writes it: softmax(beta [<z, e_1>, .., <z, e_V>, 0] + b) W."""
    scores = model.converter_beta * (noisy_states @ model.token_directions().T)
    slot_probs = (F.pad(scores, (0, 1)) + model.converter_bias).softmax(dim=-1)
    return slot_probs @ model.backbone.vocab_embed.embedding


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 64])
def test_converter_equals_the_plain_formula_with_gradients(chunk_size):
    """The chunked online softmax equals the plain formula, outputs and every gradient, whether the vocabulary (40
    tokens) is one chunk, many, or chunks that do not divide it; the [MASK] slot dominates some states."""
    model = randomized_model(tiny_config(converter_chunk_size=chunk_size))
    with torch.no_grad():
        model.converter_bias[40] = 3.0
        model.converter_beta.fill_(0.9)
    z = torch.randn(3, 7, model.config.embed_dim, generator=torch.Generator().manual_seed(0)) * 4
    z[0, :3] = 0.0  # [MASK] states
    with torch.no_grad():
        torch.testing.assert_close(model.convert_noisy_states(z), plain_converter(model, z), atol=1e-6, rtol=1e-5)
    weights = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    parameters = [model.token_directions.weight, model.converter_beta, model.converter_bias, model.backbone.vocab_embed.embedding]
    gradients = []
    for converter in (model.convert_noisy_states, lambda states: plain_converter(model, states)):
        states = z.clone().requires_grad_()
        gradients.append(torch.autograd.grad((converter(states) * weights).sum(), [states, *parameters]))
    for chunked, plain in zip(*gradients):
        torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-4)


def test_chunked_converter_passes_gradcheck():
    """Finite differences in float64 against the hand-written backward, every input, three uneven chunks; one state
    sits far out (a large score that moves the running max between chunks)."""
    generator = torch.Generator().manual_seed(0)
    vocab_size, dim, hidden, states = 11, 3, 4, 5
    inputs = [
        torch.randn(states, dim, generator=generator, dtype=torch.float64) * 2,
        F.normalize(torch.randn(vocab_size, dim, generator=generator, dtype=torch.float64), dim=-1),
        torch.tensor([1.3], dtype=torch.float64),
        torch.randn(vocab_size + 1, generator=generator, dtype=torch.float64),
        torch.randn(vocab_size + 1, hidden, generator=generator, dtype=torch.float64),
    ]
    inputs[0][2] *= 6
    inputs = [tensor.requires_grad_() for tensor in inputs]
    assert torch.autograd.gradcheck(lambda *args: ChunkedConverter.apply(*args, 4, torch.float64), inputs)


def test_converter_keeps_no_vocabulary_wide_tensor_for_the_backward():
    """The training-memory claim: what autograd saves between the converter's forward and backward is O(N (d + H))
    plus the parameters, never an [N, V] tensor of slot scores or probabilities."""
    model = randomized_model(tiny_config(vocab_size=500, converter_chunk_size=64))
    z = torch.randn(4, 9, model.config.embed_dim)
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.convert_noisy_states(z).sum().backward()
    number_of_states, vocab_size = 4 * 9, model.config.vocab_size
    assert saved_sizes, "nothing was saved: the hook did not see the converter"
    assert not any(number_of_states in shape and max(shape) >= vocab_size for shape in saved_sizes), saved_sizes
    assert model.token_directions.weight.grad is not None and model.backbone.vocab_embed.embedding.grad is not None


def test_top_k_converter_is_the_plain_formula_over_the_kept_slots():
    """The opt-in sparse converter equals the plain formula with every slot outside each state's top k token scores
    removed (the [MASK] slot always kept), outputs and gradients; the top k found across chunks are the same."""
    top_k = 5
    model = randomized_model(tiny_config(converter_top_k=top_k))
    with torch.no_grad():
        # Distinct token biases: at z = 0 the scores are the biases, and tied scores would make "the top k" ambiguous.
        model.converter_bias.copy_(torch.randn(41, generator=torch.Generator().manual_seed(5)))
        model.converter_bias[40] = 2.0
        model.converter_beta.fill_(0.7)
    z = torch.randn(2, 6, model.config.embed_dim, generator=torch.Generator().manual_seed(3)) * 3
    z[1, :2] = 0.0

    def reference(states):
        scores = model.converter_beta * (states @ model.token_directions().T) + model.converter_bias[:40]
        outside = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(top_k, dim=-1).indices, False)
        slot_scores = torch.cat([scores.masked_fill(outside, -torch.inf), model.converter_bias[40].expand_as(scores[..., :1])], -1)
        return slot_scores.softmax(dim=-1) @ model.backbone.vocab_embed.embedding

    weights = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    parameters = [model.token_directions.weight, model.converter_beta, model.converter_bias, model.backbone.vocab_embed.embedding]
    gradients = []
    for converter in (model.convert_noisy_states, reference):
        states = z.clone().requires_grad_()
        gradients.append(torch.autograd.grad((converter(states) * weights).sum(), [states, *parameters]))
    for sparse, exact in zip(*gradients):
        torch.testing.assert_close(sparse, exact, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        sparse = model.convert_noisy_states(z)
        inputs = (z.reshape(-1, model.config.embed_dim), model.token_directions(), model.converter_beta, model.converter_bias,
                  model.backbone.vocab_embed.embedding, top_k)
        for search_chunk in (3, 7, 16):  # the top k merged across chunks, some narrower than k
            torch.testing.assert_close(top_k_converter(*inputs, search_chunk).reshape(sparse.shape), sparse)
        assert not torch.allclose(sparse, plain_converter(model, z), atol=1e-3)  # it is an approximation
        model.config.converter_top_k = 40  # k >= V: the exact converter
        torch.testing.assert_close(model.convert_noisy_states(z), plain_converter(model, z), atol=1e-6, rtol=1e-5)


def test_converter_under_bfloat16_autocast_matches_the_plain_formula():
    """Under autocast the products with W run in bfloat16 while the softmax stays float32 (as autocast would run
    the plain formula's matrix products); the outputs agree to bfloat16 precision."""
    model = randomized_model(tiny_config(converter_chunk_size=16))
    z = torch.randn(2, 5, model.config.embed_dim, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = model.convert_noisy_states(z)
    with torch.no_grad():
        plain = plain_converter(model, z)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("snr_conditioning", ["none", "norm"])
@pytest.mark.parametrize("path", ["input_ids", "noisy_states"])
def test_logits_to_keep_equals_the_full_logits_at_the_kept_positions(snr_conditioning, path):
    """Every form of `logits_to_keep` returns exactly the full forward's logits at the positions it selects, with
    per-row (none) and per-token (norm) adaLN conditioning, on both input paths."""
    model = randomized_model(tiny_config(snr_conditioning=snr_conditioning))
    torch.manual_seed(1)
    batch, length = 3, 10
    if path == "input_ids":
        ids = torch.randint(0, 40, (batch, length))
        ids[torch.rand(batch, length) < 0.5] = model.config.mask_token_id
        inputs = {"input_ids": ids}
    else:
        inputs = {"noisy_states": torch.randn(batch, length, model.config.embed_dim) * 3}
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, :2] = 0
    with torch.no_grad():
        full = model(**inputs, attention_mask=attention_mask).logits
        keep = torch.rand(batch, length) < 0.4
        keep[1] = False  # a row with nothing kept
        packed = model(**inputs, attention_mask=attention_mask, logits_to_keep=keep).logits
        positions = torch.tensor([7, 2, 9])
        indexed = model(**inputs, attention_mask=attention_mask, logits_to_keep=positions).logits
        last = model(**inputs, attention_mask=attention_mask, logits_to_keep=4).logits
    assert packed.shape == (int(keep.sum()), 40)
    torch.testing.assert_close(packed, full[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(indexed, full[:, positions], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, full[:, -4:], rtol=1e-5, atol=1e-5)


def test_logits_to_keep_rejects_bad_values():
    model = randomized_model()
    ids = torch.full((2, 6), model.config.mask_token_id)
    with pytest.raises(ValueError, match=r"logits_to_keep=7 must lie in \[0, 6\]"):
        model(input_ids=ids, logits_to_keep=7)
    with pytest.raises(ValueError, match=r"\[2, 6\] bool tensor"):
        model(input_ids=ids, logits_to_keep=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\]"):
        model(input_ids=ids, logits_to_keep=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="labels need all of them"):
        model(input_ids=ids, labels=torch.zeros(2, 6, dtype=torch.long), logits_to_keep=2)


@pytest.mark.parametrize("endpoint_inputs", ["converter", "converter_at_mask"])
def test_endpoint_cache_gives_the_same_logits_and_converts_each_token_once(endpoint_inputs):
    """Inside `endpoint_cache()` a run of discrete states (tokens decoded step by step, at two endpoint SNRs) gets the
    logits of the uncached forward, and the converter runs only on ids it has not seen at that SNR."""
    model = randomized_model(tiny_config(endpoint_inputs=endpoint_inputs))
    with torch.no_grad():
        model.converter_bias[model.config.mask_token_id] = 1.0  # [MASK]'s input is not the table row
    mask = model.config.mask_token_id
    torch.manual_seed(2)
    final = torch.randint(0, 40, (2, 12))
    states = [torch.where(torch.rand(2, 12) < fraction, final, mask) for fraction in (0.0, 0.3, 0.6, 1.0)]
    converted, convert = [], model._convert_endpoints
    model._convert_endpoints = lambda ids, snr: converted.append((snr, ids.tolist())) or convert(ids, snr)
    with torch.no_grad():
        uncached = [model(input_ids=ids, endpoint_snr=snr).logits for snr in (50.0, 20.0) for ids in states]
        converted.clear()
        with model.endpoint_cache():
            cached = [model(input_ids=ids, endpoint_snr=snr).logits for snr in (50.0, 20.0) for ids in states]
        assert model._endpoint_rows is None  # dropped on exit
    for got, expected in zip(cached, uncached):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    per_snr = {snr: sorted(x for at, ids in converted if at == snr for x in ids) for snr in (50.0, 20.0)}
    if endpoint_inputs == "converter":
        seen = sorted({int(x) for ids in states for x in ids.unique()})
        assert per_snr == {50.0: seen, 20.0: seen}  # each id converted once per SNR
    else:
        assert per_snr == {50.0: [mask], 20.0: [mask]}  # only [MASK] goes through the converter, once per SNR


@pytest.mark.parametrize("endpoint_inputs", ["table", "converter"])
@pytest.mark.parametrize("path", ["input_ids", "noisy_states"])
def test_forward_traces_into_one_graph_for_torch_compile(endpoint_inputs, path):
    """The data-dependent input checks are skipped while compiling, so `torch.compile` sees the forward as one graph
    without breaks (a converter-endpoint model's per-token converter runs eagerly at the graph's start)."""
    model = randomized_model(tiny_config(endpoint_inputs=endpoint_inputs))
    ids = torch.randint(0, 41, (2, 12))
    inputs = {"input_ids": ids} if path == "input_ids" else {"noisy_states": torch.randn(2, 12, 8)}
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.forward)(**inputs, attention_mask=torch.ones(2, 12, dtype=torch.long))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
