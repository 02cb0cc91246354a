"""
The offline toy world behind `python igrpo.py` with no --model: a tiny model that half-knows arithmetic.

RL needs a policy that is sometimes right, so the toy builds one locally (no download): a byte-level BPE
tokenizer trained on the toy's own text, a small Llama-style model from a config, and a short
supervised warm start on synthetic problems ("What is 47 + 38?") written in the same prompt format
that igrpo.py trains with, refinement prompts included. The warm start stops while the model still
gets many problems wrong; the starting point is cached, so only the first run pays for it.
Everything here exists only to give igrpo.py something real to train offline; it is not the method.
"""
import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import torch

import igrpo

MODEL_SIZE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=384, max_position_embeddings=512)
WARM_START_STEPS = 600

# The toy's settings: everything the user did not set on the command line.
SETTINGS = dict(steps=150, prompts_per_step=32, group_size=8, num_drafts=4, lr=1e-4, warmup_ratio=0.05,
                max_prompt_tokens=256, max_completion_tokens=24, max_draft_tokens=24, micro_batch_size=64,
                gradient_checkpointing=False, chat_template="off", eval_limit=300, eval_samples=2,
                output_dir="runs/toy")


def make_problems(count, rng, exclude=()):
    problems, seen = [], set(exclude)
    while len(problems) < count:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if (a, b) not in seen:
            seen.add((a, b))
            problems.append({"problem": f"What is {a} + {b}?", "answer": str(a + b), "a": a, "b": b})
    return problems, seen


def solution(a, b, total):
    return f" {a} + {b} = {total}. \\boxed{{{total}}}"


def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    # Digits stay single tokens, so arithmetic is learnable; anything else may merge, across spaces too,
    # so the long system prompt costs a few tokens and the toy trains fast on a CPU.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_SIZE)
    return LlamaForCausalLM(config)


def warm_start_examples(problems, tokenizer, cfg, rng):
    """(prompt, completion) pairs: plain prompts, and refinement prompts whose "draft" solves another
    problem. So the warm start teaches the model to solve the problem itself whatever a draft says, and
    Stage 2 starts out as good as a single pass; what a real draft is worth, iGRPO has to learn."""
    examples = []
    for p in problems:
        a, b = p["a"], p["b"]
        other = rng.choice(problems)
        draft = solution(other["a"], other["b"], other["a"] + other["b"])
        examples.append((igrpo.build_prompt(tokenizer, p["problem"], cfg), solution(a, b, a + b)))
        examples.append((igrpo.build_prompt(tokenizer, igrpo.refine_message(p["problem"], draft), cfg),
                         solution(a, b, a + b)))
    return examples


def warm_start(model, tokenizer, examples, steps, rng, batch_size=64, lr=3e-3):
    """Plain supervised fine-tuning on the completion tokens, stopped early on purpose."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        batch = rng.sample(examples, batch_size)
        prompts = [tokenizer(p, add_special_tokens=True).input_ids for p, _ in batch]
        completions = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for _, c in batch]
        length = max(len(p) + len(c) for p, c in zip(prompts, completions))
        input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), -100)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for row, (p, c) in enumerate(zip(prompts, completions)):
            input_ids[row, :len(p) + len(c)] = torch.tensor(p + c)
            labels[row, len(p):len(p) + len(c)] = torch.tensor(c)
            attention_mask[row, :len(p) + len(c)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


def build(folder, cfg, warm_start_steps=WARM_START_STEPS, seed=0):
    """Write folder/model (tokenizer + warm-started model), folder/train.jsonl and folder/test.jsonl."""
    rng = random.Random(seed)
    test, seen = make_problems(300, rng)
    train, _ = make_problems(3000, rng, exclude=seen)
    corpus = [igrpo.build_prompt(None, igrpo.refine_message(p["problem"], solution(p["a"], p["b"], p["a"] + p["b"])),
                                 cfg) + solution(p["a"], p["b"], p["a"] + p["b"]) for p in train[:500]]
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, seed)
    started = time.time()
    loss = warm_start(model, tokenizer, warm_start_examples(train, tokenizer, cfg, rng), warm_start_steps, rng)
    print(f"toy: warm start of {warm_start_steps} steps in {time.time() - started:.0f}s, final loss {loss:.3f}")
    folder.mkdir(parents=True, exist_ok=True)
    igrpo.save(model, tokenizer, folder / "model")
    for name, rows in (("train", train), ("test", test)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in rows)


def cache_folder():
    """Keyed by this file and igrpo's prompt templates: change either and the toy is built anew."""
    key = hashlib.sha256("".join([Path(__file__).read_text(), igrpo.SYSTEM_PROMPT, igrpo.REFINE_TEMPLATE,
                                  igrpo.PLAIN_TEMPLATE]).encode()).hexdigest()[:12]
    return Path(__file__).resolve().parent / ".cache" / f"toy-{key}"


def prepare(cfg, given):
    """The toy's settings over the user's unset flags, and its cached starting point (built once)."""
    cfg = dataclasses.replace(cfg, **{k: v for k, v in SETTINGS.items() if k not in given})
    cache = cache_folder()
    if not (cache / "model" / "config.json").exists():
        print(f"toy: building the offline toy world in {cache} (first run only)")
        build(cache, cfg)
    return dataclasses.replace(cfg, model=str(cache / "model"), dataset=str(cache / "train.jsonl"),
                               eval_dataset=cfg.eval_dataset or str(cache / "test.jsonl"))
