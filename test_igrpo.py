"""The specification of igrpo.py, as tests. Offline: tiny models built from a config, no hub."""
import dataclasses
import os

# tests never reach the hub; fail fast, before any HF import
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import igrpo
import toy
from checker_cases import CHECKER_CASES, DATA, rewrites
from conftest import (Crash, final_weights, hostile_generation_defaults, parity_reward, saved,
                      step_that, tiny_config, training_steps)
from igrpo import Config, answers_match, extract_answer, math_reward


# ----------------------------------------------------------------------------------------------
# Answer checker: one row per answer form, true and false ones
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion,gold,verdict,what", CHECKER_CASES,
                         ids=[c[3] for c in CHECKER_CASES])
def test_checker_grades_each_answer_form_like_a_careful_grader(completion, gold, verdict, what):
    started = time.perf_counter()
    assert (math_reward(completion, gold) == 1.0) is verdict
    elapsed = time.perf_counter() - started
    assert elapsed < 5, "a hang guard, not a speed target (see bench.py checker)"


def test_checker_never_evaluates_model_text(monkeypatch):
    import builtins
    import sympy
    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, lambda *a, **k: pytest.fail(f"{name} was called"))
    monkeypatch.setattr(sympy, "sympify", lambda *a, **k: pytest.fail("sympify was called"))
    monkeypatch.setattr(sympy, "parse_expr", lambda *a, **k: pytest.fail("parse_expr was called"),
                        raising=False)
    for completion, gold, verdict, _ in CHECKER_CASES:
        assert (math_reward(completion, gold) == 1.0) is verdict


def test_extract_answer_returns_none_without_a_final_answer():
    assert extract_answer("We add the numbers and get 5") is None
    assert extract_answer("\\boxed{unclosed") is None


def test_boxes_separated_only_by_list_connectors_are_one_list_answer():
    assert extract_answer("so $\\boxed{-2}$ and $\\boxed{1}$.") == "-2, 1"
    assert extract_answer("\\boxed{1},\\boxed{2}") == "1, 2"
    assert extract_answer("$x = \\boxed{2}$ or $x = \\boxed{3}$") == "2, 3"
    assert extract_answer("first \\boxed{4}, finally \\boxed{5}") == "5"
    assert extract_answer("\\boxed{2}\n\\boxed{3}") == "3"
    assert extract_answer("\\boxed{\\boxed{3}}") == "3"


def test_a_marker_answer_loses_its_dollar_signs_and_final_period():
    assert extract_answer("The answer is $\\frac{9}{2}$.") == "\\frac{9}{2}"
    assert extract_answer("The answer is 0.5.") == "0.5"


def test_a_comma_between_digits_groups_them_only_outside_brackets():
    assert igrpo.normalize("12,345") == "12345"
    assert igrpo.normalize("f(x) = 1,000") == "f(x) = 1000"
    assert igrpo.normalize("(1,234)") == "(1,234)"
    assert igrpo.normalize("\\{12,102\\}") == "\\{12,102\\}"
    assert igrpo.normalize("(1,3) \\cup (3,100)") == "(1,3) \\cup (3,100)"
    assert igrpo.normalize("(12{,}345, 1\\,000)") == "(12345, 1000)"


def test_gold_answer_is_extracted_from_a_full_solution():
    assert igrpo.gold_answer("She earns 9 * 2 = $18.\n#### 18") == "18"
    assert igrpo.gold_answer("So the area is $\\boxed{\\frac{3}{2}}$.") == "\\frac{3}{2}"
    assert igrpo.gold_answer("  42 ") == "42"


@pytest.mark.parametrize("benchmark_file", ["math500", "minerva_math", "aime24", "aime25", "amc23",
                                            "gsm8k_test"])
def test_every_shipped_gold_answer_matches_itself_boxed_and_its_rewrites(benchmark_file):
    golds = [json.loads(line)["answer"] for line in open(DATA / f"{benchmark_file}.jsonl")]
    failures = [g for g in golds if not answers_match(extract_answer(f"So \\boxed{{{g}}}."), g)]
    failures += [(g, r) for g in golds for r in rewrites(g)
                 if not answers_match(extract_answer(f"\\boxed{{{r}}}"), g)]
    assert failures == []


# ----------------------------------------------------------------------------------------------
# Group-relative advantages
# ----------------------------------------------------------------------------------------------
def test_group_advantages_have_zero_mean_and_unit_spread_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.5, 0.1])
    advantages = igrpo.group_advantages(rewards, 4).view(2, 4)
    assert torch.allclose(advantages.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(advantages.std(1, correction=0), torch.ones(2), atol=1e-4)


def test_group_advantages_are_exactly_zero_when_the_group_agrees_and_never_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3])
    advantages = igrpo.group_advantages(rewards, 3)
    assert torch.equal(advantages, torch.zeros(9))
    assert not igrpo.group_advantages(rewards, 3, scale_by_std=False).isnan().any()


def test_dr_grpo_advantages_are_not_divided_by_the_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(igrpo.group_advantages(rewards, 4, scale_by_std=False),
                          torch.tensor([0.75, -0.25, -0.25, -0.25]))


# ----------------------------------------------------------------------------------------------
# The clipped surrogate, its aggregations and the KL penalty
# ----------------------------------------------------------------------------------------------
ONE = igrpo.World()  # a single process


def loss_inputs(seed=0, b=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, T, generator=g) * 3).requires_grad_()
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 2:] = False
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    return logp, mask, advantages


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_at_ratio_one_every_loss_gives_the_policy_gradient_direction(loss):
    logp, mask, advantages = loss_inputs()
    cfg = Config(loss=loss, max_completion_tokens=6)
    weights = igrpo.loss_weights(mask, loss, cfg.max_completion_tokens, ONE)
    value, clipped, _ = igrpo.policy_loss(logp, logp.detach(), advantages, mask, weights, cfg)
    value.backward()
    expected = -advantages[:, None] * weights  # d loss / d log p = -A * weight of the token
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert clipped == 0


def test_grpo_loss_averages_tokens_per_completion_then_over_completions():
    logp, mask, advantages = loss_inputs()
    weights = igrpo.loss_weights(mask, "grpo", 6, ONE)
    assert torch.allclose(weights.sum(1), torch.full((4,), 0.25))
    assert torch.allclose(weights[0, :4], torch.full((4,), 1 / 16))


def test_clipping_engages_only_beyond_epsilon():
    cfg = Config()
    logp = torch.zeros(1, 3, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    weights = igrpo.loss_weights(mask, "grpo", 3, ONE)
    old = torch.log(torch.tensor([[1 / 1.1, 1 / 1.3, 1 / 0.7]]))  # ratios 1.1, 1.3, 0.7
    loss, clipped, _ = igrpo.policy_loss(logp, old, torch.tensor([1.0]), mask, weights, cfg)
    loss.backward()
    # only 1.3 > 1.2 with A > 0; 0.7 < 0.8 is not clipped for A > 0 (min keeps r A)
    assert clipped == 1
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0] != 0 and logp.grad[0, 2] != 0


def test_k3_kl_is_zero_iff_policy_equals_reference():
    logp, mask, advantages = loss_inputs()
    cfg = Config(beta=0.1)
    weights = igrpo.loss_weights(mask, "grpo", 6, ONE)
    _, _, kl_same = igrpo.policy_loss(logp, logp.detach(), advantages, mask, weights, cfg,
                                      ref_logp=logp.detach())
    _, _, kl_diff = igrpo.policy_loss(logp, logp.detach(), advantages, mask, weights, cfg,
                                      ref_logp=logp.detach() - 0.3)
    assert kl_same == 0 and kl_diff > 0


def test_dr_grpo_loss_does_not_depend_on_how_padding_splits_lengths():
    logp, mask, advantages = loss_inputs()
    cfg = Config(loss="dr_grpo", max_completion_tokens=6)
    value, _, _ = igrpo.policy_loss(logp, logp.detach() - 0.01, advantages, mask,
                                    igrpo.loss_weights(mask, "dr_grpo", 6, ONE), cfg)
    wider = torch.nn.functional.pad(logp.detach(), (0, 5))  # same completions, more padding columns
    wider_mask = torch.nn.functional.pad(mask, (0, 5))
    wider_value, _, _ = igrpo.policy_loss(wider, wider - 0.01 * wider_mask, advantages, wider_mask,
                                          igrpo.loss_weights(wider_mask, "dr_grpo", 6, ONE), cfg)
    assert torch.allclose(value, wider_value)


def test_gspo_ratio_is_one_number_per_sequence():
    logp, mask, advantages = loss_inputs()
    cfg = Config(loss="gspo")
    old = logp.detach() + torch.linspace(-0.02, 0.02, 6)  # token ratios differ inside each sequence
    value, clipped, _ = igrpo.policy_loss(logp, old, advantages, mask,
                                          igrpo.loss_weights(mask, "gspo", 6, ONE), cfg)
    value.backward()
    per_token = logp.grad / igrpo.loss_weights(mask, "gspo", 6, ONE).clamp(min=1e-12) * mask
    # one ratio per sequence: the gradient w.r.t. each log-prob is equal along the row
    for row in range(4):
        values = per_token[row][mask[row]]
        assert torch.allclose(values, values[0].expand_as(values), atol=1e-5)


def test_dapo_drops_groups_whose_rewards_all_agree():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert igrpo.informative_groups(rewards, 3).tolist() == [False, False, False, True, True, True]


def test_dapo_clips_asymmetrically_and_averages_over_all_tokens_of_the_batch():
    logp, mask, _ = loss_inputs()
    weights = igrpo.loss_weights(mask, "dapo", 6, ONE)
    assert torch.allclose(weights[mask], torch.full((int(mask.sum()),), 1 / mask.sum().item()))
    assert igrpo.CLIP_DEFAULTS["dapo"] == (0.2, 0.28)


def test_overlong_penalty_is_soft_and_only_near_the_budget():
    cfg = Config(max_completion_tokens=100, overlong_buffer=20)
    rewards, *_ = igrpo.compute_rewards(["\\boxed{1}"] * 3, ["1"] * 3, cfg,
                                        lengths=torch.tensor([70, 90, 100]))
    assert torch.allclose(rewards, torch.tensor([1.0, 0.5, 0.0]))


def test_format_reward_is_logged_apart_and_weighted():
    cfg = Config(format_weight=0.5)
    completions = ["2+2 = 4 so \\boxed{4}", "\\boxed{5}", "4"]
    rewards, accuracy, formats, _ = igrpo.compute_rewards(completions, ["4"] * 3, cfg)
    assert accuracy.tolist() == [1.0, 0.0, 0.0]
    assert formats.tolist() == [1.0, 0.0, 0.0]
    assert rewards.tolist() == [1.5, 0.0, 0.0]


def test_learning_rate_warms_up_then_follows_a_cosine_down_to_the_floor():
    cfg = Config(lr=1.0, steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    rates = [igrpo.learning_rate(step, cfg) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_batches_go_through_every_problem_once_per_epoch_in_a_new_order_each_time():
    random.seed(0)
    cfg, order, seen = Config(prompts_per_step=4), [], []
    for _ in range(5):  # 20 problems drawn: two epochs of 10
        batch, order = igrpo.next_batch(list(range(10)), order, cfg)
        seen += batch
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:] and seen[:10] != list(range(10))


# ----------------------------------------------------------------------------------------------
# A tiny model and tokenizer, built locally
# ----------------------------------------------------------------------------------------------
def test_toy_checkpoint_round_trips_through_the_auto_classes(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    text = "Problem: What is 12 + 1?\n\nSolution: 12 + 1 = 13. \\boxed{13}"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # spaces survive the reload
    assert AutoModelForCausalLM.from_pretrained(tiny / "model").config.model_type == "llama"


def test_masks_cover_exactly_the_generated_tokens_through_eos_and_the_text_stops_before_it():
    class Tokenizer:
        pad_token_id = 0

        def batch_decode(self, rows, skip_special_tokens):
            return [str(r.tolist()) for r in rows]
    eos = 0  # pad == eos, so ids cannot tell padding from the end
    output = torch.tensor([[0, 5, 6, 7, 0, 0, 0],    # prompt [0 5] left padded; completion 6 7 EOS
                           [4, 5, 6, 6, 6, 6, 6]])   # completion hits the budget without EOS
    prompt_mask = torch.tensor([[0, 1], [1, 1]])
    samples = igrpo.stack_sequences([(output, prompt_mask)], Tokenizer(), [eos])
    assert samples.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert samples.texts == ["[6, 7]", "[6, 6, 6, 6, 6]"]
    assert samples.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]


def test_a_generate_call_cut_short_by_the_context_masks_only_the_tokens_it_generated():
    class Tokenizer:
        pad_token_id = 0

        def batch_decode(self, rows, skip_special_tokens):
            return [str(r.tolist()) for r in rows]
    eos = 0  # pad == eos: the padding that stacks a shorter call must not read as a sampled EOS
    long_call = torch.tensor([[5, 6, 6, 6, 6, 6]])  # prompt [5], 5 tokens, no EOS
    short_call = torch.tensor([[5, 7, 7, 7]])       # prompt [5], 3 tokens: the context ran out
    prompt_mask = torch.tensor([[1]])
    calls = [(long_call, prompt_mask), (short_call, prompt_mask)]
    samples = igrpo.stack_sequences(calls, Tokenizer(), [eos])
    assert samples.completion_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert samples.texts == ["[6, 6, 6, 6, 6]", "[7, 7, 7]"] and samples.lengths.tolist() == [5, 3]


def test_left_padding_leaves_log_probs_unchanged(tiny):
    cfg = Config(chat_template="off")
    model, tokenizer = igrpo.load_model(str(tiny / "model"), cfg, torch.float32, "cpu")
    short = tokenizer("What is 3?").input_ids
    long = tokenizer("Problem: What is 3 + 1 and then some?").input_ids
    completion = tokenizer(" 4. \\boxed{4}").input_ids

    def logprobs(prompts):
        P = max(map(len, prompts))
        ids = torch.tensor([[0] * (P - len(p)) + p + completion for p in prompts])
        attention = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(completion))
                                  for p in prompts])
        mask = torch.ones(len(prompts), len(completion), dtype=torch.bool)
        with torch.no_grad():
            return igrpo.token_logprobs(model, ids, attention, P, mask, 0.7)[0]
    alone = logprobs([short])[0]
    padded = logprobs([short, long])[0]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_dropout_is_off_so_training_forwards_score_the_sampling_policy(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", attention_dropout=0.5)
    tokenizer = igrpo.load_model(str(tiny / "model"), Config(), torch.float32, "cpu")[1]
    saved(model, tokenizer, tmp_path / "m")
    model, _ = igrpo.load_model(str(tmp_path / "m"), Config(), torch.float32, "cpu")
    model.train()
    ids = torch.arange(1, 20)[None]
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_generation_in_several_calls_stacks_each_prompt_intact_and_trimming_keeps_log_probs(tiny):
    # 3 prompts x 2 samples: three generate calls
    cfg = Config(chat_template="off", generation_batch_size=2)
    model, tokenizer = igrpo.load_model(str(tiny / "model"), cfg, torch.float32, "cpu")
    prompts = ["What is 1 + 1?", "Problem: What is 12 + 1 and 3 + 4?", "What?"]
    samples = igrpo.sample(model, tokenizer, prompts, cfg, per_prompt=2, max_new_tokens=6,
                           temperature=1.0)
    assert samples.input_ids.shape[0] == 6
    for row in range(6):
        not_padding = samples.attention_mask[row, :samples.prompt_length] == 1
        prompt = samples.input_ids[row, :samples.prompt_length][not_padding]
        assert tokenizer.decode(prompt) == prompts[row // 2]
    rows = torch.tensor([1, 4])
    with torch.no_grad():
        full = igrpo.token_logprobs(model, samples.input_ids[rows], samples.attention_mask[rows],
                                    samples.prompt_length, samples.completion_mask[rows], 1.0)[0]
        trimmed = igrpo.token_logprobs(model, *igrpo.micro_batch(samples, rows), 1.0)[0]
    assert torch.allclose(full[:, :trimmed.shape[1]], trimmed, atol=1e-5)
    assert trimmed.shape[1] == int(samples.lengths[rows].max())


def test_log_probs_are_those_of_the_sampling_distribution_at_the_temperature(tiny):
    cfg = Config(chat_template="off")
    model, tokenizer = igrpo.load_model(str(tiny / "model"), cfg, torch.float32, "cpu")
    ids = torch.tensor([tokenizer("What is 3 + 1? 4").input_ids])
    attention = torch.ones_like(ids)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        logp, entropy = igrpo.token_logprobs(model, ids, attention, ids.shape[1] - 3, mask, 0.5)
        reference = torch.log_softmax(model(ids).logits[0, -4:-1] / 0.5, -1)
    assert torch.allclose(logp[0], reference.gather(-1, ids[0, -3:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(entropy[0], -(reference.exp() * reference).sum(-1), atol=1e-5)


def test_token_logprobs_equal_a_log_softmax_of_the_models_own_logits_in_value_and_gradient(tiny):
    model, tokenizer = igrpo.load_model(str(tiny / "model"), Config(), torch.float32, "cpu")
    ids = torch.tensor([tokenizer("What is 3 + 1? 3 + 1 = 4. \\boxed{4}").input_ids])
    P, T, temperature = 6, ids.shape[1] - 6, 0.7
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[0, -2:] = False  # padding after the end: zero, and no gradient from it
    upstream = torch.linspace(-1, 2, T)[None]  # any gradient the loss sends back
    parameters = [p for p in model.parameters() if p.requires_grad]
    logp, entropy = igrpo.token_logprobs(model, ids, torch.ones_like(ids), P, mask, temperature)
    grads = torch.autograd.grad((logp * upstream).sum(), parameters)
    reference = torch.log_softmax(model(ids).logits[0, P - 1:-1] / temperature, -1)   # (T, V)
    expected = reference.gather(-1, ids[0, P:, None]).squeeze(-1) * mask[0]           # (T,)
    expected_grads = torch.autograd.grad((expected * upstream[0]).sum(), parameters)
    assert torch.allclose(logp[0], expected, atol=1e-5) and (logp[0, -2:] == 0).all()
    assert torch.allclose(entropy[0], -(reference.exp() * reference).sum(-1) * mask[0], atol=1e-5)
    assert not entropy.requires_grad  # a metric: the loss never differentiates it
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected_grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_and_entropies_stay_finite_when_a_logit_is_the_dtypes_minimum(tiny, dtype,
                                                                                 monkeypatch):
    from transformers import LlamaForCausalLM
    plain_forward, masked = LlamaForCausalLM.forward, 7  # a token the model's forward masks out

    def forward(self, *args, **kwargs):
        output = plain_forward(self, *args, **kwargs)
        output.logits[..., masked] = torch.finfo(output.logits.dtype).min
        return output
    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    model, tokenizer = igrpo.load_model(str(tiny / "model"), Config(), dtype, "cpu")
    ids = torch.tensor([tokenizer("What is 3 + 1? 4").input_ids])
    ids[ids == masked] = masked + 1  # the sampler never draws the masked token
    mask = torch.ones(1, 3, dtype=torch.bool)
    for temperature in (0.7, 1.0, 1.5):
        logp, entropy = igrpo.token_logprobs(model, ids, torch.ones_like(ids), ids.shape[1] - 3,
                                             mask, temperature)
        logp.sum().backward()
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
        assert (entropy > 0).all() and (logp < 0).all()
        assert gradients and all(torch.isfinite(g).all() for g in gradients)
        model.zero_grad()


def test_sampling_ignores_the_models_own_generation_defaults(tiny):
    cfg = Config(chat_template="off")
    model, tokenizer = igrpo.load_model(str(tiny / "model"), cfg, torch.float32, "cpu")
    # would make samples agree
    model.generation_config.top_k, model.generation_config.repetition_penalty = 1, 10.0
    torch.manual_seed(0)
    samples = igrpo.sample(model, tokenizer, ["Problem: What is 1 + 1?\n\nSolution:"], cfg,
                           per_prompt=8, max_new_tokens=6, temperature=1.0)
    assert len(set(samples.texts)) > 1


def test_sampling_inherits_nothing_from_a_hostile_checkpoint_generation_config(tiny):
    cfg = Config(chat_template="off")
    clean, tokenizer = igrpo.load_model(str(tiny / "model"), cfg, torch.float32, "cpu")
    model, _ = igrpo.load_model(str(tiny / "model"), cfg, torch.float32, "cpu")
    hostile = hostile_generation_defaults(model)
    own_defaults = model.generation_config
    prompt = ["Problem: What is 1 + 1?\n\nSolution:"]
    encoded = tokenizer(prompt, return_tensors="pt")
    # left to itself, generate() obeys them: here, one new token at most
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model.generate(**encoded).shape[1] == encoded.input_ids.shape[1] + 1
    # sampled: the very tokens a clean checkpoint samples with the same seed
    for temperature in (1.0, 0.5):
        torch.manual_seed(1)
        ours = igrpo.sample(model, tokenizer, prompt * 3, cfg, per_prompt=4, max_new_tokens=8,
                            temperature=temperature)
        torch.manual_seed(1)
        reference = igrpo.sample(clean, tokenizer, prompt * 3, cfg, per_prompt=4, max_new_tokens=8,
                                 temperature=temperature)
        assert torch.equal(ours.input_ids, reference.input_ids) and ours.texts == reference.texts
    # greedy: argmax of the raw logits
    greedy = igrpo.sample(model, tokenizer, prompt, cfg, per_prompt=1, max_new_tokens=8,
                          temperature=0.0)
    ids = encoded.input_ids
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    length = int(greedy.lengths[0])
    assert greedy.input_ids[0, -8:].tolist()[:length] == ids[0, -8:].tolist()[:length]
    assert model.generation_config is own_defaults  # given back, untouched
    assert model.generation_config.sequence_bias == hostile["sequence_bias"]


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(template=CHAT_TEMPLATE, bos=False):
    """A locally built tokenizer whose chat template closes turns with <|im_end|>, while its EOS is
    <|endoftext|>: the layout of Qwen2.5 base checkpoints. bos: it also starts every encoding with
    <|endoftext|>, as Llama-3's tokenizer adds the BOS its template already wrote."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.train_from_iterator(["What is 1 + 1? so \\boxed{2}", igrpo.SYSTEM_PROMPT], trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=template)


def test_sampling_stops_where_the_chat_template_closes_the_assistant_turn(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = chat_tokenizer()
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert igrpo.turn_end_id(tokenizer) == turn_end != tokenizer.eos_token_id
    plain_turns = chat_tokenizer("{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}")
    assert igrpo.turn_end_id(plain_turns) is None  # never stop at a newline
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, eos_token_id=tokenizer.eos_token_id))
    cfg = Config(chat_template="auto")
    prompt = igrpo.build_prompt(tokenizer, "What is 1 + 1?", cfg)
    # A base model keeps writing after its turn: it closes it, then invents a new one
    # with another answer.
    answer = tokenizer("so \\boxed{2}", add_special_tokens=False).input_ids
    invention = tokenizer("<|im_start|>user\nso \\boxed{3}", add_special_tokens=False).input_ids
    asked = []

    def generate(input_ids, attention_mask, generation_config):
        asked.append(generation_config.eos_token_id)
        return torch.cat([input_ids, torch.tensor([answer + [turn_end] + invention])], 1)
    monkeypatch.setattr(model, "generate", generate)
    samples = igrpo.sample(model, tokenizer, [prompt], cfg, per_prompt=1, max_new_tokens=32,
                           temperature=1.0)
    assert asked == [sorted([tokenizer.eos_token_id, turn_end])]
    assert samples.texts == ["so \\boxed{2}"] and igrpo.math_reward(samples.texts[0], "2") == 1.0
    expected = [True] * (len(answer) + 1) + [False] * len(invention)
    assert samples.completion_mask[0].tolist() == expected


def test_prompt_length_counts_the_chat_templates_special_tokens_once_as_sampling_encodes_them():
    tokenizer = chat_tokenizer("<|endoftext|>" + CHAT_TEMPLATE, bos=True)
    cfg = Config(chat_template="auto")
    prompt = igrpo.build_prompt(tokenizer, "What is 1 + 1?", cfg)
    encoded = igrpo.encode(tokenizer, [prompt], cfg).input_ids[0].tolist()
    assert encoded.count(tokenizer.eos_token_id) == 1  # the template's BOS, not a second one
    assert igrpo.prompt_length(tokenizer, "What is 1 + 1?", cfg) == len(encoded)
    # what the old length filter counted
    assert len(tokenizer(prompt).input_ids) == len(encoded) + 1


class BarsAtOnce(igrpo.tqdm):
    """Progress bars that show at once, not after their delay of 2 s: what a slow run would show."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **dict(kwargs, delay=0))


def test_held_out_prompts_are_length_filtered_and_scored_under_one_progress_bar(
        tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(igrpo, "tqdm", BarsAtOnce)
    held_out = tmp_path / "held_out.jsonl"
    too_long = "What is " + " + ".join(["1"] * 200) + "?"
    problems = [f"What is {a} + 1?" for a in range(3)] + [too_long]
    held_out.write_text("".join(json.dumps({"problem": p, "answer": "1"}) + "\n" for p in problems))
    cfg = tiny_config(tiny, tmp_path, algo="grpo", steps=1, eval_dataset=str(held_out),
                      group_size=2, generation_batch_size=2)
    igrpo.train(cfg)
    captured = capsys.readouterr()
    assert "--eval-dataset: skipping 1 problems longer than 128 prompt tokens" in captured.out
    assert "(3 problems)" in captured.out  # before training: 3 scored
    # one bar for each scoring (before, after), not per call
    assert captured.err.count("held-out:   0%") == 2
    # inside a step
    assert captured.err.count("update:   0%") == 1 and captured.err.count("group:   0%") == 1


def test_generation_stops_at_the_end_of_the_models_context(tiny, capsys):
    cfg = Config(chat_template="off")
    model, tokenizer = igrpo.load_model(str(tiny / "model"), cfg, torch.float32, "cpu")
    prompt = "Problem: What is 1 + 1?\n\nSolution:"
    model.config.max_position_embeddings = len(tokenizer(prompt).input_ids) + 5
    model.generation_config.eos_token_id = tokenizer.eos_token_id = None  # nothing else can stop it
    samples = igrpo.sample(model, tokenizer, [prompt], cfg, per_prompt=2, max_new_tokens=50,
                           temperature=1.0)
    assert samples.lengths.tolist() == [5, 5]
    igrpo.say_context_limit(igrpo.max_positions(model), 10, 50)
    assert f"at most {model.config.max_position_embeddings} positions" in capsys.readouterr().out


class ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


def test_prompts_use_the_chat_template_with_our_system_prompt_when_the_tokenizer_has_one():
    prompt = igrpo.build_prompt(ChatTokenizer(), "What is 2+2?", Config())
    assert prompt == f"<|system|>{igrpo.SYSTEM_PROMPT}<|user|>What is 2+2?<|assistant|>"
    plain = igrpo.build_prompt(ChatTokenizer(), "Q", Config(chat_template="off"))
    assert plain.startswith(igrpo.SYSTEM_PROMPT)


def test_prompts_use_the_plain_template_when_the_tokenizer_has_no_chat_template(tiny):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    prompt = igrpo.build_prompt(tokenizer, "What is 2+2?", Config())
    assert prompt == f"{igrpo.SYSTEM_PROMPT}\n\nProblem: What is 2+2?\n\nSolution:"


def test_stage_two_prompt_is_the_problem_followed_by_the_draft_through_the_template():
    message = igrpo.refine_message("What is 2+2?", " 2+2 = 5. \\boxed{5} ")
    assert message == ("What is 2+2?\n\nPrevious draft (may contain mistakes):\n"
                       "2+2 = 5. \\boxed{5}\n\nWrite an improved solution.")


def test_a_long_draft_is_cut_from_the_front_keeping_its_end(tiny):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    draft = "What is 1 + 1? " * 20 + "so \\boxed{2}"
    cut = igrpo.cut_draft(tokenizer, draft, 8)
    assert (cut.endswith("\\boxed{2}")
            and len(tokenizer(cut).input_ids) <= 8 < len(tokenizer(draft).input_ids))
    assert igrpo.cut_draft(tokenizer, "short \\boxed{2}", 100) == "short \\boxed{2}"


# ----------------------------------------------------------------------------------------------
# The iGRPO step
# ----------------------------------------------------------------------------------------------
def policy_of(cfg, dtype=torch.float32):
    """The Policy train() would build for cfg: the model loaded, AdamW over its master weights."""
    model, tokenizer = igrpo.load_model(cfg.model, cfg, dtype, "cpu")
    master, optimizer = igrpo.master_weights_and_optimizer(model, cfg)
    return igrpo.Policy(model, tokenizer, optimizer, master)


def scripted_sampler(script, calls):
    """Parts whose sampler writes scripted completions (script(prompt, index)) and records every
    (prompts, per_prompt) asked for in calls."""
    def fake(model, tokenizer, prompts, cfg, per_prompt, **options):
        calls.append((list(prompts), per_prompt))
        samples = igrpo.sample(model, tokenizer, prompts, cfg, per_prompt=per_prompt, **options)
        samples.texts = [script(prompt, index) for prompt in prompts for index in range(per_prompt)]
        return samples
    return igrpo.Parts(sample=fake)


def test_igrpo_step_puts_the_first_best_draft_in_the_stage_two_prompt(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, group_size=6, num_drafts=3, max_draft_tokens=64)
    # drafts 0 and 2 are both right; the first of them (draft 0) must be chosen
    calls = []
    parts = scripted_sampler(lambda prompt, i: f"draft {i} \\boxed{{{[2, 9, 2][i]}}}"
                             if "Previous draft" not in prompt else f"refined {i} \\boxed{{2}}",
                             calls)
    batch = [{"problem": "What is 1 + 1?", "answer": "2"}]
    rollout = igrpo.sample_and_score(batch, policy_of(cfg), cfg, parts)
    stage_two_prompt = calls[1][0][0]
    assert calls[0][1] == 3 and calls[1][1] == 3 and rollout.per_group == 3
    assert "Previous draft" in stage_two_prompt and "What is 1 + 1?" in stage_two_prompt
    assert (rollout.best_drafts == ["draft 0 \\boxed{2}"]
            and "draft 0 \\boxed{2}" in stage_two_prompt)
    assert rollout.draft_rewards.total.tolist() == [1.0, 0.0, 1.0]
    assert rollout.sequences.texts == ["refined 0 \\boxed{2}", "refined 1 \\boxed{2}",
                                       "refined 2 \\boxed{2}"]
    assert rollout.prompts == [stage_two_prompt]


def test_a_wrong_best_draft_is_still_used(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path)
    calls = []
    parts = scripted_sampler(lambda prompt, i: "wrong \\boxed{7}", calls)
    batch = [{"problem": "What is 1 + 1?", "answer": "2"}]
    igrpo.sample_and_score(batch, policy_of(cfg), cfg, parts)
    assert len(calls) == 2 and "Previous draft" in calls[1][0][0]


def test_best_drafts_are_the_first_best_of_each_problem_with_every_drafts_reward(tiny):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    cfg = Config(num_drafts=3, max_draft_tokens=64)
    batch = [{"problem": "What is 1 + 1?", "answer": "2"},
             {"problem": "What is 2 + 1?", "answer": "3"}]
    texts = ["\\boxed{5}", "a \\boxed{2}", "b \\boxed{2}",  # problem 1: drafts 2 and 3 right
             "\\boxed{1}", "\\boxed{4}", "\\boxed{0}"]    # problem 2: none right
    drafts = SimpleNamespace(texts=texts, lengths=torch.full((6,), 3))
    best, scores = igrpo.best_drafts(tokenizer, batch, drafts, cfg)
    assert best == ["a \\boxed{2}", "\\boxed{1}"]
    assert scores.total.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_igrpo_trains_on_refinement_tokens_only(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path)
    policy, calls = policy_of(cfg), []
    parts = scripted_sampler(lambda prompt, i: f"\\boxed{{{i}}}", calls)
    batch = [{"problem": "What is 1 + 1?", "answer": "1"}]
    samples = igrpo.sample_and_score(batch, policy, cfg, parts).sequences
    stage_two_ids = policy.tokenizer(calls[1][0][0], padding_side="left").input_ids
    prompt_ids = samples.input_ids[0, :samples.prompt_length].tolist()
    assert prompt_ids[-len(stage_two_ids):] == stage_two_ids


@pytest.mark.parametrize("algo", ["igrpo", "grpo"])
def test_both_algorithms_generate_group_size_sequences_per_problem(tiny, tmp_path, algo):
    cfg = tiny_config(tiny, tmp_path, algo=algo, group_size=8, num_drafts=4)
    calls = []
    parts = scripted_sampler(lambda prompt, i: "\\boxed{1}", calls)
    batch = [{"problem": f"What is {a} + 1?", "answer": "1"} for a in range(3)]
    igrpo.sample_and_score(batch, policy_of(cfg), cfg, parts)
    assert sum(len(prompts) * n for prompts, n in calls) == 3 * 8


def test_one_ppo_epoch_never_clips_and_more_epochs_can(tiny, tmp_path):
    results = {}
    for epochs in (1, 3):
        cfg = tiny_config(tiny, tmp_path, ppo_epochs=epochs, lr=0.05,
                          output_dir=str(tmp_path / f"e{epochs}"))
        torch.manual_seed(0)
        model, tokenizer = igrpo.load_model(cfg.model, cfg, torch.float32, "cpu")
        samples = igrpo.sample(model, tokenizer, ["Problem: What is 1 + 1?\n\nSolution:"] * 2, cfg,
                               per_prompt=4, max_new_tokens=8, temperature=1.0)
        advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 1.5, -1.5])
        master = igrpo.master_weights(model)
        policy = igrpo.Policy(model, tokenizer, torch.optim.AdamW(master, lr=cfg.lr), master)
        sums = igrpo.policy_update(policy, samples, advantages, torch.ones(8, dtype=torch.bool),
                                   cfg, igrpo.Parts())
        results[epochs] = sums["clipped"]
    assert results[1] == 0.0 and results[3] > 0.0


def test_bf16_models_update_through_fp32_master_weights(tiny):
    cfg = Config(chat_template="off")
    model, _ = igrpo.load_model(str(tiny / "model"), cfg, torch.bfloat16, "cpu")
    master = igrpo.master_weights(model)
    assert all(m.dtype == torch.float32 for m in master)
    assert all(m.data_ptr() != p.data_ptr() for m, p in zip(master, model.parameters()))


def test_bf16_gradients_move_into_the_fp32_master_gradients_as_backward_produces_them(tiny):
    cfg = Config(chat_template="off")
    model, _ = igrpo.load_model(str(tiny / "model"), cfg, torch.bfloat16, "cpu")
    plain, _ = igrpo.load_model(str(tiny / "model"), cfg, torch.bfloat16, "cpu")
    igrpo.master_weights(model)  # an older set of master weights, replaced by the next
    master = igrpo.master_weights(model)
    ids = torch.arange(1, 17)[None]
    for _ in range(2):  # two micro-batches accumulate
        for m in (model, plain):
            m(ids).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(m.grad, p.grad.float()) for m, p in zip(master, plain.parameters()))


def test_master_gradients_accumulate_for_parameters_of_any_shape():
    def module():
        torch.manual_seed(0)
        built = torch.nn.Module()
        built.scale = torch.nn.Parameter(torch.tensor(0.5).bfloat16())  # 0-dimensional
        built.big = torch.nn.Parameter(torch.randn(2**22 + 5).bfloat16())   # more than one piece
        return built

    def backward(m):
        (m.scale.float() * m.big.float().sin().sum()).backward()
    model, plain = module(), module()
    master = igrpo.master_weights(model)
    for _ in range(2):
        backward(model)
    backward(plain)
    assert all(torch.equal(m.grad, 2 * p.grad.float()) for m, p in zip(master, plain.parameters()))


def test_a_tied_output_layer_gets_both_of_its_gradients_in_its_fp32_master_through_token_logprobs(
        tiny):
    cfg = Config(chat_template="off")
    model, _ = igrpo.load_model(str(tiny / "model"), cfg, torch.bfloat16, "cpu")
    plain, _ = igrpo.load_model(str(tiny / "model"), cfg, torch.bfloat16, "cpu")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    master = igrpo.master_weights(model)
    ids = torch.arange(1, 17)[None]
    attention, completion = torch.ones_like(ids), torch.ones(1, 12, dtype=torch.bool)
    for _ in range(2):  # two micro-batches accumulate
        for m in (model, plain):
            igrpo.token_logprobs(m, ids, attention, 4, completion, 0.7)[0].sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for m, p in zip(master, plain.parameters()):  # plain: autograd's bf16 sums, rounded more often
        assert (m.grad - p.grad.float()).norm() <= 1e-2 * p.grad.float().norm()


def versioned_parts(sampled, versions):
    """Parts whose optimizer steps are counted, and whose scripted drafts name how many updates the
    policy had when they were sampled; each sample call records that count in versions."""
    updates = [0]

    def step(policy, cfg):
        updates[0] += 1
        return igrpo.optimizer_step(policy, cfg)
    scripted = scripted_sampler(lambda prompt, i: "refined \\boxed{1}" if "Previous draft" in prompt
                                else f"draft after {updates[0]} updates", sampled)

    def sample(*args, **kwargs):
        versions.append(updates[0])
        return scripted.sample(*args, **kwargs)
    return igrpo.Parts(sample=sample, optimizer_step=step)


def test_every_step_draws_its_own_drafts_from_the_current_policy_then_refines(tiny, tmp_path):
    sampled, versions = [], []
    igrpo.train(tiny_config(tiny, tmp_path, steps=2, max_draft_tokens=64),
                versioned_parts(sampled, versions))
    assert versions == [0, 0, 1, 1] and [n for _, n in sampled] == [2, 2, 2, 2]
    assert "draft after 0 updates" in sampled[1][0][0]
    assert "draft after 1 updates" in sampled[3][0][0]


# ----------------------------------------------------------------------------------------------
# End to end, and bad input
# ----------------------------------------------------------------------------------------------
METRIC_KEYS = {"step", "reward", "draft_reward", "best_draft_reward", "loss", "kl", "entropy",
               "clip_frac", "completion_tokens", "lr", "step_seconds", "tokens_per_second"}


@pytest.mark.parametrize("algo", ["igrpo", "grpo"])
def test_a_short_run_writes_metrics_and_a_checkpoint_that_reloads(tiny, tmp_path, algo):
    cfg = tiny_config(tiny, tmp_path, algo=algo, eval_dataset=str(tiny / "train.jsonl"),
                      eval_limit=4, save_every=1)
    results = igrpo.train(cfg)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 2 and all(METRIC_KEYS <= set(r) for r in steps)
    assert (steps[0]["draft_reward"] is None) == (algo == "grpo")
    assert "eval_before" in results and "eval_after" in results
    assert json.loads((tmp_path / "run" / "args.json").read_text())["algo"] == algo
    from transformers import AutoModelForCausalLM
    for folder in ("final", "step-1"):
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / folder) is not None


# ----------------------------------------------------------------------------------------------
# Long runs: resume, atomic checkpoints, the run folder (Ctrl-C and the rest: test_scale.py)
# ----------------------------------------------------------------------------------------------
def long_run_config(tiny, folder, **overrides):
    return tiny_config(tiny, folder.parent, steps=4, eval_dataset=str(tiny / "train.jsonl"),
                       eval_limit=2, output_dir=str(folder), **overrides)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """Reference runs of 4 steps, one per dtype, never stopped."""
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(igrpo, "math_reward", parity_reward)
        for dtype in ("fp32", "bf16"):
            folder = tmp_path_factory.mktemp("uninterrupted") / dtype
            igrpo.train(long_run_config(tiny, folder, dtype=dtype))
            runs[dtype] = folder
    return runs


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights_and_logs_each_step_once(
        tiny, tmp_path, monkeypatch, uninterrupted, dtype):
    monkeypatch.setattr(igrpo, "math_reward", parity_reward)
    folder = tmp_path / "run"
    cfg = long_run_config(tiny, folder, dtype=dtype, save_every=2)

    def crash():
        raise Crash("killed")
    with monkeypatch.context() as patch:
        step_that(patch, 4, crash)  # step 4 dies: step-2 is the newest checkpoint, step 3 is logged
        with pytest.raises(Crash):
            igrpo.train(cfg)
    assert training_steps(folder) == [1, 2, 3]
    results = igrpo.train(dataclasses.replace(cfg, resume=True))
    assert training_steps(folder) == [1, 2, 3, 4]
    assert "eval_before" in results and "eval_after" in results
    expected, resumed = final_weights(uninterrupted[dtype]), final_weights(folder)
    start = load_file(tiny / "model" / "model.safetensors")
    assert any(not torch.equal(expected[name], start[name].to(expected[name].dtype))
               for name in expected)
    assert all(torch.allclose(expected[name].float(), resumed[name].float(), atol=1e-6)
               for name in expected)


def test_resume_refuses_changed_settings_a_finished_run_and_a_folder_without_checkpoints(
        tiny, tmp_path, uninterrupted):
    finished = long_run_config(tiny, uninterrupted["fp32"], dtype="fp32", resume=True)
    with pytest.raises(SystemExit, match=re.escape("settings differ") + ".*--lr 0.001 -> 0.002"):
        igrpo.train(dataclasses.replace(finished, lr=2e-3))
    with pytest.raises(SystemExit, match="already finished"):
        igrpo.train(finished)
    with pytest.raises(SystemExit, match="no run to resume"):
        igrpo.train(long_run_config(tiny, tmp_path / "empty", resume=True))
    started = long_run_config(tiny, tmp_path / "started")
    igrpo.start_run(started, igrpo.World())  # its args.json, and no checkpoint yet
    with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
        igrpo.train(dataclasses.replace(started, resume=True))


def test_a_fresh_run_refuses_a_folder_that_holds_a_run_unless_told_to_overwrite(tiny, tmp_path):
    folder = tmp_path / "run"
    (folder / "step-7").mkdir(parents=True)
    (folder / "args.json").write_text("{}")
    cfg = tiny_config(tiny, tmp_path, steps=1)
    with pytest.raises(SystemExit, match="already holds a run: add --resume .* --overwrite"):
        igrpo.train(cfg)
    igrpo.train(dataclasses.replace(cfg, overwrite=True))
    assert not (folder / "step-7").exists() and training_steps(folder) == [1]
    assert json.loads((folder / "args.json").read_text())["steps"] == 1


def test_overwrite_deletes_the_old_runs_checkpoints_and_final_model_but_nothing_else(tmp_path):
    out = tmp_path / "run"
    ours = ("step-3", ".step-4.tmp", "final", ".final.tmp")
    for name in ours + ("final-merged", "notes", "step-2-backup", "step-2.bak"):
        (out / name).mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    cfg = Config(steps=1, output_dir=str(out), overwrite=True)
    assert igrpo.start_run(cfg, igrpo.World()) == (0, [])
    # final-merged: scale.py's, of final/
    left = ["args.json", "notes", "step-2-backup", "step-2.bak"]
    assert sorted(p.name for p in out.iterdir()) == left
    assert json.loads((out / "args.json").read_text())["steps"] == 1


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tiny, tmp_path, monkeypatch):
    igrpo.train(tiny_config(tiny, tmp_path, steps=2, save_every=1))
    state_path = tmp_path / "run" / "step-1" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["rng"][0]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as a CUDA run saves it
    torch.save(state, state_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: pytest.fail("restored CUDA random states without CUDA"))
    cfg = tiny_config(tiny, tmp_path, steps=2, save_every=1)
    policy = policy_of(dataclasses.replace(cfg, model=str(tmp_path / "run" / "step-1")))
    step, order = igrpo.load_checkpoint(tmp_path / "run" / "step-1", policy, cfg, igrpo.Parts())
    assert step == 1 and order == state["order"]


def test_checkpoints_are_complete_or_absent_readable_by_others_and_only_the_newest_are_kept(
        tiny, tmp_path, monkeypatch):
    igrpo.train(tiny_config(tiny, tmp_path, steps=4, save_every=1, keep_checkpoints=2))
    folder = tmp_path / "run"
    # step-4 is final/ (the last step writes no checkpoint); step-1 was rotated away
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["final", "step-2", "step-3"]
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in (folder / "step-3").iterdir())
    model, tokenizer = igrpo.load_model(str(folder / "final"), Config(), torch.float32, "cpu")

    def killed(*args, **kwargs):
        raise Crash("killed mid-save")
    monkeypatch.setattr(type(tokenizer), "save_pretrained", killed)
    with pytest.raises(Crash):
        saved(model, tokenizer, folder / "step-9")
    assert (not (folder / "step-9").exists()
            and (folder / ".step-9.tmp" / "model.safetensors").exists())


def crash():
    raise Crash("killed")


def metric_lines(folder):
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def test_metrics_jsonl_has_a_line_per_step_and_a_line_per_held_out_score(tiny, tmp_path,
                                                                         uninterrupted):
    rows = metric_lines(uninterrupted["fp32"])  # 4 steps, scored before and after
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 4]
    scores, steps = [rows[0], rows[-1]], rows[1:-1]
    assert all(set(r) == {"step", "eval_accuracy"} and 0 <= r["eval_accuracy"] <= 1
               for r in scores)
    assert all(METRIC_KEYS <= set(r) and "eval_accuracy" not in r for r in steps)
    assert igrpo.held_out_results(uninterrupted["fp32"]) == dict(
        eval_before=rows[0]["eval_accuracy"], eval_after=rows[-1]["eval_accuracy"])
    cfg = tiny_config(tiny, tmp_path, eval_dataset=str(tiny / "train.jsonl"), eval_limit=2,
                      eval_every=1)
    igrpo.train(cfg)  # every step scored, the last one once
    rows = metric_lines(tmp_path / "run")
    assert [(r["step"], "eval_accuracy" in r) for r in rows] == [
        (0, True), (1, False), (1, True), (2, False), (2, True)]


def test_held_out_scoring_never_changes_what_training_samples(tiny, tmp_path, monkeypatch,
                                                              uninterrupted):
    monkeypatch.setattr(igrpo, "math_reward", parity_reward)
    folder = tmp_path / "scored-every-step"
    igrpo.train(long_run_config(tiny, folder, dtype="fp32", eval_every=1))  # 3 more scorings
    assert len([r for r in metric_lines(folder) if "eval_accuracy" in r]) == 5
    rewards = [r["reward"] for r in metric_lines(folder) if "reward" in r]
    assert rewards == [r["reward"] for r in metric_lines(uninterrupted["fp32"]) if "reward" in r]
    expected, trained = final_weights(uninterrupted["fp32"]), final_weights(folder)
    assert all(torch.equal(expected[name], trained[name]) for name in expected)


def test_an_interrupted_final_scoring_leaves_final_and_resume_redoes_only_the_scoring(
        tiny, tmp_path, monkeypatch, uninterrupted):
    monkeypatch.setattr(igrpo, "math_reward", parity_reward)
    folder = tmp_path / "run"
    cfg = long_run_config(tiny, folder, dtype="fp32")
    real, scorings = igrpo.held_out_accuracy, []

    def stopped_at_the_last(*args, **kwargs):  # scored before training, then the final model
        scorings.append(1)
        if len(scorings) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(igrpo, "held_out_accuracy", stopped_at_the_last)
        message = f"interrupted, .*--resume goes on from {folder / 'final'}"
        with pytest.raises(SystemExit, match=message):
            igrpo.train(cfg)
    assert (folder / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in metric_lines(folder)] == [0, 1, 2, 3, 4]
    expected, saved = final_weights(uninterrupted["fp32"]), final_weights(folder)
    assert all(torch.allclose(expected[name], saved[name], atol=1e-6) for name in expected)
    with pytest.raises(SystemExit, match="already holds a run: add --resume"):
        igrpo.train(cfg)  # not finished: its final score is missing
    rollouts = []
    with monkeypatch.context() as patch:
        step_that(patch, 1, lambda: rollouts.append(1))
        results = igrpo.train(dataclasses.replace(cfg, resume=True))
    rows = metric_lines(folder)
    assert rollouts == [] and [r["step"] for r in rows] == [0, 1, 2, 3, 4, 4]
    assert set(rows[-1]) == {"step", "eval_accuracy"}
    assert results == dict(eval_before=rows[0]["eval_accuracy"],
                           eval_after=rows[-1]["eval_accuracy"])
    assert all(torch.equal(saved[name], final_weights(folder)[name]) for name in saved)
    with pytest.raises(SystemExit, match="already finished"):
        igrpo.train(dataclasses.replace(cfg, resume=True))


def test_a_finished_runs_folder_is_refused_naming_overwrite_and_not_resume(tiny, uninterrupted,
                                                                          monkeypatch):
    monkeypatch.setattr(igrpo, "load_model", lambda *args: pytest.fail("a model loaded"))
    before = metric_lines(uninterrupted["fp32"])
    with pytest.raises(SystemExit) as stopped:
        igrpo.train(long_run_config(tiny, uninterrupted["fp32"], dtype="fp32"))
    message = str(stopped.value.code)
    assert "already holds a finished run" in message and "--overwrite" in message
    assert "--resume" not in message and "\n" not in message
    assert metric_lines(uninterrupted["fp32"]) == before


def test_a_folder_holding_only_a_final_model_or_a_checkpoint_counts_as_a_run(tiny, tmp_path):
    for leftover in ("final", "step-50"):
        folder = tmp_path / leftover / "run"
        (folder / leftover).mkdir(parents=True)
        with pytest.raises(SystemExit, match="already holds a (finished )?run"):
            igrpo.resume_point(tiny_config(tiny, tmp_path, output_dir=str(folder)))
        igrpo.start_run(tiny_config(tiny, tmp_path, output_dir=str(folder), overwrite=True),
                        igrpo.World())
        assert not (folder / leftover).exists() and (folder / "args.json").is_file()


def test_a_run_started_with_another_scripts_settings_is_resumed_by_that_script_only(tiny, tmp_path):
    @dataclasses.dataclass
    class Wider(Config):  # as scale.py's settings are igrpo.py's and more
        lora_rank: int = igrpo.setting(0, "adapters")
    folder = tmp_path / "run"
    igrpo.start_run(tiny_config(tiny, tmp_path, config_class=Wider, lora_rank=8), igrpo.World())
    with pytest.raises(SystemExit, match="started by a script with other settings .*--lora-rank"):
        igrpo.check_resumable(folder, tiny_config(tiny, tmp_path, resume=True))
    igrpo.start_run(tiny_config(tiny, tmp_path, overwrite=True), igrpo.World())  # igrpo.py's run...
    igrpo.check_resumable(folder, tiny_config(tiny, tmp_path, config_class=Wider, resume=True))
    with pytest.raises(SystemExit, match="--lora-rank 0 -> 8"):  # ...goes on with defaults only
        igrpo.check_resumable(folder, tiny_config(tiny, tmp_path, config_class=Wider, resume=True,
                                                  lora_rank=8))


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_prints_how_to_resume(
        tiny, tmp_path, monkeypatch, capsys, uninterrupted):
    monkeypatch.setattr(igrpo, "math_reward", parity_reward)
    folder = tmp_path / "run"
    cfg = long_run_config(tiny, folder, dtype="fp32")  # --save-every 0: Ctrl-C saves anyway
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        step_that(patch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
        with pytest.raises(SystemExit) as stopped:
            igrpo.train(cfg)
    assert stopped.value.code == 130 and signal.getsignal(signal.SIGINT) is handler
    assert re.search(r"interrupted after step 2, checkpoint .*step-2; continue with:\n .*--resume",
                     capsys.readouterr().out)
    assert (folder / "step-2" / "trainer_state.pt").exists() and training_steps(folder) == [1, 2]
    igrpo.train(dataclasses.replace(cfg, resume=True))
    assert f"resuming from {folder / 'step-2'}: step 2 of 4 done" in capsys.readouterr().out
    expected, resumed = final_weights(uninterrupted["fp32"]), final_weights(folder)
    assert training_steps(folder) == [1, 2, 3, 4]
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_sigterm_stops_like_a_first_ctrl_c(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    step_that(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        igrpo.train(long_run_config(tiny, folder, dtype="fp32"))
    assert stopped.value.code == 130 and (folder / "step-1" / "trainer_state.pt").exists()


def test_a_ctrl_c_on_the_last_step_saves_final_and_says_resume_does_the_scoring_left(
        tiny, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    step_that(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as stopped:
        igrpo.train(long_run_config(tiny, folder, dtype="fp32"))
    assert stopped.value.code == 130
    assert f"interrupted: {folder / 'final'} is saved; --resume " in capsys.readouterr().out
    assert (folder / "final").is_dir() and not list(folder.glob("step-*"))
    assert igrpo.train(long_run_config(tiny, folder, dtype="fp32", resume=True))["eval_after"] >= 0


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint_and_promises_no_resume(
        tiny, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    cfg = long_run_config(tiny, folder, dtype="fp32")

    def twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    step_that(monkeypatch, 1, twice)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in dataclasses.asdict(cfg).items()
            if not isinstance(v, bool)]
    with pytest.raises(SystemExit, match="interrupted, no checkpoint written now; nothing to "
                                         "resume from: the same command starts again"):
        igrpo.main(argv + ["--no-gradient-checkpointing"])
    assert not list(folder.glob("step-*")) and training_steps(folder) == []
    igrpo.main(argv + ["--no-gradient-checkpointing", "--steps=1"])  # not a run yet: it starts


def test_the_resume_command_starts_with_torchrun_under_torchrun(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scale.py", "--model", "m", "--overwrite"])
    assert igrpo.resume_command(igrpo.World()) == "python scale.py --model m --resume"
    two = igrpo.World(rank=0, size=2)
    assert igrpo.resume_command(two) == "torchrun --nproc-per-node=2 scale.py --model m --resume"


def test_a_run_resumed_at_a_held_out_scoring_step_logs_it_once_and_ends_like_an_unbroken_one(
        tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(igrpo, "math_reward", parity_reward)
    runs = {}
    for name in ("unbroken", "resumed"):
        cfg = long_run_config(tiny, tmp_path / name, dtype="fp32", save_every=2, eval_every=2)
        if name == "resumed":
            with monkeypatch.context() as patch:
                step_that(patch, 4, crash)  # step 4 dies: step-2 is the newest checkpoint
                with pytest.raises(Crash):
                    igrpo.train(cfg)
            cfg = dataclasses.replace(cfg, resume=True)
        igrpo.train(cfg)
        runs[name] = final_weights(tmp_path / name)
    logged = {name: [(r["step"], "eval_accuracy" in r) for r in metric_lines(tmp_path / name)]
              for name in runs}
    assert logged["unbroken"] == [(0, True), (1, False), (2, False), (2, True), (3, False),
                                  (4, False), (4, True)]
    assert logged["resumed"] == logged["unbroken"]
    expected = runs["unbroken"]
    assert all(torch.allclose(expected[name], runs["resumed"][name], atol=1e-6)
               for name in expected)


def test_checkpoint_rotation_and_resume_use_only_folders_named_exactly_step_n(
        tiny, tmp_path, monkeypatch, uninterrupted):
    monkeypatch.setattr(igrpo, "math_reward", parity_reward)
    folder = tmp_path / "run"
    cfg = long_run_config(tiny, folder, dtype="fp32", save_every=1, keep_checkpoints=1)
    (folder / "step-2-backup").mkdir(parents=True)  # the user's, made before the run
    (folder / "step-2-backup" / "notes.txt").write_text("mine")
    with monkeypatch.context() as patch:
        step_that(patch, 3, crash)  # step 3 dies: step-2 is the newest checkpoint
        with pytest.raises(Crash):
            igrpo.train(cfg)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["step-2", "step-2-backup"]
    (folder / "step-2.bak").mkdir()  # the user's too: not a checkpoint, though it looks like one
    (folder / "step-2.bak" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    igrpo.train(dataclasses.replace(cfg, resume=True))
    assert training_steps(folder) == [1, 2, 3, 4]
    assert (folder / "step-2-backup" / "notes.txt").read_text() == "mine"
    expected, resumed = final_weights(uninterrupted["fp32"]), final_weights(folder)
    assert all(torch.allclose(expected[name], resumed[name], atol=1e-6) for name in expected)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "final", "step-2-backup", "step-2.bak", "step-3"]


def run_stopped_in_step_3(tiny, tmp_path, monkeypatch):
    """A run of 3 steps that saved step-1 and step-2, then crashed in step 3; its config."""
    cfg = tiny_config(tiny, tmp_path, steps=3, save_every=1)
    with monkeypatch.context() as patch:
        step_that(patch, 3, crash)
        with pytest.raises(Crash):
            igrpo.train(cfg)
    return cfg


def test_a_damaged_newest_trainer_state_is_a_one_line_error_naming_the_file(tiny, tmp_path,
                                                                           monkeypatch):
    cfg = run_stopped_in_step_3(tiny, tmp_path, monkeypatch)
    state = tmp_path / "run" / "step-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])  # cut short
    with pytest.raises(SystemExit) as stopped:
        igrpo.train(dataclasses.replace(cfg, resume=True))
    message = str(stopped.value.code)
    assert f"--resume: {state} is damaged" in message and "\n" not in message
    assert training_steps(tmp_path / "run") == [1, 2]


def test_igrpo_py_copied_alone_into_an_empty_folder_trains_saves_and_resumes(tiny, tmp_path):
    """The file on its own, run as a script: no companion file is imported for a plain run."""
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(Path(igrpo.__file__), folder / "igrpo.py")
    flags = ["--model", str(tiny / "model"), "--dataset", str(tiny / "train.jsonl"),
             "--steps", "2", "--save-every", "1", "--prompts-per-step", "2", "--group-size", "4",
             "--num-drafts", "2", "--max-completion-tokens", "8", "--max-draft-tokens", "4",
             "--micro-batch-size", "3", "--no-gradient-checkpointing", "--chat-template", "off",
             "--lr", "1e-2", "--weight-decay", "0.5"]  # moves a random model's weights

    def run(*more):
        done = subprocess.run([sys.executable, "igrpo.py", *flags, *more], cwd=folder,
                              capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert done.returncode == 0, done.stderr[-2000:]
    run("--output-dir", "run")
    shutil.copytree(folder / "run", folder / "resumed")
    shutil.rmtree(folder / "resumed" / "final")  # as if stopped after step-1 was saved
    run("--output-dir", "resumed", "--resume")
    assert training_steps(folder / "resumed") == training_steps(folder / "run") == [1, 2]
    first, resumed = final_weights(folder / "run"), final_weights(folder / "resumed")
    start = load_file(tiny / "model" / "model.safetensors")
    assert all(torch.equal(first[name], resumed[name]) for name in first)
    assert any(not torch.equal(first[name], start[name]) for name in start)  # it trained
    assert sorted(p.name for p in folder.iterdir()) == ["igrpo.py", "resumed", "run"]
    for flag, companion in (("--reward=judge", "judge"), ("--track=wandb", "track")):
        done = subprocess.run([sys.executable, "igrpo.py", *flags, flag, "--judge-url=u",
                               "--output-dir=other"], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
        assert f"needs {companion}.py beside igrpo.py" in done.stderr


def test_a_run_folder_as_model_trains_from_its_final_model_and_says_so(tiny, tmp_path, capsys):
    igrpo.train(tiny_config(tiny, tmp_path, steps=1, output_dir=str(tmp_path / "first")))
    igrpo.train(tiny_config(tiny, tmp_path, steps=1, model=str(tmp_path / "first"),
                            output_dir=str(tmp_path / "second")))
    said = capsys.readouterr().out
    assert f"--model {tmp_path / 'first'}: a training run folder; loading its final model" in said
    assert training_steps(tmp_path / "second") == [1]


def test_overwrite_with_a_broken_dataset_or_model_fails_before_the_old_run_is_touched(
        tiny, tmp_path, uninterrupted):
    folder = tmp_path / "run"
    shutil.copytree(uninterrupted["fp32"], folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for broken, message in ((dict(dataset=str(tmp_path / "missing.jsonl")), "no such file"),
                            (dict(model=str(tmp_path / "nothing")), "--model")):
        with pytest.raises(SystemExit, match=message):
            igrpo.train(long_run_config(tiny, folder, dtype="fp32", overwrite=True, **broken))
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_failed_start_leaves_a_folder_that_the_corrected_command_simply_starts_in(
        tiny, tmp_path, monkeypatch):
    cfg = tiny_config(tiny, tmp_path, eval_dataset=str(tiny / "train.jsonl"), eval_limit=2)
    with pytest.raises(SystemExit, match="no column 'questoin'"):
        igrpo.train(dataclasses.replace(cfg, problem_key="questoin"))
    with monkeypatch.context() as patch:  # args.json and the step-0 score written, then a crash
        step_that(patch, 1, crash)
        with pytest.raises(Crash):
            igrpo.train(cfg)
    assert (tmp_path / "run" / "args.json").is_file() and training_steps(tmp_path / "run") == []
    igrpo.train(cfg)  # no --overwrite needed: no step was done
    assert training_steps(tmp_path / "run") == [1, 2]


def test_a_disk_that_fills_while_a_checkpoint_is_written_is_one_line_and_leaves_no_partial_folder(
        tiny, tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def fills_on_the_second_checkpoint(state, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 3:  # step-1's optimizer.pt, trainer_state.pt, then step-2's optimizer.pt
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2176 vs "
                               "2068; iostream error")
        return real_save(state, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", fills_on_the_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        igrpo.train(tiny_config(tiny, tmp_path, steps=3, save_every=1))
    message = str(stopped.value.code)
    assert f"saving {run / 'step-2'} failed (RuntimeError: " in message and "iostream" in message
    assert f"--resume goes on from {run / 'step-1'}, which is complete" in message
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["step-1"]  # no .step-2.tmp
    assert message.count("\n") == 1  # the line, then the command that resumes


def test_with_several_ppo_epochs_grad_norm_is_the_mean_over_the_epochs_like_the_other_numbers(
        tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(igrpo, "math_reward", parity_reward)
    norms = []

    def recorded(policy, cfg):
        norm = igrpo.optimizer_step(policy, cfg)
        norms.append(float(norm))
        return norm
    igrpo.train(tiny_config(tiny, tmp_path, steps=1, ppo_epochs=2, lr=0.05),
                igrpo.Parts(optimizer_step=recorded))
    [record] = metric_lines(tmp_path / "run")
    assert len(norms) == 2 and norms[0] != norms[1]
    assert record["grad_norm"] == pytest.approx(sum(norms) / 2)


@pytest.mark.parametrize("lines,number", [
    (["{oops", '{"problem": "1+1?", "answer": "2"}'], 1),
    (['{"problem": "1+1?", "answer": "2"}', "", '{"problem": "2+2?", "answer": "4"}', "{oops"], 4)])
def test_a_bad_jsonl_line_is_named_by_its_own_number(tmp_path, lines, number):
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=f"problems.jsonl, line {number}: not valid JSON"):
        igrpo.load_problems(str(path), Config())


def test_a_jsonl_line_may_hold_unicode_line_separators_inside_its_strings(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [dict(problem="1+1?\u2028(a line separator)", answer="2"),
            dict(problem="2+2?", answer="4")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [p["answer"] for p in igrpo.load_problems(str(path), Config())] == ["2", "4"]


def test_a_folder_with_logged_steps_and_no_checkpoint_names_overwrite_never_a_plain_restart(
        tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')  # --save-every 0, killed
    said = igrpo.what_resumes(run, igrpo.World())
    assert said == "nothing to resume from: --overwrite starts the run again"
    (run / "metrics.jsonl").write_text('{"step": 0, "eval_accuracy": 0.5}\n')  # no step done
    said = igrpo.what_resumes(run, igrpo.World())
    assert said == "nothing to resume from: the same command starts again"


def test_gold_answers_that_read_like_prose_are_counted_once_at_the_start(tmp_path, capsys):
    path = tmp_path / "problems.jsonl"
    rows = [dict(problem="2+2?", answer="It is four."), dict(problem="1+1?", answer="2"),
            dict(problem="3+3?", answer="so \\boxed{6}")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = igrpo.load_problems(str(path), Config())
    assert [p["answer"] for p in problems] == ["It is four.", "2", "6"]
    assert "1 of 3 gold answers read like prose" in capsys.readouterr().out


def test_a_budget_that_fits_the_context_draws_no_warning_whatever_the_prompt_limit(tiny, tmp_path,
                                                                                   capsys):
    igrpo.train(tiny_config(tiny, tmp_path, steps=1, max_completion_tokens=8,
                            max_prompt_tokens=1024, max_draft_tokens=8))
    assert "reads at most" not in capsys.readouterr().out


def test_a_checkpoint_from_another_version_is_a_one_line_error_and_changes_nothing(
        tiny, tmp_path, monkeypatch):
    cfg = run_stopped_in_step_3(tiny, tmp_path, monkeypatch)
    path = tmp_path / "run" / "step-2" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    assert tuple(state) == igrpo.TRAINER_STATE  # what a load checks for is what a save writes
    del state["completions_bytes"]  # as a checkpoint from before completions.jsonl existed
    torch.save(state, path)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit, match=r"--resume: .*step-2/trainer_state.pt was written by "
                                         r"another version of igrpo.py \(it lacks "
                                         r"completions_bytes\)"):
        igrpo.train(dataclasses.replace(cfg, resume=True))
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("file,layout,problem", [
    # before each rank's was kept
    ("trainer_state.pt", lambda state: dict(state, rng=state["rng"][0]),
     r"trainer_state.pt was written by another version of igrpo.py "
     r"\(it lacks rng \(each process's"),
    ("optimizer.pt", lambda state: dict(state, master=[torch.zeros(1)]),
     r"optimizer.pt holds 1 fp32 master weights, the model has 0 \(another --dtype\?\)")])
def test_a_checkpoint_with_every_file_but_an_older_layout_is_one_line_and_changes_nothing(
        tiny, tmp_path, monkeypatch, file, layout, problem):
    cfg = run_stopped_in_step_3(tiny, tmp_path, monkeypatch)
    path = tmp_path / "run" / "step-2" / file
    torch.save(layout(torch.load(path, weights_only=True)), path)
    files = {name: (tmp_path / "run" / name).read_bytes()
             for name in ("metrics.jsonl", "completions.jsonl")
             if (tmp_path / "run" / name).exists()}
    with pytest.raises(SystemExit, match=r"--resume: .*step-2/" + problem):
        igrpo.train(dataclasses.replace(cfg, resume=True))
    assert all((tmp_path / "run" / name).read_bytes() == data for name, data in files.items())


def test_a_cut_args_json_is_a_one_line_error_on_resume(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(igrpo, "load_model", lambda *args: pytest.fail("a model loaded"))
    cfg = tiny_config(tiny, tmp_path)
    igrpo.start_run(cfg, igrpo.World())
    args = tmp_path / "run" / "args.json"
    args.write_text(args.read_text()[:40])  # a disk that filled up, an editor that crashed
    with pytest.raises(SystemExit) as stopped:
        igrpo.train(dataclasses.replace(cfg, resume=True))
    message = str(stopped.value.code)
    assert f"--resume: {args} is damaged" in message and "--overwrite" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------
# The command line, and bad input
# ----------------------------------------------------------------------------------------------
def test_every_setting_is_a_kebab_case_flag_with_help_that_shows_its_default_once():
    parser = igrpo.config_parser()
    args = parser.parse_args(["--num-drafts", "3", "--no-gradient-checkpointing", "--lr=0.5"])
    cfg = Config(**vars(args))
    assert cfg.num_drafts == 3 and cfg.gradient_checkpointing is False and cfg.lr == 0.5
    assert all(f.metadata["help"] for f in dataclasses.fields(Config))
    shown = " ".join(parser.format_help().split())
    assert "--temperature TEMPERATURE sampling temperature in training (> 0; default: 0.7)" in shown
    assert ("--algo ALGO drafts, then refinements; or the baseline "
            "(igrpo | grpo; default: igrpo)") in shown
    assert "(default: )" not in shown and "problem/question/prompt/query) (default" not in shown
    with pytest.raises(SystemExit):
        # no abbreviations: a script can tell what was given
        parser.parse_args(["--num-draft", "3"])


def test_a_config_subclass_gets_its_own_fields_as_flags_too():
    import argparse

    @dataclasses.dataclass
    class Bigger(Config):
        adapter_rank: int = igrpo.setting(0, "a field igrpo.py does not know")
    args = igrpo.config_parser(Bigger).parse_args(["--adapter-rank", "4", "--lr", "0.5"])
    cfg = Bigger(**vars(args))
    assert cfg.adapter_rank == 4 and cfg.lr == 0.5
    parser = argparse.ArgumentParser()
    igrpo.add_flag(parser, dataclasses.fields(Bigger)[-1], "rank")  # under another name
    assert vars(parser.parse_args(["--rank", "3"])) == dict(rank=3)


BAD_INPUTS = [
    (dict(dataset="missing.jsonl"), "--dataset missing.jsonl: no such file"),
    (dict(dataset="no-such-user/no-such-dataset-xyz"),
     "--dataset 'no-such-user/no-such-dataset-xyz'"),
    (dict(algo="ppo"), "--algo 'ppo'"),
    (dict(num_drafts=4, group_size=4), "--num-drafts 4"),
    (dict(loss="sft"), "--loss 'sft'"),
    (dict(reward="judge"), "--reward judge: give --judge-model or --judge-url"),
    (dict(temperature=0.0), "--temperature 0.0"),
    (dict(steps=0), "--steps 0: must be >= 1"),
    (dict(eval_limit=0), "--eval-limit 0: must be >= 1"),
    (dict(eval_limit=-1), "--eval-limit -1: must be >= 1"),
    (dict(problem_key="questoin"), "no column 'questoin' (--problem-key) among"),
    (dict(beta=-1.0), "--beta -1.0: must be >= 0"),
    (dict(min_lr_ratio=5.0), "--min-lr-ratio 5.0: must be in [0, 1]"),
    (dict(warmup_ratio=-1.0), "--warmup-ratio -1.0: must be in [0, 1)"),
    (dict(lr=-1e-4), "--lr -0.0001: must be > 0"),
    (dict(resume=True, overwrite=True), "--resume and --overwrite: choose one"),
    (dict(model=""), "--dataset"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_stops_before_training_with_a_clear_message(tiny, tmp_path, overrides, message,
                                                              monkeypatch):
    monkeypatch.setattr(igrpo, "load_model",
                        lambda *args: pytest.fail("a model loaded before the error"))
    with pytest.raises(SystemExit, match=re.escape(message)) as stopped:
        igrpo.train(tiny_config(tiny, tmp_path, **overrides))
    assert "\n" not in str(stopped.value.code)


@pytest.mark.parametrize("option,value", [("--temperature", "nan"), ("--lr", "inf"),
                                          ("--beta", "-inf"), ("--max-grad-norm", "inf")])
def test_a_number_flag_that_is_nan_or_infinite_is_refused_with_one_line(tiny, tmp_path, monkeypatch,
                                                                      option, value):
    monkeypatch.setattr(igrpo, "load_model", lambda *args: pytest.fail("a model loaded"))
    argv = ["--model", str(tiny / "model"), "--dataset", str(tiny / "train.jsonl"),
            "--output-dir", str(tmp_path / "run"), f"{option}={value}"]
    with pytest.raises(SystemExit) as stopped:
        igrpo.main(argv)
    assert stopped.value.code == f"igrpo: error: {option} {float(value)}: must be a finite number"
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_folder_is_a_one_line_error_before_any_model_loads(
        tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(igrpo, "load_model",
                        lambda *args: pytest.fail("a model loaded before the error"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="--output-dir .*a-file/run: cannot write there"):
        igrpo.train(tiny_config(tiny, tmp_path, output_dir=str(tmp_path / "a-file" / "run")))


def test_a_dataset_without_a_model_is_an_error_not_ignored_by_the_toy(monkeypatch):
    monkeypatch.setattr(toy, "prepare", lambda *args: pytest.fail("the toy was built"))
    with pytest.raises(SystemExit, match="--dataset missing.jsonl needs --model"):
        igrpo.main(["--dataset", "missing.jsonl"])
    with pytest.raises(SystemExit, match="--model: name a causal LM to train"):
        igrpo.main([])


def test_unknown_model_name_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--model 'no-such-user/no-such-model-xyz'"):
        igrpo.train(tiny_config(tiny, tmp_path, model="no-such-user/no-such-model-xyz"))


@pytest.mark.parametrize("rows,message", [
    ([], "no rows"),
    ([{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}], "row 2: empty or missing 'answer'"),
    ([{"problem": "1+1?", "answer": ""}], "row 1: empty or missing 'answer'"),
    ([{"text": "1+1?", "label": "2"}], "no problem column"),
])
def test_bad_dataset_rows_are_named_in_the_error(tiny, tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=re.escape(message)):
        igrpo.train(tiny_config(tiny, tmp_path, dataset=str(path)))


def test_a_csv_dataset_is_an_unsupported_format_not_bad_json(tiny, tmp_path):
    (tmp_path / "problems.csv").write_text("problem,answer\n1+1?,2\n")
    message = "problems.csv: unsupported format .csv: use .jsonl, .json, .parquet"
    with pytest.raises(SystemExit, match=re.escape(message)):
        igrpo.train(tiny_config(tiny, tmp_path, dataset=str(tmp_path / "problems.csv")))


@pytest.mark.parametrize("option", ["dataset", "eval_dataset"])
@pytest.mark.parametrize("name,content,message", [
    ("latin1.jsonl", '{"problem": "Gr\u00fc\u00dfe: 1+1?", "answer": "2"}\n'.encode("latin-1"),
     "not UTF-8 text"),
    ("fake.parquet", b'{"problem": "1+1?", "answer": "2"}\n', "cannot be read as parquet"),
])
def test_a_dataset_file_that_cannot_be_read_is_a_one_line_error_naming_it(
        tiny, tmp_path, monkeypatch, option, name, content, message):
    monkeypatch.setattr(igrpo, "load_model", lambda *args: pytest.fail("a model loaded"))
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as stopped:
        igrpo.train(tiny_config(tiny, tmp_path, **{option: str(path)}))
    flag = "--" + option.replace("_", "-")
    assert str(stopped.value.code).startswith(f"igrpo: error: {flag} {path}: {message}")
    assert "\n" not in str(stopped.value.code)


def test_a_hub_eval_dataset_is_read_from_its_test_split_not_the_training_split(monkeypatch):
    import datasets
    asked = []

    def load_dataset(name, config, split):  # the hub, as its split argument sees it
        asked.append((name, split))
        return [{"question": f"{name} {split}: what is 1+1?", "answer": "#### 2"}]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    igrpo.load_data(Config(dataset="openai/gsm8k", eval_dataset="openai/gsm8k"))
    assert sorted(asked) == [("openai/gsm8k", "test"), ("openai/gsm8k", "train")]
    asked.clear()
    igrpo.load_data(Config(dataset="a/b", split="easy", eval_dataset="a/b", eval_split="hard"))
    assert sorted(asked) == [("a/b", "easy"), ("a/b", "hard")]


def test_datasets_load_from_jsonl_json_and_parquet_with_custom_keys(tmp_path):
    rows = [{"q": "What is 1+1?", "sol": "We get \\boxed{2}."}]
    (tmp_path / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    cfg = Config(problem_key="q", answer_key="sol")
    for suffix in ("jsonl", "json", "parquet"):
        loaded = igrpo.load_problems(str(tmp_path / f"a.{suffix}"), cfg)
        assert loaded == [{"problem": "What is 1+1?", "answer": "2"}]
