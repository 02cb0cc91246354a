"""The specification of scale.py: igrpo.py's own training with engineered parts handed to it
(igrpo.Parts, built by scale.scale_parts), each pinned here against igrpo.py's plain part it
replaces: memory-lean blockwise log-probs and the output layer's gradient into fp32 master weights,
static-cache sampling, LoRA, torchrun data parallelism (two gloo processes on the CPU), and long
runs (non-finite updates, collapse warnings, failures that name their fix). Offline: tiny models,
no hub."""
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import uuid
import zlib

import pytest
import torch
import torch.multiprocessing
from safetensors.torch import load_file

import igrpo
import scale
from conftest import (Crash, final_weights, hostile_generation_defaults, parity_reward,
                      step_that, tiny_config, training_steps)
from scale import ScaleConfig

PROMPTS = ["Problem: What is 1 + 1?\n\nSolution:", "Problem: What is 7 + 1?\n\nSolution:"]
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.25, -0.25])  # 2 problems x 4


def scale_config(tiny, tmp_path, **overrides):
    """tiny_config's settings as a ScaleConfig; overrides may set scale.py's fields too."""
    return tiny_config(tiny, tmp_path, config_class=ScaleConfig, **overrides)


def load_tiny(tiny, dtype=torch.float32, cfg=None, lean=False):
    """The tiny model and tokenizer: igrpo.load_model's, or (lean) scale.lean_load_model's, which
    also decides how lean_token_logprobs scores it (check_scoring)."""
    cfg = cfg or ScaleConfig(chat_template="off")
    load = scale.lean_load_model if lean else igrpo.load_model
    return load(str(tiny / "model"), cfg, dtype, "cpu")


def alternate_rewards(completions, *_):
    """igrpo.compute_rewards, but every group's rewards differ: every step has a gradient."""
    rewards = torch.arange(len(completions)) % 2.0
    return igrpo.Rewards(rewards, rewards, torch.zeros(len(completions)), 0)


# ----------------------------------------------------------------------------------------------
# The parts: scale.py runs igrpo.py's loop with its own parts, and changes nothing else
# ----------------------------------------------------------------------------------------------
def test_scale_parts_are_the_engineered_ones_cfg_asks_for_and_nothing_else():
    plain = scale.scale_parts(ScaleConfig())  # none of scale's flags, one process, a CPU
    assert plain.token_logprobs is scale.lean_token_logprobs
    assert plain.load_policy is scale.lean_policy and plain.save_model is scale.save_model
    assert plain.make_optimizer is scale.tagged_master_weights_and_optimizer
    assert plain.sample is igrpo.sample and plain.world == igrpo.World() and plain.judge is None
    assert plain.optimizer_step is not igrpo.optimizer_step and len(plain.watches) == 1
    flagged = scale.scale_parts(ScaleConfig(compile_generation="on", lora_rank=4))
    assert flagged.sample is scale.compiled_sample and flagged.load_policy is scale.lora_policy
    assert igrpo.sample is igrpo.Parts().sample  # igrpo.py itself is never changed


def test_no_program_file_rewrites_a_name_of_igrpo_py():
    programs = [p for p in os.listdir(".")
                if p.endswith(".py") and not p.startswith(("test_", "conftest"))]
    swaps = re.compile(r"vars\(igrpo\)|setattr\(igrpo|igrpo\.[a-z_]+ *=[^=]")
    assert [(p, line) for p in programs for line in open(p) if swaps.search(line)] == []


def test_scale_train_without_its_flags_ends_with_the_weights_of_igrpo_train(
        tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(igrpo, "math_reward", parity_reward)
    igrpo.train(tiny_config(tiny, tmp_path, dtype="fp32", steps=2,
                            output_dir=str(tmp_path / "igrpo")))
    scale.train(scale_config(tiny, tmp_path, dtype="fp32", steps=2,
                             output_dir=str(tmp_path / "scale")))
    plain, scaled = final_weights(tmp_path / "igrpo"), final_weights(tmp_path / "scale")
    start = load_file(tiny / "model" / "model.safetensors")
    assert plain.keys() == scaled.keys() == start.keys()
    assert any(not torch.equal(plain[name], start[name]) for name in plain)  # it trained
    differences = {name: (plain[name] - scaled[name]).abs().max().item() for name in plain}
    assert max(differences.values()) < 1e-5, differences
    assert training_steps(tmp_path / "igrpo") == training_steps(tmp_path / "scale") == [1, 2]


def padded_batch(tokenizer):
    """Two left-padded prompts, each with a completion; the second completion is shorter."""
    prompts = [tokenizer("What is 3?").input_ids,
               tokenizer("Problem: What is 3 + 1 and then 5?").input_ids]
    completions = [tokenizer(" 4. \\boxed{4}").input_ids, tokenizer(" 9").input_ids]
    P, T, pad = max(map(len, prompts)), max(map(len, completions)), tokenizer.pad_token_id
    ids = [[pad] * (P - len(p)) + p + c + [pad] * (T - len(c))
           for p, c in zip(prompts, completions)]
    attention = [[0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (T - len(c))
                 for p, c in zip(prompts, completions)]
    mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions]).bool()
    return torch.tensor(ids), torch.tensor(attention), P, mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("path", ["output layer", "own forward"])
def test_lean_log_probs_equal_igrpos_plain_ones_in_values_entropies_and_gradients(
        tiny, monkeypatch, path, temperature):
    monkeypatch.setattr(scale, "LOGITS_BLOCK_BYTES", 4 * 32 * 64)  # several blocks either way
    model, tokenizer = load_tiny(tiny, lean=True)
    assert not model.scored_by_forward  # check_scoring: the output layer reproduces the logits
    model.scored_by_forward = path == "own forward"
    ids, attention, P, mask = padded_batch(tokenizer)
    assert not mask.all() and not attention[:, :P].bool().all()
    upstream = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    parameters = list(model.parameters())
    results = {}
    for name, function in (("plain", igrpo.token_logprobs), ("lean", scale.lean_token_logprobs)):
        logp, entropy = function(model, ids, attention, P, mask, temperature)
        grads = torch.autograd.grad((logp * upstream).sum(), parameters)
        results[name] = logp.detach(), entropy, grads
    logp, entropy, grads = results["plain"]
    lean_logp, lean_entropy, lean_grads = results["lean"]
    assert lean_logp.shape == logp.shape and (lean_logp[~mask] == 0).all()
    assert torch.allclose(lean_logp, logp, atol=1e-5)
    assert torch.allclose(lean_entropy, entropy, atol=1e-5) and entropy[mask].min() > 0
    assert any(g.abs().max() > 0 for g in grads)
    for (name, _), ours, theirs in zip(model.named_parameters(), lean_grads, grads):
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-4), name


# ----------------------------------------------------------------------------------------------
# Memory-lean log-probs: the output layer a block of vocabulary columns at a time
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("head", ["output layer", "logits given"])
def test_blockwise_log_probs_have_the_values_and_gradients_of_one_full_log_softmax(
        monkeypatch, softcap, head):
    monkeypatch.setattr(scale, "LOGITS_BLOCK_BYTES", 4 * 11 * 15)  # 11 tokens: 4 blocks of 15
    torch.manual_seed(0)
    hidden = torch.randn(11, 8 if head == "output layer" else 50, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True) if head == "output layer" else None
    bias = torch.randn(50, requires_grad=True) if head == "output layer" else None
    targets, upstream = torch.randint(0, 50, (11,)), torch.randn(11)  # any gradient from the loss
    logp, entropy = scale.OutputLayerLogprobs.apply(hidden, weight, bias, targets,
                                                    (1.7, softcap, 0.7), True)
    logits = (hidden if weight is None else hidden @ weight.T + bias) * 1.7
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reference = torch.log_softmax(logits / 0.7, -1)
    expected = reference.gather(-1, targets[:, None]).squeeze(-1)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((logp * upstream).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves)
    assert len(scale.vocabulary_blocks(hidden, weight)) == 4
    assert torch.allclose(logp, expected, atol=1e-5)
    assert torch.allclose(entropy, -(reference.exp() * reference).sum(-1), atol=1e-5)
    assert all(torch.allclose(ours, theirs, atol=1e-5)
               for ours, theirs in zip(grads, expected_grads))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("head", ["output layer", "logits given"])
def test_log_probs_hold_two_blocks_of_float32_logits_whatever_the_number_of_tokens(
        monkeypatch, softcap, head):
    from bench import peak_memory
    vocabulary, width = 2000, 16
    monkeypatch.setattr(scale, "LOGITS_BLOCK_BYTES", 4 * vocabulary * 50)  # (50 tokens, V) a block
    block = scale.LOGITS_BLOCK_BYTES
    weight = torch.randn(vocabulary, width, requires_grad=True) if head == "output layer" else None
    for tokens in (100, 1000):
        features = torch.randn(tokens, width if weight is not None else vocabulary,
                               requires_grad=True)
        targets = torch.randint(0, vocabulary, (tokens,))

        def forward_and_backward():
            logp, _ = scale.OutputLayerLogprobs.apply(features, weight, None, targets,
                                                      (1.0, softcap, 0.7), True)
            logp.sum().backward()
        features.grad = None
        if weight is not None:
            weight.grad = None
        _, peak = peak_memory(forward_and_backward, "cpu")
        gradients = features.numel() * 4 * (2 if weight is not None else 1)  # hidden: a fp32 sum
        gradients += weight.numel() * 4 if weight is not None else 0
        assert peak < gradients + 2.5 * block, (tokens, peak)  # a full log-softmax: 20 blocks


@pytest.mark.parametrize("tokens", [100, 4])  # 4 < the width: the gradient rows set the block
def test_a_bf16_output_layer_with_master_weights_adds_its_gradient_to_them_and_keeps_no_bf16_copy(
        monkeypatch, tokens):
    from bench import peak_memory
    vocabulary, width = 20000, 64
    monkeypatch.setattr(scale, "LOGITS_BLOCK_BYTES", 400_000)  # 100 tokens: blocks of 1000 columns
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(vocabulary, width).bfloat16())
    weight.master = weight.detach().float()  # as tagged_master_weights tags it
    weight.master.grad = torch.randn(vocabulary, width) * 1e-4  # an earlier micro-batch's
    earlier = weight.master.grad.clone()
    features = torch.randn(tokens, width).bfloat16().requires_grad_()
    targets = torch.randint(0, vocabulary, (tokens,))

    def forward_and_backward():
        logp, _ = scale.OutputLayerLogprobs.apply(features, weight, None, targets,
                                                  (1.0, None, 0.7), False)
        logp.sum().backward()
    _, peak = peak_memory(forward_and_backward, "cpu")
    assert weight.grad is None
    assert peak < 2.5 * scale.LOGITS_BLOCK_BYTES < vocabulary * width * 2  # no (V, H) bf16 gradient
    logits = (features @ weight.T).float().detach().requires_grad_()  # bf16 logits, as the model's
    reference = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[:, None]).sum()
    expected = torch.autograd.grad(reference, logits)[0].T @ features.detach().float()  # (V, H)
    added = weight.master.grad - earlier
    assert (added - expected).norm() < 1e-2 * expected.norm()  # one bf16 rounding of each row


def test_a_tied_bf16_output_layer_gets_both_of_its_gradients_in_its_fp32_master(tiny):
    model, _ = load_tiny(tiny, torch.bfloat16, lean=True)
    plain, _ = load_tiny(tiny, torch.bfloat16)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not model.scored_by_forward  # the output layer's path, which fills the master
    master, _ = scale.tagged_master_weights_and_optimizer(model, ScaleConfig())
    ids = torch.arange(1, 17)[None]
    attention, completion = torch.ones_like(ids), torch.ones(1, 12, dtype=torch.bool)
    for _ in range(2):  # two micro-batches accumulate
        scale.lean_token_logprobs(model, ids, attention, 4, completion, 0.7)[0].sum().backward()
        igrpo.token_logprobs(plain, ids, attention, 4, completion, 0.7)[0].sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in master)
    for (name, p), m in zip(plain.named_parameters(), master):  # plain: bf16 sums, rounded more
        assert (m.grad - p.grad.float()).norm() <= 1e-2 * p.grad.float().norm(), name


def shrunk(config):
    """A causal-LM config at its defaults, shrunk to a tiny model: every size a few units, the
    vocabulary 256, the sub-configs alike; logit scalings and soft-caps set to 3, so a scorer that
    skips them is caught."""
    sizes = dict(hidden_size=64, n_embd=64, d_model=64, n_embed=64, embed_dim=64, dim=64,
                 num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2, decoder_layers=2,
                 num_attention_heads=4, n_head=4, num_heads=4, n_heads=4,
                 decoder_attention_heads=4, num_key_value_heads=4, num_kv_heads=4,
                 intermediate_size=128, n_inner=128, ffn_dim=128, decoder_ffn_dim=128, d_ff=128,
                 max_position_embeddings=128)
    values = config.to_dict()
    layers = next((values[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(values.get(k), int)), None)
    small = {}
    for name, value in values.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            if name in sizes:
                small[name] = sizes[name]
            elif "vocab" in name:
                small[name] = 256
            elif "head_dim" in name or "rotary_dim" in name or "rope_dim" in name:
                small[name] = 16
            elif name.endswith("token_id") and value >= 256:
                small[name] = 1
            elif value > 64 and "token" not in name and "id" not in name.split("_"):
                small[name] = 32
        elif isinstance(value, float) and ("logit" in name or name.endswith("multiplier")):
            small[name] = 3.0
        elif isinstance(value, list) and layers not in (None, 2) and len(value) == layers:
            small[name] = value[:2]  # per-layer settings
        elif (isinstance(value, dict) and "model_type" in value
              and hasattr(getattr(config, name), "to_dict")):
            small[name] = shrunk(getattr(config, name)).to_dict()  # a sub-config
    return type(config)(**small)


def test_log_probs_match_the_models_own_logits_for_every_causal_lm_architecture(capsys):
    """Every causal LM of the installed transformers that builds tiny: lean_token_logprobs must
    equal log_softmax(model(...).logits / T) on the completion tokens, whichever path
    check_scoring picks. Details go into the assertion messages, never into pytest's output."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    transformers.logging.set_verbosity_error()
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(10).expand(2, -1)  # as generate() numbers an unpadded prompt
    mask, temperature, table = torch.ones(2, 6, dtype=torch.bool), 0.7, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~200 tiny forwards: one thread is faster, and immune to a busy box
    try:
        for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            try:
                torch.manual_seed(0)
                config = shrunk(CONFIG_MAPPING[model_type]())
                model = AutoModelForCausalLM.from_config(config).eval()
                with torch.no_grad():
                    logits = model(input_ids=ids, position_ids=positions,
                                   use_cache=False).logits.float()
            except Exception as error:  # noqa: BLE001  a config that does not shrink: counted
                table[model_type] = ("skipped", f"{type(error).__name__}: {str(error)[:90]!r}")
                continue
            reference = torch.log_softmax(logits[:, 3:-1] / temperature, -1)
            reference = reference.gather(-1, ids[:, 4:, None]).squeeze(-1)           # (2, 6)
            with torch.no_grad():
                scale.check_scoring(model, model_type)
                logp = scale.lean_token_logprobs(model, ids, torch.ones_like(ids), 4, mask,
                                                 temperature)[0]
            error = (logp - reference).abs().max().item()
            path = "own forward" if model.scored_by_forward else "output layer"
            table[model_type] = ("matches" if error < 1e-4 else "DIFFERS",
                                 f"{path}, max error {error:.1e}")
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()  # check_scoring's lines for the own-forward models: not for pytest's output
    counts = {r: sum(v[0] == r for v in table.values()) for r in ("matches", "DIFFERS", "skipped")}
    differs = {name: detail for name, (result, detail) in table.items() if result == "DIFFERS"}
    assert differs == {}, f"{len(table)} architectures, {counts}"
    skipped = {name: detail for name, (result, detail) in table.items() if result == "skipped"}
    assert counts["matches"] >= 100, f"{counts}; skipped: {skipped}"
    for scaled in ("granite", "granitemoehybrid", "cohere", "falcon_h1", "gemma2", "llama",
                   "qwen2"):  # the memory-light path, with each model's logit scaling applied
        assert table[scaled][0] == "matches" and "output layer" in table[scaled][1], \
            (scaled, table[scaled])


def test_logits_changed_in_an_unknown_way_are_scored_through_the_models_own_forward(
        tiny, monkeypatch, capsys):
    model, tokenizer = load_tiny(tiny, lean=True)
    assert not model.scored_by_forward
    plain_forward, bias = model.forward, torch.linspace(-3, 3, model.config.vocab_size)

    def biased_forward(*args, **kwargs):  # e.g. a final_logits_bias the output layer does not hold
        output = plain_forward(*args, **kwargs)
        output.logits = output.logits + bias
        return output
    monkeypatch.setattr(model, "forward", biased_forward)
    scale.check_scoring(model, "--model biased")
    assert "--model biased: log-probs come from the model's own forward" in capsys.readouterr().out
    ids = torch.tensor([tokenizer("What is 3 + 1? 4").input_ids])
    with torch.no_grad():
        logp = scale.lean_token_logprobs(model, ids, torch.ones_like(ids), ids.shape[1] - 3,
                                         torch.ones(1, 3, dtype=torch.bool), 0.5)[0]
        reference = torch.log_softmax(model(ids).logits[0, -4:-1] / 0.5, -1)
    reference = reference.gather(-1, ids[0, -3:, None]).squeeze(-1)
    assert model.scored_by_forward and torch.allclose(logp[0], reference, atol=1e-5)


def test_a_model_whose_forward_fails_is_refused_before_training(tiny, monkeypatch):
    model, _ = load_tiny(tiny)

    def broken_forward(*args, **kwargs):
        raise RuntimeError("expected 4D input")
    monkeypatch.setattr(model, "forward", broken_forward)
    with pytest.raises(SystemExit, match="--model odd: its forward pass fails .* 4D input"):
        scale.check_scoring(model, "--model odd")


@pytest.mark.parametrize("architecture,scaling,weight_scale", [
    ("llama", {}, 40), ("granite", dict(logits_scaling=8.0), 320),
    ("cohere", dict(logit_scale=0.0625), 600),
    ("gemma2", dict(final_logit_softcapping=30.0, head_dim=16), 40)])
def test_bf16_models_with_logits_of_a_trained_size_keep_the_memory_light_path(
        architecture, scaling, weight_scale):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    config = CONFIG_MAPPING[architecture](vocab_size=2000, hidden_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=4,
                                          intermediate_size=128, **scaling)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a trained model's logits span tens of nats, where bf16 rounding shows
        model.get_output_embeddings().weight.mul_(weight_scale)
    model = model.to(torch.bfloat16).eval()
    scale.check_scoring(model, architecture)
    ids = torch.randint(3, 1999, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, position_ids=torch.arange(32).expand(2, -1)).logits.float()
        mask = torch.ones(2, 16, dtype=torch.bool)
        logp = scale.lean_token_logprobs(model, ids, torch.ones_like(ids), 16, mask, 1.0)[0]
    reference = torch.log_softmax(logits[:, 15:-1], -1).gather(-1, ids[:, 16:, None]).squeeze(-1)
    assert logits.abs().max() > 20 and not model.scored_by_forward
    assert (logp - reference).abs().max() < 0.01 * logits.abs().max()


def test_bf16_soft_capped_logits_that_barely_change_between_positions_are_not_taken_for_a_bias():
    """Entries whose logit stays near -19.3 in every context (a trained model's unused tokens):
    the model's bf16 soft-cap rounds them the same way each time, which is not a bias."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    config = CONFIG_MAPPING["gemma2"](vocab_size=2000, hidden_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=128, final_logit_softcapping=30.0,
                                      head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    head = torch.nn.Linear(64, 2000, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 40)
        head.weight[:20] /= 40  # rows 0-19: logits that vary by about 0.1 between contexts
        head.bias.zero_()
        head.bias[:20] = -19.3
    model.lm_head = head
    model = model.to(torch.bfloat16).eval()
    scale.check_scoring(model, "gemma2")
    assert not model.scored_by_forward


@pytest.mark.parametrize("architecture,scaling", [
    ("llama", {}), ("gemma2", dict(final_logit_softcapping=30.0, head_dim=16))])
def test_a_small_logit_bias_in_a_bf16_forward_is_caught_though_rounding_is_larger(
        architecture, scaling, monkeypatch, capsys):
    """A forward that adds at most 0.1 nats to each logit, below bf16's rounding of logits near 30
    (and the soft-cap's, up to 0.2 nats): the same entries are off the same way at every position,
    so check_scoring sends the model through its own forward."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    config = CONFIG_MAPPING[architecture](vocab_size=2000, hidden_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=4,
                                          intermediate_size=128, **scaling)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # logits near 30, as a trained model's
    model = model.to(torch.bfloat16).eval()
    plain_forward, bias = model.forward, torch.linspace(-0.1, 0.1, 2000, dtype=torch.bfloat16)

    def biased_forward(*args, **kwargs):
        output = plain_forward(*args, **kwargs)
        output.logits = output.logits + bias
        return output
    monkeypatch.setattr(model, "forward", biased_forward)
    scale.check_scoring(model, architecture)
    assert model.scored_by_forward, capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Compiled sampling: a static KV cache in fixed-shape generate calls
# ----------------------------------------------------------------------------------------------
def test_static_cache_sampling_draws_the_same_tokens_as_the_default_path(tiny):
    prompts = ["Problem: What is 1 + 1?\n\nSolution:", "What is 12 + 1 and 3 + 4?"]
    drawn = {}
    for mode in ("off", "on"):  # on the CPU, "on" is the static cache and bucketing, uncompiled
        cfg = ScaleConfig(chat_template="off", compile_generation=mode)
        model, tokenizer = load_tiny(tiny, cfg=cfg)
        torch.manual_seed(3)
        sample = scale.scale_parts(cfg).sample
        assert (sample is scale.compiled_sample) == (mode == "on")
        drawn[mode] = sample(model, tokenizer, prompts, cfg, per_prompt=4, max_new_tokens=10,
                             temperature=1.0)
    assert drawn["on"].texts == drawn["off"].texts and len(set(drawn["on"].texts)) > 1
    assert torch.equal(drawn["on"].completion_mask, drawn["off"].completion_mask)


def test_fixed_shape_generate_calls_drop_their_padding_rows(tiny, monkeypatch):
    cfg = ScaleConfig(chat_template="off", compile_generation="on", generation_batch_size=4)
    model, tokenizer = load_tiny(tiny, cfg=cfg)
    shapes, real_generate = [], model.generate

    def generate(**kwargs):
        shapes.append((len(kwargs["input_ids"]), kwargs["cache_implementation"],
                       kwargs["max_cache_len"]))
        return real_generate(**kwargs)
    monkeypatch.setattr(model, "generate", generate)
    prompts = ["What is 1 + 1?", "Problem: What is 12 + 1 and 3 + 4?", "What?"]
    samples = scale.compiled_sample(model, tokenizer, prompts, cfg, per_prompt=2, max_new_tokens=6,
                                    temperature=1.0)
    assert shapes == [(4, "static", 256), (4, "static", 256)]  # 6 rows: 4, then 2 + 2 padding
    assert samples.input_ids.shape[0] == len(samples.texts) == 6
    P = samples.prompt_length
    for row in range(6):
        prompt = samples.input_ids[row, :P][samples.attention_mask[row, :P] == 1]
        assert tokenizer.decode(prompt) == prompts[row // 2]


def test_static_cache_sampling_inherits_nothing_from_a_hostile_generation_config(tiny):
    cfg = ScaleConfig(chat_template="off", compile_generation="on")
    clean, tokenizer = load_tiny(tiny, cfg=cfg)
    model, _ = load_tiny(tiny, cfg=cfg)
    hostile_generation_defaults(model)
    prompt = ["Problem: What is 1 + 1?\n\nSolution:"]
    options = dict(per_prompt=4, max_new_tokens=8, temperature=0.5)
    torch.manual_seed(1)
    ours = scale.compiled_sample(model, tokenizer, prompt * 3, cfg, **options)
    torch.manual_seed(1)
    reference = scale.compiled_sample(clean, tokenizer, prompt * 3, cfg, **options)
    assert ours.texts == reference.texts and int(ours.lengths.min()) > 1  # hostile: one token
    assert len(set(ours.texts)) > 1
    assert model.generation_config.top_k == 1  # the checkpoint's own defaults are kept as they were


def test_training_log_probs_match_the_static_cache_samplers_within_precision_noise(
        tiny, monkeypatch):
    """On CUDA (the GPU check) this runs compiled decoding in bf16; on the CPU, the static cache."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, tolerance = (torch.bfloat16, 0.1) if device == "cuda" else (torch.float32, 1e-4)
    cfg = ScaleConfig(chat_template="off", compile_generation="on")
    model, tokenizer = scale.lean_load_model(str(tiny / "model"), cfg, dtype, device)
    sampler_logits, real_generate = [], model.generate

    def generate(**kwargs):  # the logits the sampler drew from, softmax(logits / T) of them
        kwargs["generation_config"].update(output_logits=True, return_dict_in_generate=True)
        output = real_generate(**kwargs)
        sampler_logits.append(torch.stack(output.logits, 1).float())            # (B, T, V)
        return output.sequences
    monkeypatch.setattr(model, "generate", generate)
    torch.manual_seed(0)
    samples = scale.compiled_sample(model, tokenizer, ["What is 2 + 2?", "What?"], cfg,
                                    per_prompt=2, max_new_tokens=6, temperature=0.7)
    drawn = samples.input_ids[:, samples.prompt_length:]                           # (B, T)
    sampler = torch.log_softmax(sampler_logits[0][:len(drawn), :drawn.shape[1]] / 0.7, -1)
    sampler = sampler.gather(-1, drawn[..., None]).squeeze(-1)
    with torch.no_grad():
        ours = scale.lean_token_logprobs(model, samples.input_ids, samples.attention_mask,
                                         samples.prompt_length, samples.completion_mask, 0.7)[0]
    mask = samples.completion_mask
    assert mask.sum() > 4 and (ours[mask] - sampler[mask]).abs().max() < tolerance


def test_compile_generation_is_on_for_cuda_only_by_default_and_validated(tiny, tmp_path):
    assert scale.compiles_generation(ScaleConfig(), "cuda")
    assert not scale.compiles_generation(ScaleConfig(), "cpu")
    assert scale.compiles_generation(ScaleConfig(compile_generation="on"), "cpu")
    assert not scale.compiles_generation(ScaleConfig(compile_generation="off"), "cuda")
    with pytest.raises(SystemExit, match="--compile-generation 'yes'"):
        scale.train(scale_config(tiny, tmp_path, compile_generation="yes"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------
def lora_model(tiny, tmp_path, dtype=torch.float32, **overrides):
    """The tiny model with adapters, as lora_policy builds it inside a run."""
    cfg = scale_config(tiny, tmp_path, lora_rank=4, lora_alpha=8.0, **overrides)
    model, tokenizer = scale.lean_load_model(cfg.model, cfg, dtype, "cpu")
    return scale.apply_lora(model, cfg), tokenizer, cfg


def fixed_samples(model, tokenizer, cfg):
    torch.manual_seed(0)
    return igrpo.sample(model, tokenizer, PROMPTS, cfg, per_prompt=4, temperature=1.0)


def update(model, samples, cfg, reference=None, advantages=ADVANTAGES, optimizer=None,
           world=None):
    """One igrpo.policy_update with scale.py's parts (torchrun's, in world); returns its sums."""
    parts = scale.scale_parts(cfg, world)
    master, fresh = parts.make_optimizer(model, cfg)
    policy = igrpo.Policy(model, None, optimizer or fresh, master, reference)
    keep = torch.ones(len(advantages), dtype=torch.bool)
    return igrpo.policy_update(policy, samples, advantages, keep, cfg, parts)


def logprobs(model, samples):
    """igrpo's plain log-probs: the reference a model's numbers are checked against."""
    with torch.no_grad():
        return igrpo.token_logprobs(model, samples.input_ids, samples.attention_mask,
                                    samples.prompt_length, samples.completion_mask, 1.0)[0]


def test_lora_trains_only_fp32_adapters_over_a_frozen_bf16_base(tiny, tmp_path):
    model, _, _ = lora_model(tiny, tmp_path, torch.bfloat16)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and p.dtype == torch.float32
                             for name, p in trainable.items())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    master, _ = scale.tagged_master_weights_and_optimizer(model, ScaleConfig())
    assert len(master) == len(trainable)  # fp32 adapters are their own masters: no copies
    assert all(any(m is p for p in trainable.values()) for m in master)


def test_adding_adapters_to_a_checkpointed_model_warns_of_nothing(tiny, tmp_path):
    import warnings
    cfg = scale_config(tiny, tmp_path, lora_rank=4)
    model, _ = load_tiny(tiny, cfg=cfg)
    model.activation_checkpointing_enable({"use_reentrant": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scale.apply_lora(model, cfg)
    assert [str(w.message) for w in caught] == []


def test_a_lora_adapter_on_the_output_layer_shapes_the_log_probs_and_gets_gradients(
        tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "LOGITS_BLOCK_BYTES", 4 * 520 * 2)  # chunks of 2 tokens' logits
    model, tokenizer, cfg = lora_model(tiny, tmp_path, lora_targets="q_proj,v_proj,lm_head")
    assert type(model.get_output_embeddings()) is not torch.nn.Linear  # the adapter's own forward
    with torch.no_grad():  # as after some updates: the adapters' B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([tokenizer("What is 3 + 1? It is 4, so 4.").input_ids])
    mask = torch.ones(1, 6, dtype=torch.bool)
    logp = scale.lean_token_logprobs(model, ids, torch.ones_like(ids), ids.shape[1] - 6, mask,
                                     0.7)[0]
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=ids).logits[:, -7:-1] / 0.7, -1)
    assert torch.allclose(logp, reference.gather(-1, ids[:, -6:, None]).squeeze(-1), atol=1e-5)
    logp.sum().backward()
    head_adapters = [p for name, p in model.named_parameters()
                     if "lm_head" in name and p.requires_grad]
    assert head_adapters and all(p.grad is not None and p.grad.abs().sum() > 0
                                 for p in head_adapters)


def test_a_lora_update_changes_only_adapters_and_the_frozen_base_stays_bit_identical(
        tiny, tmp_path):
    model, tokenizer, cfg = lora_model(tiny, tmp_path, lr=0.05)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    samples = fixed_samples(model, tokenizer, cfg)
    for _ in range(2):
        update(model, samples, cfg)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # B starts at zero; it must have moved


def test_k3_kl_to_the_adapters_off_reference_is_zero_at_step_zero_and_not_after(tiny, tmp_path):
    model, tokenizer, cfg = lora_model(tiny, tmp_path, lr=0.05, beta=0.1)
    base, _ = load_tiny(tiny, cfg=cfg)
    samples = fixed_samples(model, tokenizer, cfg)
    reference = scale.AdaptersOff(model)
    assert list(reference.parameters()) == []  # no second copy of the weights
    master, optimizer = scale.tagged_master_weights_and_optimizer(model, cfg)
    kls = [update(model, samples, cfg, reference, optimizer=optimizer)["kl"] for _ in range(3)]
    assert kls[0] == 0.0 and kls[2] > 0.0
    assert torch.allclose(logprobs(reference, samples), logprobs(base, samples), atol=1e-6)
    assert not torch.allclose(logprobs(model, samples), logprobs(base, samples), atol=1e-3)  # on


def test_the_adapters_off_reference_is_scored_on_the_lean_path_with_the_bases_log_probs(
        tiny, tmp_path, monkeypatch):
    model, tokenizer, cfg = lora_model(tiny, tmp_path, beta=0.1)
    base, _ = load_tiny(tiny, cfg=cfg)
    samples = fixed_samples(model, tokenizer, cfg)
    rows = torch.arange(len(samples.texts))
    monkeypatch.setattr(scale.AdaptersOff, "forward", lambda *args, **kwargs: pytest.fail(
        "the reference pass went through AdaptersOff's whole-logits forward"))
    parts = scale.scale_parts(cfg)
    reference, = igrpo.no_grad_logprobs(scale.AdaptersOff(model), samples, [(rows, None)], cfg,
                                        parts)
    expected, = igrpo.no_grad_logprobs(base, samples, [(rows, None)], cfg, igrpo.Parts())
    assert torch.allclose(reference, expected, atol=1e-5)


def test_saved_adapter_and_merged_model_reload_with_the_trained_log_probs(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model, tokenizer, cfg = lora_model(tiny, tmp_path, lr=0.05, save_merged=True)
    samples = fixed_samples(model, tokenizer, cfg)
    for _ in range(2):
        update(model, samples, cfg)
    trained = logprobs(model, samples)
    final = tmp_path / "run" / "final"
    igrpo.save(final, igrpo.Policy(model, tokenizer, None, []), scale.scale_parts(cfg))
    scale.save_merged(cfg)
    assert (final / "adapter_config.json").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter alone, not the base again
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model), final)
    by_scale, _ = scale.lean_load_model(str(final), cfg, torch.float32, "cpu")  # eval.py's
    by_igrpo, _ = igrpo.load_model(str(final), cfg, torch.float32, "cpu")  # transformers' peft
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final-merged")
    base = AutoModelForCausalLM.from_pretrained(cfg.model)
    assert not torch.allclose(logprobs(base, samples), trained, atol=1e-3)
    for reloaded in (by_peft.get_base_model(), by_scale, by_igrpo, merged):
        assert torch.allclose(logprobs(reloaded, samples), trained, atol=1e-5)


def test_a_short_one_process_lora_run_with_kl_saves_the_adapter_and_the_merged_model(
        tiny, tmp_path):
    scale.train(scale_config(tiny, tmp_path, lora_rank=4, beta=0.01, save_merged=True,
                             gradient_checkpointing=True))
    assert not torch.distributed.is_initialized()  # without torchrun no process group is created
    steps = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(steps) == 2 and all(step["kl"] is not None for step in steps)
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "final-merged" / "config.json").is_file()


def test_overwrite_deletes_the_old_runs_merged_model_too_but_nothing_else(tiny, tmp_path):
    out = tmp_path / "run"
    for name in ("step-3", ".step-4.tmp", "final", "final-merged", "notes"):
        (out / name).mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    assert igrpo.start_run(scale_config(tiny, tmp_path, overwrite=True), igrpo.World()) == (0, [])
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "notes"]


@pytest.mark.parametrize("overrides,message", [
    (dict(lora_rank=-1), "--lora-rank -1"),
    (dict(save_merged=True), "--save-merged: only with --lora-rank"),
    (dict(lora_rank=4, lora_targets="no_such_proj"), "--lora-targets 'no_such_proj'"),
])
def test_bad_lora_settings_stop_with_a_clear_message(tiny, tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        scale.train(scale_config(tiny, tmp_path, **overrides))


def test_lora_without_peft_installed_is_a_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(SystemExit, match=re.escape("--lora-rank: LoRA needs the optional peft")):
        scale.train(scale_config(tiny, tmp_path, lora_rank=4))


# ----------------------------------------------------------------------------------------------
# torchrun: FSDP2 over two gloo processes on the CPU
# ----------------------------------------------------------------------------------------------
def spawn_ranks(worker, folder, *args, ranks=2):
    """worker(rank, *args) in each of `ranks` processes that joined as under torchrun, through a
    file in folder (no port to pick, free one moment and taken the next)."""
    rendezvous = folder / f"rendezvous-{uuid.uuid4().hex}"
    torch.multiprocessing.spawn(as_rank, args=(ranks, rendezvous, worker, args), nprocs=ranks)


def as_rank(rank, ranks, rendezvous, worker, args):
    import faulthandler
    faulthandler.enable()  # a rank that aborts shows where
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(ranks))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                         world_size=ranks)
    try:
        worker(rank, *args)
        torch.distributed.barrier()  # both ranks done before either tears down
    finally:  # a process that exits with its group alive may abort in gloo's threads
        torch.distributed.destroy_process_group()


def seeded_by_prompt(model, tokenizer, prompts, cfg, **options):
    """igrpo.sample, each prompt's completions drawn with a seed of its own: the same completions
    however the problems are shared out."""
    each = []
    for prompt in prompts:
        torch.manual_seed(zlib.crc32(prompt.encode()))
        each.append(igrpo.sample(model, tokenizer, [prompt], cfg, **options))
    return igrpo.Sequences(*stacked(each)) if each else igrpo.sample(model, tokenizer, [], cfg,
                                                                     **options)


def stacked(each):
    """The fields of one Sequences from several, padded alike (left prompts, right completions)."""
    P, T = max(s.prompt_length for s in each), max(s.completion_mask.shape[1] for s in each)

    def pad(tensor, left, right, value):
        return torch.nn.functional.pad(tensor, (left, right), value=value)
    ids = torch.cat([pad(s.input_ids, P - s.prompt_length, T - s.completion_mask.shape[1], 0)
                     for s in each])
    attention = torch.cat([pad(s.attention_mask, P - s.prompt_length,
                               T - s.completion_mask.shape[1], 0) for s in each])
    mask = torch.cat([pad(s.completion_mask, 0, T - s.completion_mask.shape[1], False)
                      for s in each])
    return ids, attention, P, mask, [text for s in each for text in s.texts]


def rewards_by_problem(completions, golds, cfg, lengths=None, problems=None, judge=None):
    """1, 0, 1, ... within the groups of "What is a + 1?" with a even; all 0 for a odd (their
    groups agree, and DAPO drops them)."""
    odd = [int(re.search(r"\d+", p)[0]) % 2 for p in problems]
    total = torch.tensor([0.0 if odd[i] else float(i % 2) for i in range(len(completions))])
    return igrpo.Rewards(total, total, torch.zeros(len(completions)), 0)


def fsdp_config(tiny, folder, **overrides):
    """4 problems a step: two groups that differ, two that agree; 3 steps, a checkpoint each."""
    return scale_config(tiny, folder.parent, output_dir=str(folder), steps=3, save_every=1,
                        prompts_per_step=4, lr=1e-4, dtype="fp32", **overrides)


def train_seeded(cfg, world=None):
    """igrpo.train with scale.py's parts (FSDP2's in a world), each prompt sampled with its seed."""
    parts = scale.scale_parts(cfg, world)
    sample = scale.gathered_once(seeded_by_prompt) if world else seeded_by_prompt
    return igrpo.train(cfg, dataclasses.replace(parts, sample=sample))


class RecordedBars(igrpo.tqdm):
    """igrpo.py's progress bars, each recorded with whether it draws."""
    drawn = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordedBars.drawn.append(not self.disable)


def train_on_rank(rank, tiny, folder, overrides, crash_in_step=None):
    igrpo.compute_rewards = rewards_by_problem
    igrpo.tqdm = RecordedBars
    if crash_in_step:
        step_that(pytest.MonkeyPatch(), crash_in_step, crash)
    cfg = fsdp_config(tiny, folder, **overrides)
    try:
        train_seeded(cfg, scale.setup_distributed(cfg))
    except Crash:
        return
    model = igrpo.load_model(str(folder / "final"), cfg, torch.float32, "cpu")[0]
    torch.save(dict(rank=rank, stdout=sys.stdout.name, final=model.state_dict(),
                    bars=RecordedBars.drawn), folder.parent / f"{folder.name}-rank{rank}.pt")


def crash():
    raise Crash("killed")


@pytest.fixture(scope="module")
def fsdp_runs(tiny, tmp_path_factory):
    """Runs of 3 steps with --loss dapo: one process; two FSDP2 ranks; two ranks killed in step 3
    and resumed by two ranks; the same killed run resumed by one FSDP2 rank, and by one process
    without torchrun."""
    folder = tmp_path_factory.mktemp("fsdp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(igrpo, "compute_rewards", rewards_by_problem)
        train_seeded(fsdp_config(tiny, folder / "one", loss="dapo"))
    spawn_ranks(train_on_rank, folder, tiny, folder / "two", dict(loss="dapo"))
    for name in ("killed", "killed-1"):
        spawn_ranks(train_on_rank, folder, tiny, folder / name, dict(loss="dapo"), 3)
    spawn_ranks(train_on_rank, folder, tiny, folder / "killed", dict(loss="dapo", resume=True))
    spawn_ranks(train_on_rank, folder, tiny, folder / "killed-1", dict(loss="dapo", resume=True),
                ranks=1)
    return folder


def test_two_fsdp_ranks_end_with_the_weights_of_one_process_over_the_same_problems(
        tiny, fsdp_runs):
    start = load_file(tiny / "model" / "model.safetensors")
    one, two = final_weights(fsdp_runs / "one"), final_weights(fsdp_runs / "two")
    moved = max((one[name] - start[name]).abs().max().item() for name in one)
    difference = max((one[name] - two[name]).abs().max().item() for name in one)
    assert moved > 1e-4 and difference < 1e-3 * moved, (moved, difference)
    rows = [json.loads(line) for line in open(fsdp_runs / "two" / "metrics.jsonl")]
    expected = [json.loads(line) for line in open(fsdp_runs / "one" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    dropped = [r["dropped_groups"] for r in rows]
    # step 3 drops 3 of its 4 groups: a rank whose groups all agree still takes part
    assert dropped == [r["dropped_groups"] for r in expected] == [1, 2, 3]
    for got, want in zip(rows, expected):  # each number of the step over both ranks
        for name in ("reward", "accuracy", "clip_frac", "entropy", "completion_tokens",
                     "mean_completion_length", "best_draft_reward", "grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)


def test_only_rank_0_writes_and_prints_and_final_is_the_gathered_model(fsdp_runs):
    ranks = [torch.load(fsdp_runs / f"two-rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["stdout"] != os.devnull and ranks[1]["stdout"] == os.devnull
    # the steps' bar and each sampling call's and update's: drawn on rank 0 alone
    assert len(ranks[1]["bars"]) > 3 and not any(ranks[1]["bars"]) and all(ranks[0]["bars"])
    saved = final_weights(fsdp_runs / "two")
    assert all(torch.equal(saved[name], ranks[0]["final"][name]) for name in saved)
    assert not list((fsdp_runs / "two").glob("*rank*"))
    [step] = [p for p in igrpo.checkpoints(fsdp_runs / "two")][-1:]
    assert (step / "optimizer" / ".metadata").is_file()  # each rank's shard, by DCP


def test_a_two_rank_run_killed_in_a_step_resumes_to_the_weights_of_an_unbroken_one(fsdp_runs):
    unbroken = final_weights(fsdp_runs / "two")
    for name in ("killed", "killed-1"):  # resumed by two ranks, and by one
        resumed = final_weights(fsdp_runs / name)
        assert training_steps(fsdp_runs / name) == [1, 2, 3]
        difference = max((unbroken[k] - resumed[k]).abs().max().item() for k in unbroken)
        assert difference < (1e-7 if name == "killed" else 1e-5), (name, difference)


def test_a_sharded_checkpoint_resumed_without_torchrun_is_one_line_naming_both_sizes(
        tiny, fsdp_runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(fsdp_runs / "killed", folder)
    shutil.rmtree(folder / "final")
    message = (r"was written by 2 processes under torchrun .* this run "
               r"is 1 process: resume it with torchrun --nproc-per-node 2")
    with pytest.raises(SystemExit, match=message):
        train_seeded(fsdp_config(tiny, folder, loss="dapo", resume=True))


def bytes_on_rank(rank, tiny, folder):
    world = scale.setup_distributed()
    cfg = fsdp_config(tiny, folder)
    model = scale.sharded_policy(cfg, None, "cpu", torch.float32)[0]
    master, optimizer = scale.sharded_optimizer(model, cfg)
    local = sum(p.to_local().numel() for p in model.parameters())
    whole = sum(p.numel() for p in model.parameters())
    torch.save(dict(local=local, whole=whole, world=world.size), folder / f"bytes-rank{rank}.pt")


def test_each_rank_holds_about_half_the_parameters_and_optimizer_state(tiny, tmp_path):
    spawn_ranks(bytes_on_rank, tmp_path, tiny, tmp_path)
    counts = [torch.load(tmp_path / f"bytes-rank{rank}.pt") for rank in (0, 1)]
    assert counts[0]["world"] == 2 and counts[0]["local"] + counts[1]["local"] == counts[0]["whole"]
    assert all(abs(c["local"] - c["whole"] / 2) < 0.05 * c["whole"] for c in counts)


def lora_on_rank(rank, tiny, folder, crash_in_step=None, resume=False):
    igrpo.compute_rewards = alternate_rewards  # every group's rewards differ: every step trains
    if crash_in_step:
        step_that(pytest.MonkeyPatch(), crash_in_step, crash)
    cfg = scale_config(tiny, folder.parent, output_dir=str(folder), lora_rank=4, beta=0.01,
                       lr=0.05, steps=3, save_every=1, log_completions_every=1, eval_limit=1,
                       eval_dataset=str(tiny / "train.jsonl"), resume=resume)  # rank 1: no problem
    try:
        scale.train(cfg)
    except Crash:
        pass


def adapter(folder):
    return load_file(folder / "final" / "adapter_model.safetensors")


def test_a_lora_run_on_two_ranks_with_kl_and_held_out_scoring_resumes_to_the_unbroken_weights(
        tiny, tmp_path):
    spawn_ranks(lora_on_rank, tmp_path, tiny, tmp_path / "unbroken")
    spawn_ranks(lora_on_rank, tmp_path, tiny, tmp_path / "resumed", 3)
    assert not (tmp_path / "resumed" / "final").exists()
    spawn_ranks(lora_on_rank, tmp_path, tiny, tmp_path / "resumed", None, True)
    unbroken, resumed = adapter(tmp_path / "unbroken"), adapter(tmp_path / "resumed")
    assert any(p.abs().max() > 0 for name, p in unbroken.items() if "lora_B" in name)  # trained
    assert all(torch.allclose(unbroken[name], resumed[name], atol=1e-6) for name in unbroken)
    rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 3]  # held-out 1 problem, rank 1 none
    assert all(r["kl"] is not None and r["completion_tokens"] > 0 for r in rows[1:4])
    completions = [json.loads(line) for line in open(tmp_path / "resumed" / "completions.jsonl")]
    assert [row["step"] for row in completions] == [1, 2, 3]  # rank 0's problem of each step


def test_a_one_process_lora_run_resumes_to_the_weights_of_an_unbroken_one(tiny, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(igrpo, "compute_rewards", alternate_rewards)
    settings = dict(lora_rank=4, beta=0.01, lr=0.05, steps=3, save_every=1)
    scale.train(scale_config(tiny, tmp_path, output_dir=str(tmp_path / "unbroken"), **settings))
    cfg = scale_config(tiny, tmp_path, output_dir=str(tmp_path / "resumed"), **settings)
    with monkeypatch.context() as patch:
        step_that(patch, 3, crash)
        with pytest.raises(Crash):
            scale.train(cfg)
    scale.train(dataclasses.replace(cfg, resume=True))
    unbroken, resumed = adapter(tmp_path / "unbroken"), adapter(tmp_path / "resumed")
    assert all(torch.equal(unbroken[name], resumed[name]) for name in unbroken)


def sigterm_on_rank(rank, tiny, folder):
    if rank == 1:  # a preempted machine: one rank is told to stop, in step 2
        step_that(pytest.MonkeyPatch(), 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    cfg = scale_config(tiny, folder.parent, output_dir=str(folder), steps=4)
    try:
        scale.train(cfg)
    except SystemExit as stop:
        torch.save(stop.code, folder.parent / f"exit-rank{rank}.pt")


def test_a_sigterm_on_one_rank_stops_every_rank_after_the_same_step_with_one_checkpoint(
        tiny, tmp_path):
    spawn_ranks(sigterm_on_rank, tmp_path, tiny, tmp_path / "run")
    assert [torch.load(tmp_path / f"exit-rank{rank}.pt") for rank in (0, 1)] == [130, 130]
    run = tmp_path / "run"
    assert igrpo.checkpoints(run) == [run / "step-2"] and training_steps(run) == [1, 2]


def judge_stop_on_rank(rank, tiny, folder):
    def judge_that_never_scores(problems, golds, completions):
        return [None] * len(completions)
    cfg = scale_config(tiny, folder.parent, output_dir=str(folder), reward="judge", steps=5)
    try:
        scale.train(cfg, judge=judge_that_never_scores)
    except SystemExit as stop:
        torch.save(str(stop), folder.parent / f"stop-rank{rank}.pt")


def test_under_torchrun_every_rank_counts_all_judge_replies_and_stops_at_the_same_checkpoint(
        tiny, tmp_path):
    spawn_ranks(judge_stop_on_rank, tmp_path, tiny, tmp_path / "run")
    for rank in (0, 1):
        assert "steps 1 to 3 had no judge reply that held a score" in torch.load(
            tmp_path / f"stop-rank{rank}.pt")
    run = tmp_path / "run"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["judge_unparsed"] for r in records] == [8, 8, 8]  # 2 problems x 4, both ranks
    assert igrpo.checkpoints(run) == [run / "step-3"]
    assert (run / "step-3" / "trainer_state.pt").is_file()


LOSSES = ("grpo", "dapo", "dr_grpo")  # per-completion mean, global token mean, constant normalizer


def sgd_step(tiny, tmp_path, loss, samples, advantages, world=None):
    """SGD with lr 1 and no clipping: the weight change is minus the step's gradient."""
    cfg = scale_config(tiny, tmp_path, loss=loss, max_grad_norm=1e9)
    model, _ = igrpo.load_model(cfg.model, cfg, torch.float32, "cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    if world:
        scale.shard(model, torch.float32, "cpu")
    trained = [p for p in model.parameters() if p.requires_grad]
    policy = igrpo.Policy(model, None, torch.optim.SGD(trained, lr=1.0), trained)
    keep = torch.ones(len(advantages), dtype=torch.bool)
    igrpo.policy_update(policy, samples, advantages, keep, cfg, scale.scale_parts(cfg, world))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    after = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: after[name] - before[name] for name in before}


def update_on_rank(rank, tiny, tmp_path):
    world = scale.setup_distributed()
    batch = torch.load(tmp_path / "batch.pt", weights_only=False)
    rows = slice(4 * rank, 4 * rank + 4)  # this rank's problem: one group
    changes = {loss: sgd_step(tiny, tmp_path, loss, batch.subset(rows), ADVANTAGES[rows], world)
               for loss in LOSSES}
    torch.save(changes, tmp_path / f"changes-rank{rank}.pt")


def test_two_process_gradient_equals_the_one_process_gradient_over_the_same_problems(
        tiny, tmp_path):
    cfg = scale_config(tiny, tmp_path)
    model, tokenizer = igrpo.load_model(cfg.model, cfg, torch.float32, "cpu")
    batch = fixed_samples(model, tokenizer, cfg)
    lengths = torch.tensor([8, 5, 3, 8, 8, 8, 6, 8])  # some stopped early: 24 and 30 tokens a rank
    batch.completion_mask = torch.arange(batch.completion_mask.shape[1])[None] < lengths[:, None]
    batch.attention_mask[:, batch.prompt_length:] = batch.completion_mask
    torch.save(batch, tmp_path / "batch.pt")
    spawn_ranks(update_on_rank, tmp_path, tiny, tmp_path)
    for loss in LOSSES:
        one_process = sgd_step(tiny, tmp_path, loss, batch, ADVANTAGES)
        assert any(change.abs().max() > 0 for change in one_process.values())
        for rank in (0, 1):
            two_processes = torch.load(tmp_path / f"changes-rank{rank}.pt")[loss]
            for name, change in one_process.items():
                assert torch.allclose(two_processes[name], change, atol=1e-7, rtol=1e-4), \
                    (loss, rank, name)


# ----------------------------------------------------------------------------------------------
# Long runs: Ctrl-C, non-finite updates, collapse warnings, failures that name their fix
# ----------------------------------------------------------------------------------------------
def long_run_config(tiny, folder, **overrides):
    return scale_config(tiny, folder.parent, steps=4, eval_dataset=str(tiny / "train.jsonl"),
                        eval_limit=2, dtype="fp32", output_dir=str(folder), **overrides)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """A reference run of 4 steps through scale.train, never stopped."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(igrpo, "math_reward", parity_reward)
        scale.train(long_run_config(tiny, folder))
    return folder


def nan_losses(monkeypatch):
    """igrpo.policy_loss, but every loss NaN."""
    real = igrpo.policy_loss

    def nan_loss(*args):
        loss, clipped, kl = real(*args)
        return loss * float("nan"), clipped, kl
    monkeypatch.setattr(igrpo, "policy_loss", nan_loss)


def test_a_non_finite_update_is_skipped_and_counted_and_a_run_of_them_stops_with_the_likely_cause(
        tiny, tmp_path, monkeypatch):
    nan_losses(monkeypatch)
    cfg = scale_config(tiny, tmp_path, steps=5)
    with pytest.raises(SystemExit, match=r"3 steps in a row .*--lr 0.001.*--dtype fp32.*step-3"):
        scale.train(cfg)
    lines = open(tmp_path / "run" / "metrics.jsonl").read().splitlines()
    records = [json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token}"))
               for line in lines]
    assert [r["skipped_updates"] for r in records] == [1, 1, 1]
    assert all(r["loss"] is None for r in records)
    before = load_tiny(tiny)[0].state_dict()
    final = igrpo.load_model(str(tmp_path / "run" / "step-3"), cfg, torch.float32, "cpu")[0]
    assert all(torch.equal(before[name], final.state_dict()[name]) for name in before)  # no update


def test_with_several_ppo_epochs_the_run_stops_after_3_steps_with_skipped_updates_not_3_updates(
        tiny, tmp_path, monkeypatch):
    nan_losses(monkeypatch)
    with pytest.raises(SystemExit, match=r"3 steps in a row .*step-3"):
        scale.train(scale_config(tiny, tmp_path, steps=5, ppo_epochs=2))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["skipped_updates"] for r in records] == [2, 2, 2]


def test_a_finite_update_after_a_skipped_one_is_applied_and_logged_with_no_skips(
        tiny, tmp_path, monkeypatch):
    real, calls = igrpo.policy_loss, []

    def nan_once(*args):  # the first step's micro-batches only
        loss, clipped, kl = real(*args)
        calls.append(1)
        return (loss * float("nan") if len(calls) <= 2 else loss), clipped, kl
    monkeypatch.setattr(igrpo, "policy_loss", nan_once)
    monkeypatch.setattr(igrpo, "compute_rewards", alternate_rewards)
    scale.train(scale_config(tiny, tmp_path, steps=2, micro_batch_size=2))  # 2 micro-batches
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["skipped_updates"] for r in records] == [1, 0]
    assert records[0]["loss"] is None and records[1]["loss"] is not None
    start = load_file(tiny / "model" / "model.safetensors")
    final = final_weights(tmp_path / "run")
    assert any(not torch.equal(final[name], start[name]) for name in start)


FAILURES_MID_RUN = [
    ("sample", torch.OutOfMemoryError("CUDA out of memory"), "out of GPU memory"),
    ("policy_loss", torch.OutOfMemoryError("CUDA out of memory"), "out of GPU memory"),
    ("sample", RuntimeError("probability tensor contains either `inf`, `nan` or element < 0"),
     "probabilities became inf/NaN: the learning rate (--lr 0.001)"),
]


@pytest.mark.parametrize("function,error,message", FAILURES_MID_RUN,
                         ids=["OOM sampling", "OOM updating", "inf/NaN probabilities"])
def test_failures_mid_run_stop_with_one_line_naming_the_flags_that_fix_them(
        tiny, tmp_path, monkeypatch, function, error, message):
    def raises(*args, **kwargs):
        raise error
    monkeypatch.setattr(igrpo, function, raises)
    with pytest.raises(SystemExit) as stopped:
        scale.train(scale_config(tiny, tmp_path))
    assert message in str(stopped.value.code) and "\n" not in str(stopped.value.code)
    if isinstance(error, torch.OutOfMemoryError):
        assert all(flag in str(stopped.value.code) for flag in
                   ("--micro-batch-size", "--generation-batch-size", "--max-completion-tokens"))


def test_other_errors_mid_run_pass_through_unexplained():
    with pytest.raises(RuntimeError, match="expected 4D input"):
        with scale.explained_failures(ScaleConfig()):
            raise RuntimeError("expected 4D input")


def test_a_collapsed_or_stuck_policy_is_warned_about():
    healthy = [dict(entropy=0.8, accuracy=0.5)] * scale.COLLAPSE_STEPS
    collapsed = [dict(entropy=0.0, accuracy=0.0)] * scale.COLLAPSE_STEPS
    stuck = [dict(entropy=0.5, accuracy=0.0)] * scale.COLLAPSE_STEPS
    assert scale.collapse_warning(healthy) is None
    assert scale.collapse_warning(collapsed[1:]) is None  # too few steps yet
    assert "entropy below" in scale.collapse_warning(healthy + collapsed)
    assert "no completion was right" in scale.collapse_warning(stuck)


def test_the_collapse_warning_is_printed_once_at_the_step_it_starts(capsys):
    from types import SimpleNamespace
    run = SimpleNamespace(skipped=0, skipped_in_a_row=0, history=[])
    watch = scale.long_run_watch(run, ScaleConfig())
    for step in range(1, 9):  # collapsed from the first step: the warning's 5 steps end at step 5
        record = dict(step=step, entropy=0.0, accuracy=0.5)
        assert watch(record) is None and record["skipped_updates"] == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [f"step {scale.COLLAPSE_STEPS}: warning: "
                        f"{scale.collapse_warning(run.history)}"]
