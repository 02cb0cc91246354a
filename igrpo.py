"""
igrpo.py: GRPO and iGRPO (Iterative Group Relative Policy Optimization) for math reasoning.

Paper: "iGRPO: Self-Feedback-Driven LLM Reasoning", Hatamizadeh et al., arXiv:2602.09000 (2026).
GRPO samples a group of answers per problem and pushes up the ones that beat the group's average.
iGRPO adds one idea: first sample a few drafts, keep the best one, and let the model write its group
of answers *after reading that draft*. Only those refinements are trained on; at test time the
model answers in one pass, no drafts.

Read top to bottom: settings, data, prompts, rewards, the policy, then one training step (its
overview, the two stages, sampling, log-probs, group-relative advantages, the clipped surrogate with
KL penalty, the update), the parts a companion may replace, the loop, checkpoints and resume, the
command line; an appendix grades answers. Bigger, faster runs (LoRA, torchrun, memory-lean
log-probs, compiled sampling) are scale.py's, which hands its own parts to this file's train().

    python igrpo.py --model Qwen/Qwen2.5-Math-1.5B --dataset DigitalLearningGmbH/MATH-lighteval
    python toy.py                    # the offline toy world: a tiny model trained on the CPU
"""
import argparse
import contextlib
import dataclasses
import errno
import functools
import importlib
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import sympy
import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# Settings: the paper's where it states them, ours where it is silent; one flag each (--kebab-case)
# ----------------------------------------------------------------------------------------------
def setting(default, help, rule="", resumable=False):
    """A Config field: its default, one line of help, and the rule check_config holds it to: a
    bound ('>= 1', '> 0', 'in (0, 1]') or the choices ('on | off'). Resumable: may change on
    --resume."""
    return field(default=default, metadata=dict(help=help, rule=rule, resumable=resumable))


@dataclass
class Config:
    # what to train
    model: str = setting("", "causal LM to train: hub name, folder, .gguf file, or a run's final/")
    dataset: str = setting("", "problems: a hub dataset, or a local .jsonl, .json or .parquet file")
    dataset_config: str = setting("", "hub dataset config, e.g. 'main' for openai/gsm8k")
    split: str = setting("train", "dataset split to train on")
    problem_key: str = setting("", "problem column (default: problem/question/prompt/query)")
    answer_key: str = setting("", "gold answer or solution column (default: answer/solution/...)")
    eval_dataset: str = setting("", "held-out problems, scored before and after (file or hub)")
    eval_split: str = setting("test", "split of a hub --eval-dataset")
    eval_limit: int = setting(200, "score at most this many held-out problems", ">= 1")
    eval_every: int = setting(0, "also score the held-out set every N steps (0: never)", ">= 0")
    eval_samples: int = setting(1, "samples per held-out problem (the paper's avg@k)", ">= 1")
    # the method
    algo: str = setting("igrpo", "drafts, then refinements; or the baseline", "igrpo | grpo")
    loss: str = setting("grpo", "how the loss clips and averages", "grpo | dr_grpo | dapo | gspo")
    group_size: int = setting(8, "sequences generated per problem per step, both stages", ">= 2")
    num_drafts: int = setting(4, "iGRPO Stage-1 drafts per problem; the rest are refinements")
    prompts_per_step: int = setting(8, "problems per update step", ">= 1")
    steps: int = setting(100, "update steps", ">= 1")
    lr: float = setting(1e-6, "peak learning rate", "> 0")
    warmup_ratio: float = setting(0.1, "fraction of steps spent in linear warm-up", "in [0, 1)")
    min_lr_ratio: float = setting(0.1, "floor of the cosine schedule, a fraction of the peak",
                                  "in [0, 1]")
    weight_decay: float = setting(0.0, "AdamW weight decay", ">= 0")
    max_grad_norm: float = setting(1.0, "gradient clipping norm", "> 0")
    clip_eps_low: float = setting(0.0, "ratio clip below 1 (0: the loss's; 0.2, gspo 3e-4)", ">= 0")
    clip_eps_high: float = setting(0.0, "ratio clip above 1 (0: the loss's; dapo 0.28)", ">= 0")
    beta: float = setting(0.0, "weight of the k3 KL penalty to the frozen reference", ">= 0")
    ppo_epochs: int = setting(1, "updates per sampled batch (1: no pass for pi_old)", ">= 1")
    reward: str = setting("rule", "the answer checker, an LM judge, or their mean",
                          "rule | judge | rule+judge")
    judge_model: str = setting("", "judge LM (hub name or folder) for --reward judge")
    judge_url: str = setting("", "OpenAI-compatible endpoint (vLLM, SGLang) serving the judge")
    format_weight: float = setting(0.0, "weight of the format reward (the paper's appendix: 1)")
    overlong_buffer: int = setting(0, "DAPO's soft penalty over the budget's last N tokens", ">= 0")
    # sampling (log-probs are of softmax(logits / T), without top-p's cut)
    temperature: float = setting(0.7, "sampling temperature in training", "> 0")
    top_p: float = setting(1.0, "nucleus sampling in training", "in (0, 1]")
    max_prompt_tokens: int = setting(1024, "longer problems are skipped", ">= 1")
    max_completion_tokens: int = setting(4096, "generation budget per completion", ">= 1")
    max_draft_tokens: int = setting(2048, "a longer best draft loses its beginning", ">= 1")
    eval_temperature: float = setting(0.6, "temperature of held-out scoring (and eval.py)", ">= 0")
    eval_top_p: float = setting(0.95, "top-p of held-out scoring (and eval.py)", "in (0, 1]")
    chat_template: str = setting("auto", "the tokenizer's (auto: if it has one)", "auto | on | off")
    # engineering
    micro_batch_size: int = setting(8, "sequences per forward/backward; sets peak memory", ">= 1",
                                    resumable=True)
    generation_batch_size: int = setting(256, "sequences per generate call", ">= 1", resumable=True)
    gradient_checkpointing: bool = setting(True, "recompute activations in backward: less memory",
                                           resumable=True)
    dtype: str = setting("auto", "bf16 on a GPU, fp32 on a CPU (master weights: fp32)",
                         "auto | bf16 | fp32")
    trust_remote_code: bool = setting(False, "allow model/tokenizer code from the hub")
    seed: int = setting(0, "random seed")
    output_dir: str = setting("runs/igrpo", "metrics.jsonl, args.json and checkpoints go here",
                              resumable=True)  # a run folder moved elsewhere resumes there
    save_every: int = setting(0, "also save a checkpoint every N steps (and on Ctrl-C)", ">= 0",
                              resumable=True)
    keep_checkpoints: int = setting(2, "keep the newest N step-N checkpoints (0: all)", ">= 0",
                                    resumable=True)
    resume: bool = setting(False, "go on from the newest checkpoint in --output-dir",
                           resumable=True)
    overwrite: bool = setting(False, "delete the run in --output-dir, start afresh", resumable=True)
    log_completions_every: int = setting(10, "every Nth step, write some completions to "
                                             "completions.jsonl (0: never)", ">= 0", resumable=True)
    track: str = setting("none", "also send metrics and completions there (track.py)",
                         "none | tensorboard | wandb | trackio", resumable=True)
    run_name: str = setting("", "the run's name in the tracker (default: --output-dir's)",
                            resumable=True)


def fail(message):
    """Bad input stops the run with one line that names the problem."""
    raise SystemExit(f"igrpo: error: {message}")


def first_line(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"


def companion(name, needed_for):
    """A file of this project beside igrpo.py (judge.py, track.py), imported when a flag needs
    it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        fail(f"{needed_for}: needs {name}.py beside igrpo.py (copy it from the project)")


# ----------------------------------------------------------------------------------------------
# Data: problems with gold answers, from a local file or the hub
# ----------------------------------------------------------------------------------------------
PROBLEM_KEYS = ("problem", "question", "prompt", "query", "input")
ANSWER_KEYS = ("answer", "solution", "final_answer", "target", "output")


def read_rows(name, config="", split="train", flag="dataset"):
    """The rows of a local .jsonl/.json/.parquet file or a hub dataset; errors name the file."""
    path = Path(name)
    if not (path.suffix in (".jsonl", ".json", ".parquet") or path.exists()):
        try:
            import datasets
            return list(datasets.load_dataset(name, config or None, split=split))
        except Exception as error:  # the hub client raises many types; name and reason suffice
            fail(f"--{flag} {name!r}: not a local file, and the Hugging Face hub failed to load "
                 f"its split {split!r} ({first_line(error)})")
    if not path.is_file() or path.suffix not in (".jsonl", ".json", ".parquet"):
        fail(f"--{flag} {name}: " + ("no such file" if not path.is_file() else
             f"unsupported format {path.suffix or '(no suffix)'}: use .jsonl, .json, .parquet"))
    try:
        if path.suffix == ".parquet":
            import datasets
            return list(datasets.Dataset.from_parquet(name))
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":  # a list of rows, or an object holding one: {"data": [...]}
            data = json.loads(text)
            return data if isinstance(data, list) else [*filter(lambda v: isinstance(v, list),
                                                                data.values()), []][0]
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is text
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as error:
                fail(f"--{flag} {name}, line {number}: not valid JSON ({error.msg})")
        return rows
    except UnicodeDecodeError as error:
        fail(f"--{flag} {name}: not UTF-8 text (byte {error.start} is {error.object[error.start]})")
    except json.JSONDecodeError as error:
        fail(f"--{flag} {name}: not valid JSON ({error.msg})")
    except Exception as error:  # a .parquet that is not one: pyarrow's error types vary
        fail(f"--{flag} {name}: cannot be read as {path.suffix[1:]} ({first_line(error)})")


def gold_answer(raw):
    """A gold answer, or the final answer of a full solution (GSM8K's "#### 72", MATH's \\boxed{})
    as the appendix's extract_answer reads it."""
    return extract_answer(raw) or raw.strip()


def load_problems(name, cfg, flag="dataset", limit=None, split=None):
    """Rows -> [{"problem": str, "answer": str}]; a full solution gives its final answer as gold."""
    rows = read_rows(name, cfg.dataset_config, split or cfg.split, flag)[:limit]
    if not rows:
        fail(f"--{flag} {name}: no rows")
    columns = sorted(set().union(*(row.keys() for row in rows if isinstance(row, dict))))
    keys = []
    for given, usual, option in ((cfg.problem_key, PROBLEM_KEYS, "problem-key"),
                                 (cfg.answer_key, ANSWER_KEYS, "answer-key")):
        keys.append(given or next((key for key in usual if key in columns), None))
        if keys[-1] not in columns:
            fail(f"--{flag} {name}: no column {given!r} (--{option}) among {columns}" if given
                 else f"--{flag} {name}: no {option[:-4]} column among {columns}; name it with "
                 f"--{option}")
    problems, prose = [], 0
    for index, row in enumerate(rows, 1):  # counted from 1, like the lines of a .jsonl
        problem, raw = (row.get(key) if isinstance(row, dict) else None for key in keys)
        if not problem or not str(raw or "").strip():
            fail(f"--{flag} {name}, row {index}: empty or missing {keys[bool(problem)]!r}")
        problems.append({"problem": str(problem), "answer": gold_answer(str(raw))})
        prose += not extract_answer(str(raw)) and len(re.findall(r"[a-zA-Z]{2,}", str(raw))) > 2
    if prose:  # "It is four.": graded as written, which a right answer rarely matches
        print(f"--{flag} {name}: {prose} of {len(problems)} gold answers read like prose (no "
              f"\\boxed{{}} or ####, 3 words or more); each is compared whole")
    return problems


# ----------------------------------------------------------------------------------------------
# Prompts: the system prompt, and the Stage-2 prompt q' = q + best draft
# ----------------------------------------------------------------------------------------------
# The paper's prompt asks for <think>...</think> and <answer>...</answer>; ours asks for \boxed{},
# the form in which MATH-style solutions and the six benchmarks' golds are written.
SYSTEM_PROMPT = (
    "You are a careful mathematician. Reason step by step, then give the final answer as "
    "\\boxed{answer}. If the message contains a previous draft, it is guidance, not ground "
    "truth: check it, fix its mistakes, fill its gaps, and write a strictly better complete "
    "solution instead of copying it.")
# The paper does not publish how the draft is introduced; this separator is ours.
REFINE_TEMPLATE = ("{problem}\n\nPrevious draft (may contain mistakes):\n{draft}\n\n"
                   "Write an improved solution.")
PLAIN_TEMPLATE = "{system}\n\nProblem: {user}\n\nSolution:"  # base models without a chat template


def uses_chat_template(tokenizer, cfg):
    if cfg.chat_template == "auto":
        return bool(tokenizer.chat_template)
    return cfg.chat_template == "on"


def build_prompt(tokenizer, user_message, cfg):
    if uses_chat_template(tokenizer, cfg):
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": user_message}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(system=SYSTEM_PROMPT, user=user_message)


def encode(tokenizer, prompts, cfg):
    """Prompt ids as the model reads them, left-padded. A chat template already wrote its special
    tokens (BOS included), so the tokenizer adds them only to plain prompts."""
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                     add_special_tokens=not uses_chat_template(tokenizer, cfg))


def prompt_length(tokenizer, problem, cfg):
    return encode(tokenizer, build_prompt(tokenizer, problem, cfg), cfg).input_ids.shape[1]


def short_enough(problems, tokenizer, cfg, context, flag):
    """The problems whose prompt fits --max-prompt-tokens and leaves room in the model's context."""
    limit = min(cfg.max_prompt_tokens, context - 1) if context else cfg.max_prompt_tokens
    lengths = [prompt_length(tokenizer, p["problem"], cfg) for p in problems]
    short = [p for p, length in zip(problems, lengths) if length <= limit]
    if not short:
        fail(f"--{flag} {getattr(cfg, flag.replace('-', '_'))}: every prompt is longer than "
             f"{limit} tokens (--max-prompt-tokens {cfg.max_prompt_tokens}, "
             f"model context {context})")
    if len(short) < len(problems):
        print(f"--{flag}: skipping {len(problems) - len(short)} problems longer than {limit} "
              "prompt tokens")
    drafts = cfg.max_draft_tokens if cfg.algo == "igrpo" and flag == "dataset" else 0
    say_context_limit(context, max(n for n in lengths if n <= limit) + drafts,
                      cfg.max_completion_tokens)
    return short


def say_context_limit(context, prompt_tokens, budget):
    if context and prompt_tokens + budget > context:
        tqdm.write(f"the model reads at most {context} positions: a completion stops there, "
                   f"short of its budget of {budget} tokens, when prompt + budget exceed it")


def cut_draft(tokenizer, draft, max_tokens):
    """A draft over budget loses its beginning: the end, where the final answer is, stays."""
    ids = tokenizer(draft, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[-max_tokens:]) if len(ids) > max_tokens else draft


def refine_message(problem, draft):
    return REFINE_TEMPLATE.format(problem=problem, draft=draft.strip())


def repeat(items, times):
    return [item for item in items for _ in range(times)]


# ----------------------------------------------------------------------------------------------
# Rewards: R = accuracy (checker, judge, or their mean) + format_weight * format - overlong penalty
# ----------------------------------------------------------------------------------------------
def math_reward(completion, gold):
    """1 if the completion's final answer is the gold answer. How a careful grader decides that,
    across the forms answers take (fractions, intervals, lists, units), is the file's appendix."""
    return 1.0 if answers_match(extract_answer(completion), gold) else 0.0


def format_reward(completion):
    """The paper's appendix adds a format reward; ours: reasoning first, then one boxed answer
    (closed: a completion cut inside its box has none)."""
    before, _, after = completion.partition("\\boxed{")
    closed = len(before) + len("\\boxed{") - 1 in closing_braces(completion)
    return 1.0 if before.strip() and closed and "\\boxed{" not in after else 0.0


class Rewards(NamedTuple):
    total: torch.Tensor     # (B,) what the advantages are computed from
    accuracy: torch.Tensor  # (B,) 1.0 where the checker finds the gold answer
    format: torch.Tensor    # (B,) 1.0 for reasoning, then one boxed answer (format_reward)
    judge_unparsed: int     # judge replies that gave no score (counted 0)


def compute_rewards(completions, golds, cfg, lengths=None, problems=None, judge=None):
    """The one reward function: accuracy (checker and/or judge) + format - overlong penalty."""
    accuracy = torch.tensor([math_reward(c, g) for c, g in zip(completions, golds)])
    total, unparsed = accuracy.clone(), 0
    if cfg.reward != "rule":
        scores = judge(problems, golds, completions)  # in [0, 1], or None: no score
        unparsed = sum(s is None for s in scores)
        judged = torch.tensor([s or 0.0 for s in scores])
        total = judged if cfg.reward == "judge" else (accuracy + judged) / 2
    formats = torch.tensor([format_reward(c) for c in completions])
    total = total + cfg.format_weight * formats
    if cfg.overlong_buffer and lengths is not None:  # DAPO (Yu et al. 2025): soft, near the budget
        start = cfg.max_completion_tokens - cfg.overlong_buffer
        total = total - ((lengths.cpu().float() - start) / cfg.overlong_buffer).clamp(0, 1)
    return Rewards(total, accuracy, formats, unparsed)


# ----------------------------------------------------------------------------------------------
# The policy: a causal LM and its tokenizer, the tokens that end a completion, and fp32 master
# weights. bf16 alone would round a small update away, so the optimizer steps an fp32 copy of each
# bf16 weight (per parameter 2 bytes of bf16 + 4 of fp32 + 4 of gradient + 8 of Adam state).
# ----------------------------------------------------------------------------------------------
def device_and_dtype(choice):
    """The GPU if there is one; --dtype auto is bf16 there and fp32 on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = choice == "bf16" or (choice == "auto" and device == "cuda")
    return device, torch.bfloat16 if bf16 else torch.float32


def model_source(name, flag="model"):
    """A model folder to load: a run folder stands for its final/ (eval.py takes it too)."""
    folder = Path(name)
    if not folder.is_dir() or any((folder / f).is_file() for f in ("config.json",
                                                                   "adapter_config.json")):
        return name
    if (folder / "final").is_dir():
        print(f"--{flag} {name}: a training run folder; loading its final model, "
              f"{folder / 'final'}")
        return str(folder / "final")
    run = (folder / "metrics.jsonl").is_file() or (folder / "args.json").is_file()
    fail(f"--{flag} {name}: " + ("a training run folder without final/ (still training, or "
                                 "stopped early?)" if run else "no config.json: not a model folder")
         + "; pass a model folder such as a run's final/ (or a step-N checkpoint)")


def load_model(name, cfg, dtype, device, flag="model"):
    """(model on device, tokenizer) from a hub name, a folder or a .gguf file, ready to sample and
    score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name, where = model_source(name, flag), {}
    if name.endswith(".gguf"):  # llama.cpp's single-file format, dequantized by transformers
        name, where = str(Path(name).parent), dict(gguf_file=Path(name).name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code,
                                                  **where)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **where,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as error:  # ImportError: a .gguf needs gguf
        fail(f"--{flag} {str(Path(name, *where.values()))!r}: not a local model folder, and the "
             f"Hugging Face hub failed to load it ({first_line(error)})")
    if where:  # a .gguf's weights arrive dequantized: a plain model, saved as one
        del model.config.quantization_config
        model.hf_quantizer = None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for module in model.modules():  # a training forward scores tokens under the policy that sampled
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model.to(device), tokenizer


def stop_ids(model, tokenizer, cfg):
    """EOS (the model's and the tokenizer's) and, with the chat template, the token that ends the
    assistant's turn: a base model's EOS (<|endoftext|>) is often not what its template ends a turn
    with (<|im_end|>)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    if uses_chat_template(tokenizer, cfg):
        ids.add(turn_end_id(tokenizer))
    return sorted(i for i in ids if i is not None)


def turn_end_id(tokenizer):
    """The special token that closes an assistant turn in the chat template (<|im_end|>,
    <|eot_id|>), or None. Read from the template itself: render an assistant turn around a marker,
    take the token after it."""
    from jinja2 import TemplateError
    marker = "igrpo-turn-marker"
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, TypeError):
        return None
    if marker not in text:
        return None
    rest = text[text.rindex(marker) + len(marker):].lstrip()
    after = tokenizer(rest, add_special_tokens=False).input_ids
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return after[0] if after and after[0] in special | set(tokenizer.all_special_ids) else None


def max_positions(model):
    """The longest sequence the model was built to read (None when its config does not say)."""
    config = model.config.get_text_config()
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    return min((n for n in limits if isinstance(n, int) and n > 0), default=None)


def load_policy(cfg, resume_from, device, dtype, load=load_model):
    """(policy, tokenizer, frozen reference policy or None: --beta 0 needs none). load: how a model
    folder loads (scale.py's also checks how to score it)."""
    model, tokenizer = load(str(resume_from or cfg.model), cfg, dtype, device)
    reference = None
    if cfg.beta > 0:
        reference = load(cfg.model, cfg, dtype, device)[0].eval().requires_grad_(False)
    if cfg.gradient_checkpointing:  # backward recomputes each layer's activations
        enable = getattr(model, "activation_checkpointing_enable", None)  # older: gradient_...
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    return model, tokenizer, reference


def master_weights(model):
    """The optimizer's fp32 weights: fp32 parameters themselves, fp32 copies of the others, whose
    gradients move into their copies' as backward produces them."""
    master = []
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            master.append(p.detach().float().clone())
            if hasattr(p, "to_master"):  # a model has one set of master weights: the newest
                p.to_master.remove()
            p.to_master = p.register_post_accumulate_grad_hook(
                functools.partial(move_gradient, to=master[-1]))
        elif p.requires_grad:
            master.append(p)
    return master


def move_gradient(p, to):
    if p.grad is not None:  # None: the gradient went to the master another way (scale.py)
        to.grad = p.grad.float() if to.grad is None else to.grad.add_(p.grad)
        p.grad = None


def master_weights_and_optimizer(model, cfg):
    """(master weights, AdamW over them). Fused: no whole-model temporaries in Adam's arithmetic."""
    master = master_weights(model)
    return master, torch.optim.AdamW(master, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def save_optimizer(policy, folder):
    """optimizer.pt: what resumes the update exactly, beyond the model's weights: AdamW's moments,
    and the fp32 master copies of bf16 weights (which the saved bf16 model rounds)."""
    copies = [m for m in policy.master if not m.requires_grad]  # an fp32 parameter is its own
    torch.save(dict(optimizer=policy.optimizer.state_dict(), master=copies),
               folder / "optimizer.pt")


def load_optimizer(policy, folder, processes):
    """optimizer.pt back into the optimizer and master weights; processes: how many wrote it."""
    path = folder / "optimizer.pt"
    if not path.is_file():
        fail(f"--resume: {folder} was written by {processes} processes under torchrun (scale.py, "
             "its optimizer sharded in optimizer/); this run is 1 process: resume it with "
             f"torchrun --nproc-per-node {processes} scale.py")
    state = torch.load(path, map_location="cpu", weights_only=True)
    masters = [m for m in policy.master if not m.requires_grad]
    if len(state["master"]) != len(masters):
        fail(f"--resume: {path} holds {len(state['master'])} fp32 master weights, the model has "
             f"{len(masters)} (another --dtype?)")
    policy.optimizer.load_state_dict(state["optimizer"])
    with torch.no_grad():
        for m, saved in zip(masters, state["master"]):
            m.copy_(saved)


class Policy(NamedTuple):
    """What a step trains and reads: the model and its tokenizer, AdamW over its fp32 master
    weights, and the frozen reference model the KL penalty holds it near (None at --beta 0)."""
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    master: list
    reference: torch.nn.Module = None


# ----------------------------------------------------------------------------------------------
# One training step. GRPO: G completions of each problem q, one update. iGRPO, two stages and one
# update:
#   Stage 1: N drafts of q (no gradient), scored; d* = the first of the best (used even if wrong)
#   Stage 2: q' = q + d* through REFINE_TEMPLATE; G - N refinements of q' get advantages and
#            gradient. Either way the step generates G sequences per problem: the matched budget
#            (our G, --group-size, is the paper's N + G; its G refinements are our G - N).
# What the step calls follows it, in reading order. `parts` (Parts, before the loop) holds the
# calls a companion may replace: parts.sample, parts.token_logprobs, parts.optimizer_step.
# ----------------------------------------------------------------------------------------------
def training_step(step, batch, policy, cfg, parts):
    """One GRPO or iGRPO step on a batch of problems (this process's share of the step's).
    Returns (its line of metrics.jsonl, the Rollout, the advantages)."""
    started = time.time()
    rollout = sample_and_score(batch, policy, cfg, parts)
    advantages, trained = step_advantages(rollout.rewards.total, rollout.per_group, cfg)
    for param_group in policy.optimizer.param_groups:
        param_group["lr"] = learning_rate(step - 1, cfg)
    update = policy_update(policy, rollout.sequences, advantages, trained, cfg, parts)
    record = step_metrics(step, rollout, trained, update, time.time() - started, cfg,
                          parts.world)
    return dict(record, lr=policy.optimizer.param_groups[0]["lr"]), rollout, advantages


class Rollout(NamedTuple):
    sequences: "Sequences"  # what the update trains on: the refinements (iGRPO) or the group (GRPO)
    rewards: Rewards        # of those sequences, (B*per_group,) each, groups contiguous
    per_group: int          # sequences trained on per problem: G (GRPO), G - N refinements (iGRPO)
    prompts: list           # what they were sampled from, B of them: q' = q + d* (iGRPO) or q
    drafts: "Sequences" = None   # Stage 1 (iGRPO): N drafts of each problem, (B*N) rows
    draft_rewards: Rewards = None
    best_drafts: list = None     # d* of each problem, cut to --max-draft-tokens


def sample_and_score(batch, policy, cfg, parts):
    """Sample and score one step's groups: Stage 1 then Stage 2 (iGRPO), or the group (GRPO)."""
    model, tokenizer = policy.model, policy.tokenizer
    problems, golds = [b["problem"] for b in batch], [b["answer"] for b in batch]
    prompts = [build_prompt(tokenizer, problem, cfg) for problem in problems]
    stage_one, per_group = {}, cfg.group_size
    if cfg.algo == "igrpo":  # Stage 1
        N = cfg.num_drafts
        drafts = parts.sample(model, tokenizer, prompts, cfg, per_prompt=N, progress="drafts")
        best, draft_rewards = best_drafts(tokenizer, batch, drafts, cfg, parts.judge)
        prompts = [build_prompt(tokenizer, refine_message(problem, draft), cfg)
                   for problem, draft in zip(problems, best)]                      # q' = q + d*
        per_group = cfg.group_size - N
        stage_one = dict(drafts=drafts, draft_rewards=draft_rewards, best_drafts=best)
    sequences = parts.sample(model, tokenizer, prompts, cfg, per_prompt=per_group,
                             progress="refinements" if stage_one else "group")  # Stage 2, or GRPO
    rewards = compute_rewards(sequences.texts, repeat(golds, per_group), cfg, sequences.lengths,
                              repeat(problems, per_group), parts.judge)
    return Rollout(sequences, rewards, per_group, prompts, **stage_one)


def best_drafts(tokenizer, batch, drafts, cfg, judge=None):
    """Stage 1's outcome: per problem d* = the first of the best drafts, cut to --max-draft-tokens,
    and the drafts' Rewards (B*N,)."""
    N, problems, golds = cfg.num_drafts, [b["problem"] for b in batch], [b["answer"] for b in batch]
    rewards = compute_rewards(drafts.texts, repeat(golds, N), cfg, drafts.lengths,
                              repeat(problems, N), judge)
    best_rows = torch.arange(len(batch)) * N + rewards.total.view(-1, N).argmax(1)  # first of ties
    best = [cut_draft(tokenizer, drafts.texts[row], cfg.max_draft_tokens)
            for row in best_rows.tolist()]
    return best, rewards


# ----------------------------------------------------------------------------------------------
# Sampling: the group o_1..o_G ~ pi_theta(. | q) in batched generate calls (left padding, KV cache,
# no gradient)
# ----------------------------------------------------------------------------------------------
@dataclass
class Sequences:
    """Prompts with their sampled completions, laid out as one left-padded tensor."""
    input_ids: torch.Tensor       # (B, P+T) prompt left-padded to P, completion right-padded to T
    attention_mask: torch.Tensor  # (B, P+T)
    prompt_length: int            # P
    completion_mask: torch.Tensor  # (B, T) True on generated tokens up to and including EOS
    texts: list                   # B decoded completions

    @property
    def lengths(self):            # (B,)
        return self.completion_mask.sum(1)

    def subset(self, rows):       # rows: a slice
        return Sequences(self.input_ids[rows], self.attention_mask[rows], self.prompt_length,
                         self.completion_mask[rows], self.texts[rows])


@torch.no_grad()
def sample(model, tokenizer, prompts, cfg, *, per_prompt, temperature=None, top_p=None,
           max_new_tokens=None, progress=None, **generate_options):
    """per_prompt completions for each prompt, grouped: rows i*per_prompt .. (i+1)*per_prompt-1.
    Temperature, top-p and the token budget default to training's; held-out scoring and the judge
    pass their own. progress: a label for a progress bar, shown once sampling takes over 2 s (None:
    no bar). generate_options: more arguments of generate (scale.py's static cache)."""
    from transformers import GenerationConfig
    if not prompts:  # a process whose share of the problems is empty: nothing to sample
        empty = torch.zeros(0, 0, dtype=torch.long, device=model.device)
        return Sequences(empty, empty, 0, empty.bool(), [])
    temperature = cfg.temperature if temperature is None else temperature
    top_p = cfg.top_p if top_p is None else top_p
    max_new_tokens, context = max_new_tokens or cfg.max_completion_tokens, max_positions(model)
    stop = stop_ids(model, tokenizer, cfg)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=0) if temperature else {}
    generation = GenerationConfig(do_sample=temperature > 0, **sampling, eos_token_id=stop,
                                  pad_token_id=tokenizer.pad_token_id,
                                  num_return_sequences=per_prompt)
    # generate() fills every field left unset from model.generation_config, so a checkpoint's own
    # defaults (sequence_bias, suppress_tokens, min_new_tokens, a top_k, ...) would sample from a
    # distribution our log-probs do not describe: during the call it holds transformers' plain ones
    own_defaults, model.generation_config = model.generation_config, GenerationConfig()
    model.eval()
    per_call = max(1, cfg.generation_batch_size // per_prompt)  # prompts per generate call
    outputs = []  # (generate's output, its prompts' attention mask) per call
    bar = tqdm(total=len(prompts) * per_prompt, desc=progress, leave=False, dynamic_ncols=True,
               disable=progress is None, delay=2)
    try:
        for start in range(0, len(prompts), per_call):
            encoded = encode(tokenizer, prompts[start:start + per_call], cfg).to(model.device)
            longest = encoded.input_ids.shape[1]
            if context and longest >= context:
                fail(f"a prompt of {longest} tokens fills the model's context of {context} "
                     "positions: lower --max-prompt-tokens or --max-draft-tokens")
            generation.max_new_tokens = min(max_new_tokens, context - longest if context else
                                            max_new_tokens)
            output = model.generate(**encoded, generation_config=generation, **generate_options)
            outputs.append((output, encoded.attention_mask.repeat_interleave(per_prompt, 0)))
            bar.update(len(output))
    finally:
        model.generation_config = own_defaults
        bar.close()
    return stack_sequences(outputs, tokenizer, stop)


def stack_sequences(outputs, tokenizer, stop):
    """Pad generate outputs to one (B, P+T) layout. A completion ends at its first stop token, or
    where its generate call ended: the padding added here is never mistaken for a sampled token,
    even when it is the EOS id."""
    P = max(mask.shape[1] for _, mask in outputs)
    T = max(output.shape[1] - mask.shape[1] for output, mask in outputs)
    pad = tokenizer.pad_token_id
    ids, prompt_masks, widths = [], [], []
    for output, mask in outputs:
        p, t = mask.shape[1], output.shape[1] - mask.shape[1]
        ids.append(torch.nn.functional.pad(output, (P - p, T - t), value=pad))
        prompt_masks.append(torch.nn.functional.pad(mask, (P - p, 0), value=0))
        widths += [t] * len(output)  # a call cut short by the context can end before T
    input_ids, prompt_mask = torch.cat(ids), torch.cat(prompt_masks)
    completions = input_ids[:, P:]                                              # (B, T)
    generated = torch.tensor(widths, device=completions.device)                 # (B,)
    columns = torch.arange(T, device=completions.device)[None]                  # (1, T)
    is_stop = torch.isin(completions, torch.tensor(stop, device=completions.device))
    is_stop &= columns < generated[:, None]
    stopped = is_stop.any(1)                                                    # (B,)
    first_stop = torch.where(stopped, is_stop.int().argmax(1) + 1, generated)   # stop in the mask
    completion_mask = columns < first_stop[:, None]
    text_ends = (first_stop - stopped.long()).tolist()                           # but not the text
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(completions, text_ends)],
                                   skip_special_tokens=True)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    return Sequences(input_ids, attention_mask, P, completion_mask, texts)


# ----------------------------------------------------------------------------------------------
# Log-probs: log pi_theta(o_t | q, o_<t) of each sampled token, under the distribution it was
# sampled from, softmax(logits / temperature). The ratio r and the KL term are built from these.
# ----------------------------------------------------------------------------------------------
def token_logprobs(model, input_ids, attention_mask, prompt_length, completion_mask, temperature,
                   with_entropy=True):
    """(logp, entropy or None), each (b, T), zero off the mask. The output layer runs only where a
    position predicts a completion token (logits_to_keep), and one (b, T, V) float32 log-softmax is
    kept for backward; scale.py's lean version keeps none, and a test pins that the two agree."""
    T = input_ids.shape[1] - prompt_length
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding shifts no position
    # the positions P-1 .. P+T-2 predict the T completion tokens; older models compute them all
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
    keep = dict(logits_to_keep=T + 1) if keeps else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, **keep).logits[:, -T - 1:-1]                  # (b, T, V)
    all_logp = torch.log_softmax(logits.float() / temperature, -1)              # (b, T, V)
    del logits
    targets = input_ids[:, prompt_length:]                                      # (b, T)
    logp = all_logp.gather(-1, targets[..., None]).squeeze(-1)                  # (b, T)
    entropy = None
    if with_entropy:  # a metric, without gradient: -sum p log p, in one temporary (b, T, V)
        with torch.no_grad():
            p_log_p = all_logp.exp().mul_(all_logp)  # NaN where p = 0 and log p = -inf: it adds 0
            entropy = -p_log_p.nansum(-1).masked_fill(~completion_mask, 0.0)
    return logp.masked_fill(~completion_mask, 0.0), entropy


# ----------------------------------------------------------------------------------------------
# Group-relative advantages: every token of o_j gets A_j = (R_j - mean(R)) / std(R) over its group,
# and A_j = 0 when the group agrees (std = 0). No value network.
# ----------------------------------------------------------------------------------------------
def step_advantages(rewards, per_group, cfg):
    """(A_j of each sequence, which sequences train), (B*G,) each. DAPO drops the groups that
    agree; elsewhere they stay in the average with advantage 0."""
    advantages = group_advantages(rewards, per_group, scale_by_std=cfg.loss != "dr_grpo")
    trained = torch.ones_like(rewards, dtype=torch.bool)
    if cfg.loss == "dapo":
        trained = informative_groups(rewards, per_group)
    return advantages, trained


def group_advantages(rewards, per_group, scale_by_std=True):
    grouped = rewards.view(-1, per_group)                                        # (B, G)
    centered = grouped - grouped.mean(1, keepdim=True)
    if scale_by_std:  # Dr. GRPO (Liu et al. 2025) drops this division
        centered = centered / (grouped.std(1, correction=0, keepdim=True) + 1e-6)
    agree = grouped.amax(1, keepdim=True) == grouped.amin(1, keepdim=True)
    return centered.masked_fill(agree, 0.0).view(-1)                              # (B*G,)


def informative_groups(rewards, per_group):
    """(B*G,) True for members of groups whose rewards differ: the only groups that carry signal."""
    grouped = rewards.view(-1, per_group)
    return (grouped.amax(1) != grouped.amin(1)).repeat_interleave(per_group)


# ----------------------------------------------------------------------------------------------
# The clipped surrogate with KL penalty, for token t of completion j, with r = pi_theta / pi_old:
#   loss_jt = -min(r A_j, clip(r, 1 - eps_low, 1 + eps_high) A_j) + beta * KL_jt
#   KL_jt   = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1           (the "k3" estimator, >= 0)
# averaged over each completion's tokens (1/|o_j|) and then over completions (the paper's choice).
# ----------------------------------------------------------------------------------------------
CLIP_DEFAULTS = {"grpo": (0.2, 0.2), "dr_grpo": (0.2, 0.2), "dapo": (0.2, 0.28),
                 "gspo": (3e-4, 4e-4)}  # (eps_low, eps_high) per loss


def loss_weights(completion_mask, loss, max_completion_tokens, world):
    """(B, T) weight of each token's term; summed over the micro-batches, this process's share of
    the step's loss. The normalizers count every process's completions and tokens, so the shares'
    gradients add up to the one-process gradient."""
    mask = completion_mask.float()
    completions, tokens = world.sum(len(mask), mask.sum())
    if loss == "dapo":     # DAPO (Yu et al. 2025): one token-level mean over the whole batch
        return mask / max(tokens, 1)
    if loss == "dr_grpo":  # Dr. GRPO: a constant normalizer, not scaled by a completion's length
        return mask / (max_completion_tokens * max(completions, 1))
    return mask / (mask.sum(1, keepdim=True) * max(completions, 1))  # grpo, gspo: mean of means


def policy_loss(logp, old_logp, advantages, completion_mask, weights, cfg, ref_logp=None):
    """logp, old_logp, ref_logp, weights, completion_mask: (b, T); advantages: (b,).
    Returns (loss, clipped token count, summed KL), the last two as tensors (no device sync)."""
    log_ratio = logp - old_logp
    if cfg.loss == "gspo":  # GSPO (Zheng et al. 2025): one ratio per sequence, its geometric mean
        masked = log_ratio * completion_mask
        log_ratio = masked.sum(1, keepdim=True) / completion_mask.sum(1, keepdim=True)
    ratio = log_ratio.exp()                                                      # (b, T) or (b, 1)
    default_low, default_high = CLIP_DEFAULTS[cfg.loss]
    low, high = cfg.clip_eps_low or default_low, cfg.clip_eps_high or default_high
    unclipped = ratio * advantages[:, None]
    clipped = ratio.clamp(1 - low, 1 + high) * advantages[:, None]
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = per_token + cfg.beta * kl
    loss = (per_token * weights).sum()
    clip_count = ((clipped < unclipped) & completion_mask).sum()
    return loss, clip_count, (kl.detach() * completion_mask).sum()


# ----------------------------------------------------------------------------------------------
# The update: the learning rate of the step, the loss over micro-batches, gradients accumulated
# into the fp32 master weights, one AdamW step per epoch (--ppo-epochs: the paper does not say;
# our 1 needs no pass for pi_old)
# ----------------------------------------------------------------------------------------------
def learning_rate(step, cfg):
    """Linear warm-up, then cosine decay to a floor of min_lr_ratio x the peak."""
    warmup = max(1, round(cfg.warmup_ratio * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def policy_update(policy, sequences, advantages, trained, cfg, parts):
    """--ppo-epochs optimizer steps on the completions marked trained (B*G,). Returns this
    process's sums of the update's numbers, and the gradient norm averaged over the epochs."""
    model = policy.model
    model.train()
    rows = trained.to(sequences.input_ids.device).nonzero().squeeze(1)          # (n,)
    weights = loss_weights(sequences.completion_mask[rows], cfg.loss, cfg.max_completion_tokens,
                           parts.world)
    micro_batches = [(rows[i:i + cfg.micro_batch_size], weights[i:i + cfg.micro_batch_size])
                     for i in range(0, len(rows), cfg.micro_batch_size)]
    real = len(micro_batches)
    # every process runs as many (a sharded model's passes are collective): the extra ones, on
    # sequence 0, weigh 0 and count in no metric (DAPO: a process whose groups all agree has none)
    micro_batches += [(rows.new_zeros(1), weights.new_zeros(1, weights.shape[1]))] * (
        max(parts.world.gather(real)) - real)
    # With one epoch the sampler *is* the policy being updated: pi_old = logp.detach(), no pass.
    old = no_grad_logprobs(model, sequences, micro_batches, cfg, parts) \
        if cfg.ppo_epochs > 1 else None
    reference = policy.reference and no_grad_logprobs(policy.reference, sequences,
                                                      micro_batches, cfg, parts)
    advantages = advantages.to(rows.device)
    sums = dict(loss=0.0, clipped=0, kl=0.0, entropy=0.0, grad_norm=0.0)
    bar = tqdm(total=cfg.ppo_epochs * len(micro_batches), desc="update", leave=False, delay=2,
               dynamic_ncols=True, disable=parts.world.rank != 0)
    for epoch in range(cfg.ppo_epochs):
        for k, (micro_rows, micro_weights) in enumerate(micro_batches):
            input_ids, attention_mask, prompt_length, completion_mask = micro_batch(sequences,
                                                                                    micro_rows)
            logp, entropy = parts.token_logprobs(model, input_ids, attention_mask, prompt_length,
                                                 completion_mask, cfg.temperature,
                                                 with_entropy=epoch == 0)           # (b, T) each
            old_logp = old[k] if old else logp.detach()
            loss, clipped, kl = policy_loss(logp, old_logp, advantages[micro_rows],
                                            completion_mask, micro_weights[:, :logp.shape[1]],
                                            cfg, reference[k] if reference else None)
            loss.backward()  # into the fp32 master gradients (move_gradient)
            if k >= real:
                continue
            sums["loss"] += loss.detach() / cfg.ppo_epochs
            sums["clipped"] += clipped
            sums["kl"] += kl
            sums["entropy"] += 0.0 if entropy is None else (entropy * completion_mask).sum()
            bar.update()
        sums["grad_norm"] += parts.optimizer_step(policy, cfg) / cfg.ppo_epochs
    bar.close()
    return dict({name: float(value) for name, value in sums.items()},  # one device sync, here
                tokens=int(sequences.completion_mask[rows].sum()))


def micro_batch(sequences, rows):
    """The rows without the columns that are padding in all of them: less work, the same sums."""
    attention = sequences.attention_mask[rows]
    start = int(attention[:, :sequences.prompt_length].argmax(1).min())
    end = sequences.prompt_length + int(sequences.lengths[rows].max())
    completion_mask = sequences.completion_mask[rows, :end - sequences.prompt_length]
    input_ids, prompt_length = sequences.input_ids[rows, start:end], sequences.prompt_length - start
    return input_ids, attention[:, start:end], prompt_length, completion_mask


@torch.no_grad()
def no_grad_logprobs(model, sequences, micro_batches, cfg, parts):
    """log pi_old (the policy before this step's updates) or log pi_ref (the frozen reference) of
    every micro-batch: one pass without gradient."""
    return [parts.token_logprobs(model, *micro_batch(sequences, rows), cfg.temperature,
                                 with_entropy=False)[0] for rows, _ in micro_batches]


def optimizer_step(policy, cfg):
    """Clip the gradient's norm, step AdamW on the master weights, copy them into the model.
    Returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.master, cfg.max_grad_norm)
    policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, m in zip([p for p in policy.model.parameters() if p.requires_grad], policy.master):
            if p is not m:
                p.copy_(m)
    return grad_norm


def step_metrics(step, rollout, trained, update, seconds, cfg, world):
    """The step's line of metrics.jsonl: each number summed over the processes' shares of the
    step, then divided by what it is a mean of."""
    rewards, drafts, G = rollout.rewards, rollout.draft_rewards, rollout.per_group
    lengths = rollout.sequences.lengths                                         # (B*G,)
    sums = dict(update, completions=len(lengths), length=lengths.sum(), generated=lengths.sum(),
                reward=rewards.total.sum(), accuracy=rewards.accuracy.sum(),
                format_reward=rewards.format.sum(), dropped_groups=(~trained).sum() // G,
                judge_unparsed=rewards.judge_unparsed, drafts=0, draft_reward=0.0,
                best_draft_reward=0.0, problems=len(lengths) // G)
    if drafts is not None:
        sums.update(drafts=len(drafts.total), draft_reward=drafts.total.sum(),
                    best_draft_reward=drafts.total.view(-1, cfg.num_drafts).amax(1).sum(),
                    judge_unparsed=rewards.judge_unparsed + drafts.judge_unparsed,
                    generated=lengths.sum() + rollout.drafts.lengths.sum())
    grad_norm = sums.pop("grad_norm")  # the whole step's already, on every process
    s = dict(zip(sums, world.sum(*sums.values())))
    per_token = max(s["tokens"], 1) * cfg.ppo_epochs  # clips and KL terms: one per token and epoch
    return dict(
        step=step, reward=s["reward"] / s["completions"], accuracy=s["accuracy"] / s["completions"],
        draft_reward=s["draft_reward"] / s["drafts"] if s["drafts"] else None,
        best_draft_reward=s["best_draft_reward"] / s["problems"] if s["drafts"] else None,
        loss=s["loss"], clip_frac=s["clipped"] / per_token,
        kl=s["kl"] / per_token if cfg.beta > 0 else None,
        entropy=s["entropy"] / s["tokens"] if s["tokens"] else None, grad_norm=grad_norm,
        format_reward=s["format_reward"] / s["completions"],
        completion_tokens=int(s["generated"]),
        mean_completion_length=s["length"] / s["completions"],
        dropped_groups=int(s["dropped_groups"]), judge_unparsed=int(s["judge_unparsed"]),
        step_seconds=seconds, tokens_per_second=s["generated"] / seconds)


# ----------------------------------------------------------------------------------------------
# The parts of a run: every call of the loop and the step that a companion (scale.py) or a fork may
# do its own way, with this file's own as the defaults. train(cfg, parts) calls them and nothing
# else that could change, so a reader of this file sees every point at which a run can differ.
#     igrpo.train(cfg, igrpo.Parts(sample=my_sampler))       # same signature as sample()
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """The processes that train together: this one alone, or torchrun's (scale.py). Each samples,
    scores and trains on its share of a step's problems; rank 0 alone writes files."""
    rank: int = 0
    size: int = 1
    sum: Callable = lambda *values: tuple(map(float, values))  # each number, over the processes
    gather: Callable = lambda value: [value]  # every process's value, by rank (a barrier too)


@dataclass(frozen=True)
class Parts:
    load_policy: Callable = load_policy  # LoRA puts adapters on it; FSDP2 shards it over processes
    make_optimizer: Callable = master_weights_and_optimizer  # FSDP2: the fp32 shards are masters
    sample: Callable = sample  # compiled decoding; FSDP2 gathers the weights once per call
    token_logprobs: Callable = token_logprobs  # memory-lean: no (tokens x vocabulary) tensor
    optimizer_step: Callable = optimizer_step  # skip an update whose gradient norm is not finite
    save_model: Callable = lambda model, folder: model.save_pretrained(folder)  # LoRA: its adapter
    save_optimizer: Callable = save_optimizer  # FSDP2: each process writes its shard of the state
    load_optimizer: Callable = load_optimizer  # FSDP2: resharded over this run's processes
    # --reward judge: (problems, golds, completions) -> a score in [0, 1] or None for each; by
    # default judge.py's, from --judge-model or --judge-url
    judge: Callable = None
    # functions of each step's record: a warning, or why the run must stop (with a checkpoint)
    watches: tuple = ()
    world: World = World()


# ----------------------------------------------------------------------------------------------
# The loop: each step samples its problems' groups (Stage 1 + Stage 2 for iGRPO), computes A_j,
# and takes one update; held-out accuracy is single-pass from q alone, as at the paper's test time.
# ----------------------------------------------------------------------------------------------
def train(cfg, parts=Parts()):
    """Train cfg.model on cfg.dataset; returns held-out accuracy {"eval_before", "eval_after"} (or
    {} without --eval-dataset). A second Ctrl-C, or a disk that fills, ends it with one line."""
    out, world = Path(cfg.output_dir), parts.world
    with explained_stops(cfg, world):
        check_config(cfg, parts.judge)
        resume_from = resume_point(cfg)  # only reads: nothing changes before all has loaded
        problems, held_out, policy, parts = set_up(cfg, parts, resume_from)
        if resume_from:
            start, order = load_checkpoint(resume_from, policy, cfg, parts)
        else:
            start, order = start_run(cfg, world)
        with (open(out / "metrics.jsonl", "a") if world.rank == 0 else
              contextlib.nullcontext()) as metrics, tracking(cfg) as tracker:
            if held_out and start == 0:
                log_held_out(metrics, 0, policy, held_out, cfg, parts, tracker)
            with stop_requests() as requested:
                interrupted = run_steps(start, order, problems, held_out, policy, metrics, cfg,
                                        parts, tracker, requested)
            if not (resume_from and resume_from.name == "final"):  # first: a lost score is redone
                save(out / "final", policy, parts)
            if interrupted and held_out:
                tqdm.write(f"interrupted: {out / 'final'} is saved; --resume scores the held-out "
                           f"set, which is all that is left:\n  {resume_command(world)}")
                raise SystemExit(130)
            if held_out and not finished(out, cfg):
                log_held_out(metrics, cfg.steps, policy, held_out, cfg, parts, tracker)
    tqdm.write(f"metrics: {out / 'metrics.jsonl'}  model: {out / 'final'}")
    world.gather(None)  # every process reads the results once rank 0 has written them
    return held_out_results(out)


def set_up(cfg, parts, resume_from):
    """(training problems, held-out problems, the Policy, the parts with their judge): what the
    first step needs, each loaded and checked before the run folder changes."""
    seed(cfg, parts.world)
    problems, held_out = load_data(cfg)  # before the model: a bad file fails in seconds
    device, dtype = device_and_dtype(cfg.dtype)
    if cfg.reward != "rule":  # an unreachable judge fails before the policy loads
        judge = companion("judge", f"--reward {cfg.reward}")
        own = parts.judge or judge.from_settings(cfg, device, dtype, load_model, sample)
        parts = dataclasses.replace(parts, judge=judge.checked(own),
                                    watches=parts.watches + (judge.silence_watch(cfg),))
    model, tokenizer, reference = parts.load_policy(cfg, resume_from, device, dtype)
    context = max_positions(model)
    problems = short_enough(problems, tokenizer, cfg, context, "dataset")
    held_out = held_out and short_enough(held_out, tokenizer, cfg, context, "eval-dataset")
    master, optimizer = parts.make_optimizer(model, cfg)
    return problems, held_out, Policy(model, tokenizer, optimizer, master, reference), parts


def run_steps(start, order, problems, held_out, policy, metrics, cfg, parts, tracker, requested):
    """Steps start+1 .. cfg.steps, each logged, with checkpoints every --save-every steps and
    wherever the run must stop. Returns whether a Ctrl-C asked to stop after the last step."""
    world, out, interrupted = parts.world, Path(cfg.output_dir), False
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc=cfg.algo,
               dynamic_ncols=True, disable=world.rank != 0)
    for step in bar:
        batch, order = next_batch(problems, order, cfg)
        batch = batch[world.rank::world.size]  # this process's share
        record, rollout, advantages = training_step(step, batch, policy, cfg, parts)
        stop = [reason for reason in [watch(record) for watch in parts.watches] if reason]
        if world.rank == 0:
            write_metrics(metrics, record, tracker)
            if cfg.log_completions_every and step % cfg.log_completions_every == 0:
                log_completions(step, batch, rollout, advantages, cfg, tracker)
        bar.set_postfix(reward=f"{record['reward']:.2f}")
        if held_out and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            log_held_out(metrics, step, policy, held_out, cfg, parts, tracker)
        interrupted = world.sum(requested.is_set())[0] > 0  # every process stops at one step
        if stop or (step < cfg.steps and (interrupted or cfg.save_every and
                                          step % cfg.save_every == 0)):
            folder = save_checkpoint(out, step, policy, order, metrics, cfg, parts)
            if stop:
                fail(f"{'; '.join(stop)} (stopped with checkpoint {folder})")
            if interrupted:
                tqdm.write(f"interrupted after step {step}, checkpoint {folder}; continue with:\n"
                           f"  {resume_command(world)}")
                raise SystemExit(130)
    return interrupted  # on the last step: decided alike on every process


@contextlib.contextmanager
def stop_requests():
    """The first Ctrl-C (or SIGTERM) sets the event: the loop finishes its step, saves a checkpoint
    and stops. A second Ctrl-C stops at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main one
        yield requested
        return

    def on_signal(*_):
        requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Ctrl-C or SIGTERM: finishing this step, then saving a checkpoint (a second "
                   "Ctrl-C: quit at once)")
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def explained_stops(cfg, world):
    """A second Ctrl-C, a full disk or a folder that turned unwritable: one line saying what is
    still safe in the run folder, never a promise of a resume that cannot happen."""
    out = Path(cfg.output_dir)
    try:
        yield
    except KeyboardInterrupt:
        fail(f"interrupted, no checkpoint written now; {what_resumes(out, world)}")
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                               errno.EROFS):  # not the disk or the folder: not explained here
            raise
        fail(f"writing {error.filename or out} failed ({error.strerror or error}): free space or "
             f"fix permissions; {what_resumes(out, world)}")


def what_resumes(out, world):
    """What --resume would go on from in this run folder, and the command; or that nothing would."""
    newest = (out / "final") if (out / "final").is_dir() else resumable(out)
    if newest is None and holds_run(out):  # steps logged, none saved: --save-every 0
        return "nothing to resume from: --overwrite starts the run again"
    if newest is None:
        return "nothing to resume from: the same command starts again"
    return f"--resume goes on from {newest}, which is complete:\n  {resume_command(world)}"


def resume_command(world):
    args = [arg for arg in sys.argv[1:] if arg not in ("--resume", "--overwrite")]
    launcher = ["torchrun", f"--nproc-per-node={world.size}"] if world.size > 1 else ["python"]
    return shlex.join([*launcher, sys.argv[0], *args, "--resume"])


def seed(cfg, world):
    random.seed(cfg.seed)  # the problem order: the same on every process
    torch.manual_seed(cfg.seed + world.rank)  # the samples: each process its own


def next_batch(problems, order, cfg):
    """(this step's problems, the order left): epochs over the shuffled problems."""
    while len(order) < cfg.prompts_per_step:
        order = order + random.sample(range(len(problems)), len(problems))
    return [problems[i] for i in order[:cfg.prompts_per_step]], order[cfg.prompts_per_step:]


def load_data(cfg):
    """(training problems, held-out problems or [])."""
    if not cfg.dataset:
        fail("--dataset: give a dataset to train on (`python toy.py` trains the offline toy world)")
    held_out = []
    if cfg.eval_dataset:
        held_out = load_problems(cfg.eval_dataset, cfg, "eval-dataset", cfg.eval_limit,
                                 cfg.eval_split)
    return load_problems(cfg.dataset, cfg), held_out


@torch.no_grad()
def held_out_accuracy(model, tokenizer, problems, cfg, parts=Parts(), label="held-out"):
    """Single-pass accuracy from q alone (no drafts at test time), eval_samples samples each; each
    process scores its share."""
    world = parts.world
    share = problems[world.rank::world.size]  # may be empty: the process samples nothing
    prompts = [build_prompt(tokenizer, p["problem"], cfg) for p in share]
    cuda = [torch.cuda.current_device()] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # scoring never changes what training samples next
        texts = parts.sample(model, tokenizer, prompts, cfg, per_prompt=cfg.eval_samples,
                             progress=label, temperature=cfg.eval_temperature,
                             top_p=cfg.eval_top_p).texts
    correct = sum(map(math_reward, texts, repeat([p["answer"] for p in share], cfg.eval_samples)))
    return world.sum(correct)[0] / (len(problems) * cfg.eval_samples)


def log_held_out(metrics, step, policy, problems, cfg, parts, tracker=None):
    accuracy = held_out_accuracy(policy.model, policy.tokenizer, problems, cfg, parts)
    if parts.world.rank == 0:
        tqdm.write(f"held-out accuracy after {step} step{'s' * (step != 1)}: {accuracy:.1%} "
                   f"({len(problems)} problems)")
        write_metrics(metrics, dict(step=step, eval_accuracy=accuracy), tracker)


def write_metrics(file, record, tracker=None):
    """One JSON object per line, flushed, so a plot can follow a live run; NaN and inf are null.
    The tracker (--track) gets the same numbers at the same step."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in record.items()}
    file.write(json.dumps(record, allow_nan=False) + "\n")
    file.flush()
    tracker and tracker.log(record)


def log_completions(step, batch, rollout, advantages, cfg, tracker=None, shown=3, cut=600):
    """What the model wrote: the first `shown` problems of the step, each with its refinements (or
    GRPO's group), their rewards and advantages, and for iGRPO its drafts and the best one, as
    lines of completions.jsonl. A text over `cut` characters keeps its start and end."""
    def short(text):
        return text if len(text) <= cut else f"{text[:cut // 2]} [...] {text[-cut // 2:]}"
    G, N, rows = rollout.per_group, cfg.num_drafts, []
    texts, rewards = rollout.sequences.texts, rollout.rewards.total
    for i, problem in enumerate(batch[:shown]):
        row = dict(step=step, problem=short(problem["problem"]), gold=problem["answer"])
        if rollout.drafts is not None:
            drafts = zip(rollout.drafts.texts[i * N:(i + 1) * N],
                         rollout.draft_rewards.total[i * N:(i + 1) * N].tolist())
            row.update(drafts=[dict(text=short(text), reward=reward) for text, reward in drafts],
                       best_draft=short(rollout.best_drafts[i]))
        row["refinements" if rollout.drafts is not None else "group"] = [
            dict(text=short(texts[j]), reward=rewards[j].item(), advantage=advantages[j].item())
            for j in range(i * G, (i + 1) * G)]
        rows.append(row)
    with open(Path(cfg.output_dir) / "completions.jsonl", "a") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    tracker and tracker.log_completions(step, rows)


def tracking(cfg):
    """--track: track.py's tracker, closed however the run ends (--track none: None)."""
    if cfg.track == "none":
        return contextlib.nullcontext()
    name = cfg.run_name or Path(cfg.output_dir).resolve().name
    return companion("track", f"--track {cfg.track}").tracking(
        cfg.track, name, dataclasses.asdict(cfg), cfg.output_dir)


def held_out_results(out):
    """{"eval_before": the first held-out accuracy logged, "eval_after": the last} (or {})."""
    scores = [row["eval_accuracy"] for row in read_metrics(out) if "eval_accuracy" in row]
    return dict(eval_before=scores[0], eval_after=scores[-1]) if scores else {}


def read_metrics(out):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume. One run per folder: args.json (its settings), metrics.jsonl (a line per
# step, and a line {step, eval_accuracy} per held-out score), step-N/ every --save-every steps and
# on a Ctrl-C (the model, and trainer_state.pt: master weights, AdamW's moments, data order,
# random states), final/ (the model). --resume goes on from the newest, and ends where an unbroken
# run would. A folder holds a run once a step is logged or a model saved; until then it is free.
# ----------------------------------------------------------------------------------------------
CHECKPOINT = re.compile(r"step-(\d+)")


def resume_point(cfg):
    """The checkpoint --resume goes on from (None for a new run), after checking, without changing
    anything, that the folder holds this run (--resume) or none (unless --overwrite)."""
    out = Path(cfg.output_dir)
    nearest = next(folder for folder in [out, *out.parents] if folder.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK):
        fail(f"--output-dir {out}: cannot write there ({nearest} is "
             f"{'not a folder' if not nearest.is_dir() else 'not writable'})")
    if not cfg.resume:
        if holds_run(out) and not cfg.overwrite:
            what = "a finished run:" if finished(out, cfg) else \
                "a run: add --resume to continue it,"
            fail(f"--output-dir {out} already holds {what} --overwrite to replace it, or choose "
                 "another --output-dir")
        return None
    check_resumable(out, cfg)
    if (out / "final").is_dir():
        return out / "final"
    newest = resumable(out)
    if newest is None:
        fail(f"--resume: no checkpoint in {out} (one is written every --save-every steps, and on "
             "Ctrl-C)")
    if not (newest / "config.json").is_file() and not (newest / "adapter_config.json").is_file():
        fail(f"--resume: {newest} has no model weights (damaged?); delete it to resume from "
             "the checkpoint before it")
    return newest


def holds_run(out):
    """A logged step, a checkpoint or a final model: what a new run must not mix with."""
    logged = any("eval_accuracy" not in row for row in read_metrics(out))
    return logged or (out / "final").is_dir() or (out.is_dir() and bool(checkpoints(out)))


def resumable(out):
    """The newest step-N/ that holds a trainer state, else None."""
    found = [p for p in checkpoints(out) if (p / "trainer_state.pt").is_file()] \
        if out.is_dir() else []
    return found[-1] if found else None


def check_resumable(out, cfg):
    try:
        saved = json.loads((out / "args.json").read_text())
    except FileNotFoundError:
        fail(f"--resume: no run to resume in {out} (no args.json)")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        fail(f"--resume: {out / 'args.json'} is damaged ({first_line(error)}); start the run again "
             "with --overwrite")
    fields = dataclasses.fields(cfg)
    others = sorted(set(saved) - {f.name for f in fields})
    if others:  # e.g. scale.py's --lora-rank: that script must go on with it
        fail(f"--resume: the run in {out} was started by a script with other settings "
             f"({', '.join(map(flag, others))}): resume it with that script")
    changed = [f"{flag(f.name)} {saved.get(f.name, f.default)!r} -> {getattr(cfg, f.name)!r}"
               for f in fields if not f.metadata["resumable"]
               and saved.get(f.name, f.default) != getattr(cfg, f.name)]
    if changed:
        fail(f"--resume: settings differ from the run in {out}: {', '.join(changed)}; resume "
             "with its settings (args.json) or start a new run in another --output-dir")
    if finished(out, cfg):
        fail(f"--resume: the run in {out} already finished ({out / 'final'}); --overwrite "
             "replaces it, another --output-dir starts a new one")


def start_run(cfg, world):
    """A new run in --output-dir: what an earlier one wrote there deleted (the files and folders a
    run writes, no others), args.json written. Returns (first step, data order): (0, [])."""
    out = Path(cfg.output_dir)
    if world.rank == 0:
        for old in out.iterdir() if out.is_dir() else []:  # and unfinished .tmp copies
            name = old.name.removeprefix(".").removesuffix(".tmp")
            if old.is_dir() and (name in ("final", "final-merged") or CHECKPOINT.fullmatch(name)):
                shutil.rmtree(old)  # final-merged/: scale.py's, made from final/
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "completions.jsonl").unlink(missing_ok=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        except OSError as error:
            fail(f"--output-dir {out}: cannot write there ({error.strerror or error})")
    world.gather(None)  # the others wait for the folder
    return 0, []


def finished(out, cfg):
    """final/ is saved, and with a held-out set, its score logged (the last line)."""
    if not (out / "final").is_dir():
        return False
    rows = read_metrics(out) if cfg.eval_dataset else [dict(step=cfg.steps, eval_accuracy=0)]
    return bool(rows) and rows[-1]["step"] == cfg.steps and "eval_accuracy" in rows[-1]


def save(folder, policy, parts, trainer_state=None):
    """Written into a hidden temporary folder, renamed once complete: a kill mid-save never leaves a
    folder that looks like a checkpoint and is not. Files get umask modes (safetensors: 0600)."""
    folder, writer = Path(folder), parts.world.rank == 0
    temporary = folder.with_name(f".{folder.name}.tmp")
    try:
        if writer:
            shutil.rmtree(temporary, ignore_errors=True)
        parts.world.gather(None)  # every process writes into the new temporary folder
        parts.save_model(policy.model, temporary)  # on every process: a sharded model gathers
        if trainer_state is not None:
            parts.save_optimizer(policy, temporary)
        if writer:
            policy.tokenizer.save_pretrained(temporary)
            if trainer_state is not None:
                torch.save(trainer_state, temporary / "trainer_state.pt")
    except (OSError, RuntimeError) as error:  # torch.save says "iostream error" on a full disk
        if isinstance(error, torch.OutOfMemoryError):  # a RuntimeError too, not the disk's
            raise
        shutil.rmtree(temporary, ignore_errors=True)
        fail(f"saving {folder} failed ({first_line(error)}): free space or fix permissions; "
             f"{what_resumes(folder.parent, parts.world)}")
    if writer:
        umask = os.umask(0)
        os.umask(umask)
        for path in [temporary, *temporary.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        shutil.rmtree(folder, ignore_errors=True)
        temporary.rename(folder)
    parts.world.gather(None)  # no process goes on, or stops, before the folder is complete


TRAINER_STATE = ("step", "order", "rng", "metrics_bytes", "completions_bytes")


def save_checkpoint(out, step, policy, order, metrics, cfg, parts):
    """step-N/: the model as from_pretrained loads it, and trainer_state.pt with the rest of what
    an exact resume needs. Only the newest --keep-checkpoints stay."""
    completions = out / "completions.jsonl"
    rng = parts.world.gather(random_states())  # each process's, by rank
    state = dict(step=step, order=order, rng=rng, metrics_bytes=metrics and metrics.tell(),
                 completions_bytes=completions.stat().st_size if completions.is_file() else 0)
    save(out / f"step-{step}", policy, parts, state)
    if parts.world.rank == 0:
        for old in checkpoints(out)[:-cfg.keep_checkpoints] if cfg.keep_checkpoints else []:
            shutil.rmtree(old, ignore_errors=True)
    return out / f"step-{step}"


def checkpoints(out):
    """The step-N folders, oldest first; a folder named otherwise is the user's, never touched."""
    found = [(CHECKPOINT.fullmatch(p.name), p) for p in out.iterdir()]
    numbered = [(int(match[1]), p) for match, p in found if match]
    return [folder for _, folder in sorted(numbered)]


def random_states():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return dict(python=random.getstate(), torch=torch.get_rng_state(), cuda=cuda)


def load_checkpoint(folder, policy, cfg, parts):
    """(first step, data order) of a resumed run: what save_checkpoint wrote restored (the weights
    loaded with the model), metrics.jsonl cut back to it, so each step is logged once. The state is
    checked whole before any file changes. final/ holds no trainer state: its run has only held-out
    scoring left."""
    if folder.name == "final":
        return cfg.steps, []
    world, state = parts.world, read_trainer_state(folder)
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_size < state["metrics_bytes"]:
        fail(f"--resume: {metrics} is missing or shorter than when {folder} was saved")
    parts.load_optimizer(policy, folder, len(state["rng"]))  # checked: before any file changes
    if world.rank == 0:
        os.truncate(metrics, state["metrics_bytes"])
        if metrics.with_name("completions.jsonl").is_file():
            os.truncate(metrics.with_name("completions.jsonl"), state["completions_bytes"])
    rng = state["rng"]
    random.setstate(rng[0]["python"])  # the problem order: the same on every process
    if len(rng) == world.size:
        torch.set_rng_state(rng[world.rank]["torch"])
        if rng[world.rank]["cuda"] and torch.cuda.is_available():  # a GPU run may resume on a CPU
            torch.cuda.set_rng_state_all(rng[world.rank]["cuda"])
    else:  # saved by another number of processes: each share of the problems differs anyway
        torch.manual_seed(cfg.seed + world.rank + 1_000_003 * state["step"])
    world.rank == 0 and print(f"resuming from {folder}: step {state['step']} of {cfg.steps} done")
    return state["step"], state["order"]


def read_trainer_state(folder):
    """trainer_state.pt, with every part the resume reads; one line names what is damaged or
    missing."""
    path = folder / "trainer_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a cut or damaged file: torch's error types vary
        fail(f"--resume: {path} is damaged ({first_line(error)}); delete {folder} to resume from "
             "the checkpoint before it")
    rng = state.get("rng") if isinstance(state, dict) else None
    missing = sorted(set(TRAINER_STATE) - set(state)) if isinstance(state, dict) else ["all"]
    if not missing and not (isinstance(rng, list) and rng and all(
            isinstance(r, dict) and {"python", "torch", "cuda"} <= set(r) for r in rng)):
        missing = ["rng (each process's python, torch and cuda states)"]
    if missing:
        fail(f"--resume: {path} was written by another version of igrpo.py (it lacks "
             f"{', '.join(missing)}): resume with that version, or --overwrite")
    return state


# ----------------------------------------------------------------------------------------------
# The command line: every Config field is a --kebab-case flag, checked before anything loads
# ----------------------------------------------------------------------------------------------
def check_config(cfg, judge=None):
    """Each setting against its declared rule, then the rules between settings; a bad one stops the
    run with one line. judge: a judge function of one's own stands for --judge-model or -url."""
    for f in dataclasses.fields(cfg):
        value, rule = getattr(cfg, f.name), f.metadata["rule"]
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag(f.name)} {value}: must be a finite number")
        if rule and " | " in rule and value not in rule.split(" | "):
            fail(f"{flag(f.name)} {value!r}: choose one of {rule.replace(' | ', ', ')}")
        if rule and " | " not in rule and not obeys(value, rule):
            fail(f"{flag(f.name)} {value}: must be {rule}")
    if cfg.algo == "igrpo" and not 1 <= cfg.num_drafts < cfg.group_size - 1:
        fail(f"--num-drafts {cfg.num_drafts} with --group-size {cfg.group_size}: iGRPO needs at "
             "least 1 draft and 2 refinements (num_drafts <= group_size - 2)")
    if cfg.reward != "rule" and not (cfg.judge_model or cfg.judge_url or judge):
        fail(f"--reward {cfg.reward}: give --judge-model or --judge-url")
    if cfg.dataset and not cfg.model:
        fail(f"--dataset {cfg.dataset} needs --model (`python toy.py` trains the toy world)")
    if cfg.resume and cfg.overwrite:
        fail("--resume and --overwrite: choose one (continue the run, or replace it)")
    if cfg.reward != "rule":
        companion("judge", f"--reward {cfg.reward}")
    if cfg.track != "none":  # a missing package fails now, not after the model loads
        companion("track", f"--track {cfg.track}").require(cfg.track)


def obeys(value, rule):
    """Whether value keeps a bound: '>= 1', '> 0', 'in [0, 1)', 'in (0, 1]'."""
    if rule.startswith("in "):
        low, high = (float(bound) for bound in rule[4:-1].split(","))
        return (low <= value if rule[3] == "[" else low < value) and \
            (value <= high if rule[-1] == "]" else value < high)
    relation, bound = rule.split()
    return value >= float(bound) if relation == ">=" else value > float(bound)


def flag(name):
    return "--" + name.replace("_", "-")


def config_parser(config_class=Config, **options):
    """An argparse parser with a Config's fields as --kebab-case flags, defaults and help; no
    abbreviations, so a script can tell which flags were given."""
    parser = argparse.ArgumentParser(allow_abbrev=False, **options)
    for f in dataclasses.fields(config_class):
        add_flag(parser, f)
    return parser


def add_flag(parser, setting, name=None):
    """A Config field as a flag (--name, default: --field-name), with its default and help."""
    help, rule = setting.metadata["help"].replace("%", "%%"), setting.metadata["rule"]
    if rule or (setting.default not in ("", None) and "default" not in help):
        help += f" ({rule + '; ' if rule else ''}default: %(default)s)"
    kind = dict(type=type(setting.default))
    if isinstance(setting.default, bool):  # --flag / --no-flag
        kind = dict(action=argparse.BooleanOptionalAction)
    parser.add_argument(flag(name or setting.name), dest=name or setting.name,
                        default=setting.default, help=help, **kind)


def main(argv=None):
    parser = config_parser(description="GRPO and iGRPO for math reasoning in one file.")
    cfg = Config(**vars(parser.parse_args(argv)))
    check_config(cfg)  # "--dataset D needs --model" before the line below
    if not cfg.model:
        fail("--model: name a causal LM to train (`python toy.py` trains the offline toy world)")
    return train(cfg)



# Appendix. Answer checking: how a completion is graded (math_reward's answers_match)
# Helpers follow the function that calls them, as in the rest of the file. Model text is never
# evaluated: our own parser builds sympy objects from bounded input; each call has a 1-s limit.
#
# Grading policy. A false accept pays the policy for a wrong answer: a reading in doubt is wrong.
# - The answer: the last \boxed{}/\fbox{}, with the boxes before it on its line that only list
#   connectors, labels or one word before and/or separate (`\boxed{-2} and \boxed{1}`, `y_1 =
#   \boxed{a}, y_2 = \boxed{b}`, `\boxed{1} papers and \boxed{2}`, `\boxed{4} for part (a) and
#   \boxed{9}` are lists), unless a bare `\boxed 5` or MATH's "The final answer is 5. I hope it is
#   correct." follows it; else the last marker ("final answer is", "the answer is", "Answer:",
#   "####", <answer></answer>; **bold** off); else none: 0. A full-solution gold is read the same
#   way. An empty answer is no answer, even against an empty gold.
# - Cosmetics never matter: units (spaced, in \text/\mbox, or a known one glued on: 7days), \text,
#   \mathcal, spacing, \left/\right/\bigl, \dfrac, delimiters, degrees, percent, $ € £, case,
#   Unicode, a stray trailing backslash, a relation's spelling (>= \geqq ≥; != \ne). Digit groups
#   join (12,345 12{,}345 14 {, }916 12,\! 345 1\,000; Indian 1,\!00,\!000). `;`, "and", "or"
#   separate items like commas (1, 2, and 3). 0.\overline{3} is 1/3; a number word (zero to
#   ninety-nine) is its number; of `x \approx 0.7` only x counts.
# - Values match when exactly equal: rationals exactly, radicals/pi/e to 35 significant digits
#   (0.333 != 1/3, 3.14 != pi); expressions at three rational points, the same variables required.
#   In a trig function, degrees are angles: \cos(90^\circ - x) is \sin x.
# - Lists, sets ({4, 9} too) and a piecewise function's rows are unordered multisets; a \pm b is the
#   items a+b, a-b. Tuples, intervals and matrices are ordered (brackets must agree).
# - An inequality in one unknown, or in a function's value g(x), is that name labelled with its
#   interval: a<x<b is x=(a,b), -x>-1 is x=(-\infty,1), like x \in (-\infty,1).
# - A label names a value: k=1, f(x)=1, (p,q)=(3,2), a:b=3:5, \frac{AB}{CD}=..., |AB|=... match the
#   bare value on either side; labels on both sides must agree, but y and g(t) both name the
#   function. p=5, q=2; p=7, q=2 is the solutions (p, q) = (5, 2), (7, 2). Other equations match
#   side by side, or rearranged or scaled (2x+4y-3=0 and y=-x/2+3/4). What our parser rejects is
#   compared as text.
# Ambiguous readings, decided (each one is a row of the case table):
# - 7 3/4 is the mixed number 31/4, like 1\frac14; never 7 * 3/4. 7 5/4 and 7 3 read as nothing.
# - Multiple choice: the letters must agree, and the option texts where both sides give one; the
#   text alone also matches ((B) Carlos: B, Carlos). Words may precede the letter ("clearly B"),
#   a negation may not ("not B"); two letters are no answer.
# - Clock times: 14:05 = 14:05:00 = 2:05 PM; without AM/PM a time is on the 24-hour clock.
# - A numeral in a base (1203_5 = 1203_{5}) matches only as written, never across bases.
# - A comma between digit groups is a thousands separator only outside brackets: (1,234) and
#   (12,102) are pairs, 12,345 and f(x)=1,000 numbers; {,} ,\! \, join digits anywhere.
# - Bare values against values under different labels are in the labels' order (4, 5 for AB=4,
#   CD=5; 5, 4 is wrong); under one repeated label (x=2, x=3) they are an unordered solution list.
# - A single name on the left is a label even before an expression: 2x+3 matches y = 2x + 3.
# - An equation between two upper-case names (MR=SRMC) is a statement, not a labelled value.
# - Inequalities: the unknown is a label, so t<1 is not x<1 (a<d<c is not a<b<c) but both match
#   (-\infty,1); with a letter on each side (x>a) the left one is the unknown. 5!=120 is 5! = 120.
# - Boxes on different lines, or with other words between them, are not joined: the last box counts.
# ----------------------------------------------------------------------------------------------
MAX_ANSWER_CHARS = 300      # longer answers are compared as text only
MAX_DIGITS = 60             # longest number literal the parser accepts
MAX_RESULT_DIGITS = 400     # a power whose value would need more digits is not built
MAX_DEGREE = 10_000         # most total exponent on unknowns: values at sample points stay small


def answers_match(pred, gold):
    """True when a careful grader would accept `pred` for `gold`. Never raises; returns within ~1 s.
    Either side may be a full solution: its final answer is read as `extract_answer` reads it."""
    if pred is None or gold is None:
        return False
    try:
        with time_limit(1.0):
            # gold_answer (with the data): a full solution's final answer, else the text itself
            pred, gold = normalize(gold_answer(str(pred))), normalize(gold_answer(str(gold)))
            return bool(pred and gold) and match_normalized(pred, gold)  # empty is no answer
    except Exception:  # timeout, deep recursion, any sympy error: what we cannot grade is wrong
        return False


@contextlib.contextmanager
def time_limit(seconds):
    """A hard wall-clock bound on one call; off the main thread (no signals) input bounds do."""
    if threading.current_thread() != threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(*_):
        raise TimeoutError("grading took too long")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Which answer: the last box (with the boxes of the same list before it), else the last marker.
BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
BOX_CONNECTOR = re.compile(  # what may lie between the boxes of one list answer
    r"(?:[ \t$,;&~}]|\\[(),;!\[\] ]|\\q?quad|\\text\{|and|or|[a-zA-Z](?:_\{?\w+\}?)? *="  # y_2 =
    r"|[a-zA-Z]+ +(?:and|or)|for part \(\w\))*", re.IGNORECASE)  # "1 papers and 2 bins"
MARKER = re.compile(  # without a box, or after it where LATER_ANSWER finds one: the last of these
    r"<answer>(?P<tag>[^<]{1,400})</answer>"
    r"|final answer is:?\s*(?P<final>[^\n]{1,400}?)(?:\.?\s*I hope it is correct|\n|$)"
    r"|the answer is:?\s*(?P<answer_is>[^\n]{1,400})"
    r"|answer\**:\s*(?P<colon>[^\n]{1,400})"
    r"|####\s*(?P<hash>[^\n]{1,400})"
    r"|\\boxed\s+(?P<bare>[^\s$]{1,100})",
    re.IGNORECASE)
LATER_ANSWER = re.compile(  # after the last box, these override it: MARKER reads them
    r"\\boxed\s+[^\s{$]|final answer is[^\n]{1,400}I hope it is correct", re.IGNORECASE)


def extract_answer(text):
    """The final answer of a completion (or of a gold solution), or None."""
    text = text or ""
    closing_brace = closing_braces(text)
    boxes = [(box.start(), box.end(), closing_brace[box.end() - 1])  # (start, content start, end)
             for box in BOX.finditer(text) if box.end() - 1 in closing_brace]
    after = boxes[-1][2] if boxes else 0  # where the last box ends
    if boxes and not LATER_ANSWER.search(text, after):
        return final_boxes(text, boxes)
    markers = list(MARKER.finditer(text, after))
    if not markers:
        return None
    answer = next(found for found in markers[-1].groupdict().values() if found is not None)
    answer = re.sub(r"\.?\s*I hope it is correct.*", "", answer)
    answer = re.sub(r"^[\s$*\"]+|[\s$.*\"]+$", "", answer)  # "$\frac92$." -> "\frac92"; **5** -> 5
    if BOX.search(answer):  # a box that never closes: the completion was cut inside its answer
        return None
    # a marker inside the marked text points further: "Answer: The final answer is 5" -> "5"
    return (extract_answer(answer) if MARKER.search(answer) else None) or answer or None


def closing_braces(text):
    """{position of each '{': position of its '}'}; one pass, linear even for 20,000 "\\boxed{"."""
    closing, open_braces = {}, []
    for brace in re.finditer(r"[{}]", text):
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            closing[open_braces.pop()] = brace.start()
    return closing


def final_boxes(text, boxes):
    """The last box's content, with the boxes before it that only list connectors separate."""
    start, content_start, content_end = boxes[-1]  # start: where the answer found so far begins
    answers = [text[content_start:content_end].strip()]  # last first
    for previous_start, previous_content_start, previous_end in reversed(boxes[:-1]):
        if previous_end > start:  # a box around the answer: \boxed{\boxed{3}}
            start = previous_start
        elif start - previous_end <= 40 and BOX_CONNECTOR.fullmatch(text, previous_end + 1, start):
            answers.append(text[previous_content_start:previous_end].strip())
            start = previous_start
        else:
            break
    return ", ".join(reversed(answers))


# One spelling per answer, so that cosmetics never decide a grade.
UNICODE = str.maketrans({"−": "-", "π": "\\pi ", "√": "\\sqrt", "×": "\\times ", "·": "\\cdot ",
                         "∞": "\\infty ", "≤": "\\leq ", "≥": "\\geq ", "÷": "/", "≈": "\\approx ",
                         "≠": "\\neq ", "⩽": "\\leq ", "⩾": "\\geq "})
COSMETIC = [(re.compile(pattern), replacement) for pattern, replacement in [  # in order
    (r"\\(?:text|textbf|textrm|textit|textnormal|textsf|mathrm|mathbf|mathit|mathcal|mbox|hbox"
     r"|operatorname)\s*\{([^{}]*)\}", r" \1"),  # the space keeps a unit apart: 5\text{cm} -> 5 cm
    (r"\\(?:left|right|middle|displaystyle|textstyle|[Bb]igg?[lr]?)(?![a-zA-Z])", ""),
    (r"(?<!\\)\\[()\[\]]", ""),
    (r"\\!", ""), (r"(?<!\\)\\[,;: ]|\\q?quad|~", " "), (r"\\[dtc]frac", r"\\frac"),
    (r"\^\s*\{?\s*\\circ\s*\}?|°|\\%|%|\\\$|\$|€|£", ""),
    (r"\\le(?:qq?|qslant|slant)?(?![a-zA-Z])|<=", r"\\leq"),
    (r"\\ge(?:qq?|qslant|slant)?(?![a-zA-Z])|>=", r"\\geq"),
    (r"\\neq?(?![a-zA-Z])|(?<![\d!)}])!=", r"\\neq"),  # not in 5!=120: a factorial, then =
    (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\in(?![a-zA-Z])", "="),  # "x \in [1,4]" is the label x on [1,4]
    (r"\\approx[^,;]*", ""),  # the exact value before its approximation is the answer
    (r"_(?<=\d_)\{(\d+)\}", r"_\1"),  # 1203_{5} -> 1203_5 (a literal first: fast on long answers)
    (r"\s+", " ")]]
LIST_CONNECTOR = re.compile(r"\s*(?:;|(?<![a-zA-Z\\])(?:and|or)(?![a-zA-Z]))\s*", re.IGNORECASE)
VALUE = r"([^\s,;=]+(?: +[^\s,;=]+)*)"  # words a space apart: spaces read one way
PAIR = rf" *([a-zA-Z][\w{{}}]*) *= *{VALUE} *, *([a-zA-Z][\w{{}}]*) *= *{VALUE} *"  # p=5, q=2
REPEATING_DECIMAL = re.compile(r"(?<!\d)(\d{0,30})\.(\d{0,30})\\overline\s*\{(\d{1,30})\}")
TRIG = re.compile(r"\\(?:sin|cos|tan|sec|csc|cot)")
DEGREES = re.compile(r"(\d+(?:\.\d+)?)\s*(?:\^\s*\{?\s*\\circ\s*\}?|°)")


def normalize(answer):
    """One spelling per answer (the policy's cosmetics): the rules that follow compare meaning."""
    if not answer.isascii():  # full-width digits, −, π, √ (ASCII has no other spelling)
        answer = unicodedata.normalize("NFKC", answer).translate(UNICODE)
    answer = join_digit_groups(answer)
    if TRIG.search(answer):  # \cos(90^\circ - x): degrees inside a trig function are angles
        answer = DEGREES.sub(r"{\1\\pi/180}", answer)
    for pattern, replacement in COSMETIC:
        answer = pattern.sub(replacement, answer)
    if re.fullmatch(rf"{PAIR}(?:;{PAIR})+", answer):  # p=5, q=2; p=7, q=2: solutions of (p, q)
        answer = re.sub(rf"(?<![^;]){PAIR}", r"(\1, \3) = (\2, \4)", answer)
    answer = LIST_CONNECTOR.sub(", ", answer).replace(",,", ",")  # 1, 2, and 3
    answer = REPEATING_DECIMAL.sub(repeating_decimal_as_fraction, answer)
    answer = number_word_as_digits(answer.strip().rstrip(". \\"))  # a stray backslash: 5\\ -> 5
    if answer[:1] == "{" and "," in answer and closing_braces(answer).get(0) == len(answer) - 1:
        answer = "\\" + answer[:-1] + "\\}"  # {4, 9} is the set \{4, 9\}
    return answer


GROUP_MARK = r"(?: ?\{, ?\}|,\\!|\\,|\\ ) ?"  # a space may follow: 11,\! 111  14 {, }916
DIGIT_GROUP_MARK = re.compile(  # 12{,}345  1\,000, and Indian 2-digit groups: 1,\!00,\!000
    rf"(?<=\d){GROUP_MARK}(?=(?:\d\d{GROUP_MARK})*\d{{3}}(?!\d))")
THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?!\d)")                      # 12,345


def join_digit_groups(answer):
    """12{,}345 -> 12345 anywhere; 12,345 -> 12345 outside brackets (in them a comma separates)."""
    answer = DIGIT_GROUP_MARK.sub("", answer)
    without_commas = lambda found: found.group().replace(",", "")
    if not THOUSANDS.search(answer) or not re.search(r"[()\[\]]|\\[{}]", answer):
        return THOUSANDS.sub(without_commas, answer)  # nothing to join, or no brackets in the way
    depth, depth_at = 0, []  # bracket depth at each character: ( [ \{ open, ) ] \} close
    for index, char in enumerate(answer):
        counted = char in "()[]" or (char in "{}" and index > 0 and answer[index - 1] == "\\")
        depth += (char in "([{") - (char in ")]}") if counted else 0
        depth_at.append(depth)
    return THOUSANDS.sub(lambda found: found.group() if depth_at[found.start()] else
                         without_commas(found), answer)


def repeating_decimal_as_fraction(found):
    """1.2\\overline{34} -> \\frac{611}{495}, exactly."""
    whole, fixed, repeating = found.groups()
    denominator = 10 ** len(fixed) * (10 ** len(repeating) - 1)
    numerator = int(whole or 0) * denominator + int(fixed + repeating) - int(fixed or 0)
    return f"\\frac{{{numerator}}}{{{denominator}}}"


NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_word_as_digits(answer):
    """'twelve' -> '12', 'Forty-two' -> '42'; any other answer unchanged."""
    found = re.fullmatch(r"([a-z]+)(?:[- ]([a-z]+))?", answer.lower())
    word, units = found.groups() if found else (None, None)
    if units is None and word in NUMBER_WORDS:
        return str(NUMBER_WORDS.index(word))
    if word in TENS_WORDS and (units is None or units in NUMBER_WORDS[1:10]):
        return str(20 + 10 * TENS_WORDS.index(word) + (NUMBER_WORDS.index(units) if units else 0))
    return answer


# Comparing two normalized answers: the rules of the grading policy, in the order they apply.
CHOICE = re.compile(r"(?:(?!(?i:not|never|no) )[a-zA-Z][a-z]+ )*"  # "clearly B", never "not B"
                    r"\(? ?([A-E]) ?(?:\)|$|[.:] ) ?([^\s,(<>=][^(]*)?")  # (C), C, (B) Carlos
CLOCK = re.compile(r"(\d{1,2}):([0-5]\d)(?::([0-5]\d))?(?: ?([ap])\.? ?m\.?)?", re.IGNORECASE)
BASE_NUMERAL = re.compile(r"\d[0-9A-Za-z]*_\d+")  # 1203_5: digits in base 5


def match_normalized(pred, gold):
    compact = lambda answer: answer.replace(" ", "").lower()
    if compact(pred) == compact(gold):
        return True
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    pred, gold = (plus_minus_as_list(text) if "\\pm" in text else text for text in (pred, gold))
    gold_choice = CHOICE.fullmatch(gold)  # multiple choice: (C), C, \text{(C)}, (B) Carlos
    if gold_choice:
        pred_choice = CHOICE.fullmatch(pred)
        if not pred_choice:  # the option's text alone
            return bool(gold_choice[2]) and match_normalized(pred, gold_choice[2])
        texts = pred_choice[2], gold_choice[2]  # must agree where both sides give one
        return pred_choice[1] == gold_choice[1] and (not all(texts) or match_normalized(*texts))
    if clock_seconds(gold) is not None:
        return clock_seconds(pred) == clock_seconds(gold)
    pred, gold = inequality_as_interval(pred), inequality_as_interval(gold)
    pred_sides, gold_sides = split_top_level(pred, "="), split_top_level(gold, "=")
    if len(pred_sides) == 2 and len(gold_sides) == 2:
        return equations_match(pred_sides, gold_sides)
    pred_label, gold_label = split_label(pred), split_label(gold)
    if gold_label and len(pred_sides) == 1:
        return match_normalized(pred, gold_label[1])
    if pred_label and len(gold_sides) == 1:
        return match_normalized(pred_label[1], gold)  # "x = 5" for the value 5
    if len(pred_sides) == 2 or len(gold_sides) == 2:  # an equation against a value
        return False
    gold_items, pred_items = answer_items(gold), answer_items(pred)
    if gold_items or pred_items:
        return None not in (gold_items, pred_items) and items_match(pred_items, gold_items)
    values = parse_math(strip_units(pred, gold)), parse_math(strip_units(gold, pred))
    return None not in values and values_equal(*values)


def plus_minus_as_list(answer):
    """Item by item, a \\pm b is the two items a + b, a - b: '0, \\pm 3' -> '0, + 3, - 3'. (The set
    in x = \\{1 \\pm 2\\} is split once its label is off.)"""
    braced = answer.startswith("\\{") and answer.endswith("\\}")
    items = []
    for item in split_top_level(answer[2:-2] if braced else answer, ","):
        splits = item.count("\\pm") == 1 and "\\{" not in item
        items += [item.replace("\\pm", "+"), item.replace("\\pm", "-")] if splits else [item]
    return "\\{" + ", ".join(items) + "\\}" if braced else ", ".join(items)


def clock_seconds(answer):
    """'2:05 PM' and '14:05:00' -> 50700; None if not a clock time. No AM/PM: a 24-hour clock."""
    found = CLOCK.fullmatch(answer)
    if not found:
        return None
    hours, minutes, seconds, meridiem = found.groups()
    hours = int(hours) % 12 + 12 * (meridiem.lower() == "p") if meridiem else int(hours)
    return (hours * 60 + int(minutes)) * 60 + int(seconds or 0)


INEQUALITY = re.compile(r"(<|>|\\leq|\\geq)")
FLIPPED = {"<": ">", ">": "<", "\\leq": "\\geq", "\\geq": "\\leq"}


@functools.lru_cache(maxsize=4096)  # list items are compared pairwise: convert each once
def inequality_as_interval(answer):
    """a < x \\leq b -> 'x = (a, b]': an inequality in one unknown is the unknown on an interval."""
    parts = [part.strip() for part in INEQUALITY.split(answer)]
    if len(parts) == 5 and parts[1] in (">", "\\geq") and parts[3] in (">", "\\geq"):
        parts = [FLIPPED.get(part, part) for part in reversed(parts)]  # b > x > a -> a < x < b
    ascending = len(parts) == 5 and parts[1] in ("<", "\\leq") and parts[3] in ("<", "\\leq")
    if ascending and is_unknown(parts[2]):
        return f"{parts[2]} = {interval(parts[0], parts[1], parts[4], parts[3])}"
    one_sided = unknown_on_the_left(*parts) if len(parts) == 3 else None
    if one_sided is None:
        return answer
    unknown, relation, bound = one_sided  # x > 2 -> x = (2, \infty)
    if relation in ("<", "\\leq"):
        return f"{unknown} = " + interval("-\\infty", "<", bound, relation)
    return f"{unknown} = " + interval(bound, FLIPPED[relation], "\\infty", "<")


def is_unknown(text):
    """x, t, x_1, \\theta, and a function's value g(x); not \\pi, e or \\infty."""
    return bool(FUNCTION.fullmatch(text)) or isinstance(parse_math(text), sympy.Symbol)


def interval(low, low_relation, high, high_relation):
    """low < x <= high -> '(low, high]'."""
    return "(["[low_relation != "<"] + f"{low}, {high}" + ")]"[high_relation != "<"]


def unknown_on_the_left(left, relation, right):
    """'x < 3' -> ('x', '<', '3'); '5 \\geq x' -> ('x', '\\leq', '5');
    solved for the unknown: '-x > -1' -> ('x', '<', '1')."""
    if is_unknown(left):
        return left, relation, right
    if is_unknown(right):
        return right, FLIPPED[relation], left
    sides = parse_math(left), parse_math(right)
    difference = sides[0] - sides[1] if None not in sides else sympy.Integer(0)
    if len(difference.free_symbols) != 1:  # unreadable, or not in one unknown
        return None
    unknown = next(iter(difference.free_symbols))  # linear in it: slope * x + offset
    offset = difference.xreplace({unknown: 0})
    slope = difference.xreplace({unknown: 1}) - offset
    linear = values_equal(difference, slope * unknown + offset)  # x^2 < 4 is not
    if not (linear and (slope.is_positive or slope.is_negative)):
        return None
    relation = relation if slope.is_positive else FLIPPED[relation]
    return normalize(sympy.latex(unknown)), relation, normalize(sympy.latex(-offset / slope))


def split_top_level(text, separator):
    """'(1, 2), 3' split on ',' -> ['(1, 2)', '3']: a separator inside brackets does not split."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += 1 if char in "([{" else -1 if char in ")]}" else 0
        if depth == 0 and text.startswith(separator, index):
            parts.append(text[start:index])
            start = index + len(separator)
    return [part.strip() for part in parts + [text[start:]]]


def equations_match(pred_sides, gold_sides):
    """Side by side either way round, else rearranged or scaled; y = t^2-1 is g(t) = t^2-1."""
    names = {pred_sides[0], gold_sides[0]}
    if len(names) == 2 and "y" in names and all(FUNCTION.fullmatch(name) for name in names):
        return match_normalized(pred_sides[1], gold_sides[1])
    for sides in (pred_sides, pred_sides[::-1]):
        if all(map(match_normalized, sides, gold_sides)):
            return True
    sides = [parse_math(side) for side in pred_sides + gold_sides]
    return None not in sides and proportional(sides[0] - sides[1], sides[2] - sides[3])


def proportional(a, b):
    """a = c * b for one nonzero constant c: 2x+4y-3 and y+x/2-3/4 (c = 4). Unknowns required."""
    if not b.free_symbols or a.free_symbols != b.free_symbols:
        return False
    symbols = sorted(b.free_symbols, key=str)
    points = [sample_point(symbols, shift) for shift in range(len(SAMPLE_POINTS))]
    point = next((p for p in points if b.xreplace(p) != 0), None)  # x - 3/7 is 0 at the first point
    scale = a.xreplace(point) / b.xreplace(point) if point else sympy.zoo
    nonzero_constant = bool(scale.is_finite) and scale != 0
    return nonzero_constant and values_equal(a, scale * b, points=len(SAMPLE_POINTS))


NAME = r"\\?[a-zA-Z]+'*(?:_\{?\w+\}?)?"  # k, AB, x_1, a_{10}, \theta, f'
FUNCTION = re.compile(r"y|[a-zA-Z]'*(?:_\{?\w+\}?)?\( ?[a-zA-Z](?: ?, ?[a-zA-Z])* ?\)")  # g(t)
LABEL = re.compile(rf"(?:{NAME}|\|[A-Z]{{2,}}\|)(?:\([^()=]*\))?"  # k  f(x)  |AB| (not |x|)
                   rf"|\({NAME}(?:,{NAME})+\)"           # (p,q)
                   rf"|{NAME}(?::{NAME})+"               # a:b
                   rf"|\\frac\{{{NAME}\}}\{{{NAME}\}}")  # \frac{AB}{CD}


def split_label(answer):
    """'k = 1' -> ['k', '1']: a value under the name of what it is. None for anything else."""
    sides = split_top_level(answer, "=")
    if len(sides) != 2 or not LABEL.fullmatch(sides[0].replace(" ", "")):
        return None
    # MR=SRMC: an equation between two upper-case names is a statement, not a labelled value
    statement = re.fullmatch(r"[A-Z]{2,}", sides[0]) and re.fullmatch(r"[A-Z]{2,}", sides[1])
    return None if statement else sides


TABLE = re.compile(r"\\begin\{([pbv]?matrix|cases)\}(.*)\\end\{(?:[pbv]?matrix|cases)\}", re.S)


def answer_items(answer):
    """List, set, tuple, interval, matrix, cases -> (kind, brackets, items); a value -> None."""
    if answer.startswith("\\begin{"):
        return table_items(answer)
    if "\\cup" in answer:
        return ("set", "", split_top_level(answer, "\\cup"))
    if answer.startswith("\\{") and answer.endswith("\\}"):
        return ("set", "", split_top_level(answer[2:-2], ","))
    parts = split_top_level(answer, ",")
    bracketed = len(answer) > 1 and answer[0] in "([" and answer[-1] in ")]" and parts == [answer]
    inside = split_top_level(answer[1:-1], ",") if bracketed else []
    if len(inside) > 1:  # one bracket pair around several items: (1, 2), [0, 1)
        return ("tuple", answer[0] + answer[-1], inside)
    return ("set", "", parts) if len(parts) > 1 else None


def table_items(answer):
    """A matrix: the tuple of its rows, each a tuple '(1, 2)'. A piecewise function: the set of its
    rows '(value, condition)', in any order. Else None."""
    found = TABLE.fullmatch(answer)
    if not found:
        return None
    cell = lambda text: re.sub(r"^(?:if|for|when) |,$", "", text.strip()).strip()  # "x, & if x>0"
    rows = [f"({', '.join(map(cell, row.split('&')))})"
            for row in found.group(2).split("\\\\") if row.strip()]
    return ("set", "cases", rows) if found.group(1) == "cases" else ("tuple", "matrix", rows)


def items_match(pred, gold):
    (_, _, pred_list), (gold_kind, _, gold_list) = pred, gold
    if pred[:2] != gold[:2] or len(pred_list) != len(gold_list) or len(gold_list) > 30:
        return False  # (more than 30 items: compared pairwise, the work is bounded)
    gold_labels = [(split_label(item) or [None])[0] for item in gold_list]
    # values under different labels (AB=4, CD=5) are in the labels' order
    named_values = None not in gold_labels and len(set(gold_labels)) == len(gold_labels)
    if gold_kind == "tuple" or (named_values and not any(map(split_label, pred_list))):
        return all(map(match_normalized, pred_list, gold_list))
    unmatched = list(gold_list)  # unordered: each predicted item must use up one gold item
    for item in pred_list:
        hit = next((g for g in unmatched if match_normalized(item, g)), None)
        if hit is None:
            return False
        unmatched.remove(hit)
    return True


UNIT = re.compile(r"(.*?[\d}])(?: [a-zA-Z]+(?: [a-zA-Z]+)?|(?<=\d)(?=[a-z])(?:[ckm]m|kg|mg|ml|mph"
                  r"|ft|feet|(?:inche|mile|meter|day|hour|hr|min|minute|sec|second|week|month|year"
                  r"|unit|dollar|cent|degree)s?))(?:/[a-zA-Z]+)?(?:\^\{?\d\}?)?")  # 10 cm, 7days


def strip_units(answer, other):
    """'10 cm' -> '10': a spaced unit word (not the k of 2k), or a glued known one (7days), goes
    when the other side has no letters outside commands."""
    ends_in_unit = answer[-1:].isalpha() or "^" in answer[-4:]  # else skip the regex's scan
    found = UNIT.fullmatch(answer) if ends_in_unit else None
    other_has_words = re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", other))
    return found.group(1) if found and not other_has_words else answer


# Reading an answer as a sympy value, with our own parser: model text is never evaluated.
TOKEN = re.compile(r"\s*(?:(?<![/^])(\d{1,30} +\d{1,30}/\d{1,30})(?![\d.])"      # 7 3/4, mixed
                   r"|(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"  # 1.5 .5 3e-5
                   r"|\\([a-zA-Z]+)"                                             # \frac \pi
                   r"|([a-zA-Z])"                                                # x y
                   r"|(\*\*|[-+*/^()!{}\[\]_,'|]))")                             # symbols


@functools.lru_cache(maxsize=4096)  # list items are compared pairwise: parse each once
def parse_math(text):
    """An answer as a sympy value, built by our own recursive-descent parser; None if unreadable."""
    tokens = math_tokens(text.strip())
    if tokens is None or BASE_NUMERAL.fullmatch(text):  # 1203_5 is read as text: never across bases
        return None
    parser = MathParser(tokens)
    try:
        value = parser.expression()
    except (ValueError, ZeroDivisionError):
        return None
    return value if parser.index == len(tokens) and unknowns_degree(value) <= MAX_DEGREE else None


def math_tokens(text):
    """'2\\pi r' -> [('num', '2'), ('cmd', 'pi'), ('var', 'r')]; None if one is unreadable."""
    tokens, position = [], 0
    while position < len(text):
        found = TOKEN.match(text, position)
        if not found or found.end() == position:
            return None
        kind = ("mixed", "num", "cmd", "var", "sym")[found.lastindex - 1]  # TOKEN's groups
        tokens.append((kind, found.group(found.lastindex)))
        position = found.end()
    return tokens


def unknowns_degree(value):
    """Sum of the exponents on unknowns. (x+1)^{9999} twenty times: 199,980, too big to evaluate."""
    return sum(abs(power.exp) for power in value.atoms(sympy.Pow)
               if power.exp.is_Number and power.free_symbols)


GREEK = ("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu "
         "nu xi rho sigma tau upsilon phi varphi chi psi omega "
         "Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega").split()
FUNCTIONS = {f: getattr(sympy, f) for f in "sin cos tan sec csc cot sinh cosh exp log".split()}
FUNCTIONS.update(arcsin=sympy.asin, arccos=sympy.acos, arctan=sympy.atan, ln=sympy.log)


class MathParser:
    """Recursive descent over the tokens of one answer:
        expression := term (+|- term)*
        term       := unary ((*|/|implicit) unary)*
        unary      := -unary | power
        power      := factor (!)* (^ unary)?
        factor     := number | 7 3/4 | variable | (expression) | {expression} | \\frac | ..."""

    def __init__(self, tokens):
        self.tokens, self.index, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.index] if self.index < len(self.tokens) else (None, None)

    def take(self, kind=None, value=None):
        token = self.peek()
        if (kind and token[0] != kind) or (value and token[1] != value):
            raise ValueError(f"expected {value or kind}")
        self.index += 1
        return token

    def accept(self, *tokens):
        """Take the next token if it is one of `tokens` (and return it)."""
        return self.take() if self.peek() in tokens else None

    def expression(self):
        self.depth += 1
        if self.depth > 40:  # far below Python's recursion limit
            raise ValueError("nested too deeply")
        value = self.term()
        while self.peek() in (("sym", "+"), ("sym", "-")):
            value = value + self.term() if self.take()[1] == "+" else value - self.term()
        self.depth -= 1
        return value

    def term(self):
        value = self.unary()
        while True:
            kind, token = self.peek()
            if self.accept(("sym", "*"), ("cmd", "cdot"), ("cmd", "times")):
                value = value * self.unary()
            elif self.accept(("sym", "/"), ("cmd", "div")):
                value = value / self.unary()
            elif (kind in ("num", "mixed", "var") or (kind == "sym" and token in "({")
                    or (kind == "cmd" and token not in ("cdot", "times", "div"))):  # 2x, 3\pi
                previous = self.tokens[self.index - 1][0]
                if kind in ("num", "mixed") and previous in ("num", "mixed"):  # 7 3 is no product
                    raise ValueError("two numbers side by side")
                # a whole number right before \frac is a mixed number: 1\frac14 = 5/4, -1\frac14
                mixed = isinstance(value, sympy.Integer) and token == "frac" and previous == "num"
                right = self.unary()
                if mixed and right.is_Rational:
                    value = value + right if value >= 0 else value - right
                else:
                    value = value * right
            else:
                return value

    def unary(self):
        if self.peek() in (("sym", "-"), ("sym", "+")):
            return -self.unary() if self.take()[1] == "-" else self.unary()
        return self.power()

    def power(self):
        base = self.factor()
        while self.accept(("sym", "!")):
            if not (base.is_Integer and 0 <= base <= 200):
                raise ValueError("factorial out of range")
            base = sympy.factorial(base)
        if self.accept(("sym", "^"), ("sym", "**")):
            return safe_power(base, self.unary())
        return base

    def group(self):
        kind, token = self.peek()
        if kind == "num" and "." not in token and len(token) > 1:  # \frac12: single-digit arguments
            self.tokens[self.index] = ("num", token[1:])
            return sympy.Integer(token[0])
        return self.factor()

    def factor(self):
        kind, token = self.take()
        if kind == "num":
            return exact_number(token)
        if kind == "mixed":  # 7 3/4 is 31/4, never 7 * 3/4; 7 5/4 is no mixed number
            whole, numerator, denominator = map(exact_number, re.split(r" +|/", token))
            if not 0 < numerator < denominator:
                raise ValueError("not a mixed number")
            return whole + numerator / denominator
        if kind == "var":
            name = self.subscripted(token)
            return {"i": sympy.I, "e": sympy.E}.get(name, sympy.Symbol(name))
        if kind == "sym" and token in "([{|":
            value = self.expression()
            self.take("sym", {"(": ")", "[": "]", "{": "}", "|": "|"}[token])
            return sympy.Abs(value) if token == "|" else value
        if kind == "cmd":
            return self.command(token)
        raise ValueError(f"unsupported {token!r}")

    def command(self, name):
        """\\frac, \\sqrt, \\pi, \\infty, a Greek letter or one of FUNCTIONS."""
        if name == "frac":
            return self.group() / self.group()
        if name == "sqrt":
            degree = self.factor() if self.peek() == ("sym", "[") else sympy.Integer(2)  # \sqrt[3]
            return safe_power(self.group(), 1 / degree)
        if name in ("pi", "infty"):
            return {"pi": sympy.pi, "infty": sympy.oo}[name]
        if name in GREEK:
            return sympy.Symbol(self.subscripted(name))
        if name in FUNCTIONS:
            exponent = self.group() if self.accept(("sym", "^")) else None  # \sin^2 x
            value = FUNCTIONS[name](self.power())
            return value if exponent is None else safe_power(value, exponent)
        raise ValueError(f"unsupported {name!r}")

    def subscripted(self, name):
        """x_1, a_{10}, \\theta_0: the subscript is part of the unknown's name."""
        if self.accept(("sym", "_")):
            name += "_" + str(self.group())
        return name


def exact_number(token):
    """'3.2e-5' -> 1/31250, exactly; bounded in digits and exponent."""
    if len(token) > MAX_DIGITS:
        raise ValueError("number too long")
    mantissa, _, exponent = token.lower().partition("e")
    if abs(int(exponent or 0)) > MAX_RESULT_DIGITS:
        raise ValueError("exponent too large")
    return sympy.Rational(mantissa) * sympy.Integer(10) ** int(exponent or 0)


def safe_power(base, exponent):
    """Refuse powers whose value would be astronomically large, e.g. 9^9^9^9 or 10^{10^{10}}."""
    size = exponent if exponent.free_symbols else sympy.N(exponent, 15)  # 10^{\sqrt{13}/6} too
    if size.is_Number:
        scale = abs(math.log10(abs(complex(base))) + 1) if base.is_Number and base != 0 else 0
        if abs(size) > 10_000 or abs(size) * scale > MAX_RESULT_DIGITS:  # the value's digits, about
            raise ValueError("power too large")
    elif exponent.has(sympy.Pow) and base.is_Number:
        raise ValueError("power tower")
    return sympy.Pow(base, exponent)


# Equal values: exactly for rationals, to 35 digits otherwise, at sample points for expressions.
SAMPLE_POINTS = [sympy.Rational(p, q)
                 for p, q in ((3, 7), (11, 13), (-5, 17), (19, 23), (2, 29), (-31, 37))]


def values_equal(pred, gold, points=3):
    """Rationals compare exactly; others to 35 digits, at `points` rational points if symbolic."""
    if pred.free_symbols != gold.free_symbols:  # a renamed variable is a different answer
        return False
    if not gold.free_symbols:
        return numbers_equal(pred, gold)
    symbols = sorted(gold.free_symbols, key=str)
    samples = [sample_point(symbols, shift) for shift in range(points)]
    return all(numbers_equal(pred.xreplace(point), gold.xreplace(point)) for point in samples)


def sample_point(symbols, shift):
    """A different value for each unknown (so x - y is not 0), moved along by `shift`."""
    count = len(SAMPLE_POINTS)
    return {symbol: SAMPLE_POINTS[(i + shift) % count] + shift for i, symbol in enumerate(symbols)}


def numbers_equal(a, b):
    if a == b:
        return True
    infinite = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)
    if (a.is_Rational and b.is_Rational) or a.has(*infinite) or b.has(*infinite):
        return False
    difference, size = sympy.N(a - b, 50), sympy.N(abs(a) + abs(b), 50)
    return bool(abs(difference) <= size * sympy.Float("1e-35", 50))


if __name__ == "__main__":
    main()
