"""What the test files share: a tiny model and dataset built locally (no hub), quick settings on
it, and small helpers. Offline: nothing here reaches the hub."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub: fail fast

import pytest
import torch
from safetensors.torch import load_file

import igrpo
import toy
from igrpo import Config


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A folder with model/ (a random 2-layer Llama and a BPE tokenizer trained on the toy's text)
    and train.jsonl (12 problems "What is a + 1?" with GSM8K-style solutions)."""
    folder = tmp_path_factory.mktemp("tiny")
    cfg = Config(chat_template="off")
    texts = [igrpo.build_prompt(None, igrpo.refine_message(
        f"What is {a} + 1?", f"{a} + 1 = {a + 1}. \\boxed{{{a + 1}}}"), cfg) for a in range(30)]
    tokenizer = toy.build_tokenizer(texts)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    saved(model, tokenizer, folder / "model")
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"question": f"What is {a} + 1?", "answer": f"so #### {a + 1}"})
                     + "\n" for a in range(12))
    return folder


def tiny_config(tiny, tmp_path, config_class=Config, **overrides):
    """A Config (or config_class: scale.py's ScaleConfig) for quick runs on the tiny model."""
    settings = dict(model=str(tiny / "model"), dataset=str(tiny / "train.jsonl"), steps=2,
                    prompts_per_step=2, group_size=4, num_drafts=2, lr=1e-3,
                    max_completion_tokens=8, max_draft_tokens=4, max_prompt_tokens=128,
                    micro_batch_size=3, gradient_checkpointing=False, chat_template="off",
                    output_dir=str(tmp_path / "run"))
    settings.update(overrides)
    return config_class(**settings)


def parity_reward(completion, gold):
    """Differs between the completions of a random tiny model, so every update moves the weights."""
    return float(sum(map(ord, completion)) % 2)


def final_weights(folder):
    return load_file(folder / "final" / "model.safetensors")


def training_steps(folder):
    """The steps metrics.jsonl logged a training line for, in order."""
    return [r["step"] for r in map(json.loads, open(folder / "metrics.jsonl")) if "reward" in r]


class Crash(Exception):
    pass


def step_that(monkeypatch, at_call, action):
    """Run igrpo.sample_and_score as usual, but call action() during its at_call-th call
    (1-based): a fault injected into the at_call-th training step."""
    real, calls = igrpo.sample_and_score, []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            action()
        return real(*args, **kwargs)
    monkeypatch.setattr(igrpo, "sample_and_score", wrapped)


def hostile_generation_defaults(model):
    """A checkpoint generation_config that sets every field shaping the next-token distribution."""
    from transformers import WatermarkingConfig
    vocab = model.config.vocab_size
    hostile = dict(do_sample=False, num_beams=2, temperature=0.05, top_k=1, top_p=0.1, min_p=0.9,
                   typical_p=0.1, epsilon_cutoff=0.2, eta_cutoff=0.2, repetition_penalty=10.0,
                   encoder_repetition_penalty=3.0, no_repeat_ngram_size=1,
                   sequence_bias={(5,): 30.0}, min_new_tokens=5, min_length=40,
                   suppress_tokens=list(range(10, vocab, 2)),
                   begin_suppress_tokens=list(range(11, vocab, 2)), bad_words_ids=[[7], [8]],
                   forced_bos_token_id=5, forced_eos_token_id=6, renormalize_logits=True,
                   exponential_decay_length_penalty=(1, 3.0),
                   watermarking_config=WatermarkingConfig(), max_new_tokens=1, max_length=3)
    for name, value in hostile.items():  # as a generation_config.json would hold them, unvalidated
        setattr(model.generation_config, name, value)
    return hostile


def saved(model, tokenizer, folder):
    """model and tokenizer written into folder as igrpo.py saves them."""
    igrpo.save(folder, igrpo.Policy(model, tokenizer, None, []), igrpo.Parts())
    return folder
