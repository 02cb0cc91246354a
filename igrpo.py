"""
igrpo.py: GRPO and iGRPO (Iterative Group Relative Policy Optimization) for math reasoning, in one file.

Paper: "iGRPO: Self-Feedback-Driven LLM Reasoning", Hatamizadeh et al., arXiv:2602.09000 (2026).
GRPO samples a group of answers per problem and pushes up the ones that beat the group's average.
iGRPO adds one idea: first sample a few drafts, keep the best one, and let the model write its group
of answers *after reading that draft*. Only those refinements are trained on; at test time the
model answers in one pass, no drafts.

Read top to bottom: settings, data, prompts, answer checking and rewards, sampling, log-probs,
group-relative advantages, the clipped surrogate with KL penalty, the two-stage step, the loop, main.

    python igrpo.py                   # offline toy world: tiny model on CPU, about 5 minutes
    python igrpo.py --model Qwen/Qwen2.5-Math-1.5B --dataset DigitalLearningGmbH/MATH-lighteval --steps 500
"""
import argparse
import atexit
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import sympy
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# Settings: the paper's defaults, one flag each (--kebab-case)
# ----------------------------------------------------------------------------------------------
def setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    model: str = setting("", "Hugging Face causal LM (hub name or local folder); empty = the offline toy world")
    dataset: str = setting("", "hub dataset name or local .jsonl/.json/.parquet file of problems")
    dataset_config: str = setting("", "hub dataset config, e.g. 'main' for openai/gsm8k")
    split: str = setting("train", "dataset split to train on")
    problem_key: str = setting("", "column with the problem (default: the first of problem/question/prompt/query)")
    answer_key: str = setting("", "column with the gold answer or solution (default: answer/solution/...)")
    eval_dataset: str = setting("", "held-out problems scored before and after training (local file or hub name)")
    eval_limit: int = setting(200, "score at most this many held-out problems")
    eval_every: int = setting(0, "also score the held-out set every N steps (0: only before and after)")
    eval_samples: int = setting(1, "samples per held-out problem; accuracy is their mean (the paper's avg@k)")
    # the method
    algo: str = setting("igrpo", "igrpo (Stage-1 drafts, Stage-2 refinements) or grpo (the baseline)")
    loss: str = setting("grpo", "grpo | dr_grpo | dapo | gspo: how the surrogate is ratioed, clipped, averaged")
    group_size: int = setting(8, "completions generated per problem per step, both stages together")
    num_drafts: int = setting(4, "iGRPO Stage-1 drafts per problem; refinements = group_size - num_drafts")
    prompts_per_step: int = setting(8, "problems per update step")
    steps: int = setting(100, "update steps")
    lr: float = setting(1e-6, "peak learning rate")
    warmup_ratio: float = setting(0.1, "fraction of steps spent in linear warm-up")
    min_lr_ratio: float = setting(0.1, "floor of the cosine schedule, as a fraction of the peak")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    clip_eps_low: float = setting(0.0, "ratio clip below 1 (0: the loss's default, 0.2; gspo 3e-4)")
    clip_eps_high: float = setting(0.0, "ratio clip above 1 (0: the loss's default, 0.2; dapo 0.28; gspo 4e-4)")
    beta: float = setting(0.0, "weight of the k3 KL penalty to the frozen reference (paper: 0)")
    ppo_epochs: int = setting(1, "updates per sampled batch (1: the sampler is the policy, no old-logprob pass)")
    reward: str = setting("rule", "rule (answer checker) | judge (generative judge) | rule+judge (their mean)")
    judge_model: str = setting("", "judge LM (hub name or folder) for --reward judge")
    judge_url: str = setting("", "OpenAI-compatible endpoint (vLLM, SGLang) serving the judge instead")
    format_weight: float = setting(0.0, "weight of the format reward (final answer in \\boxed{} after reasoning)")
    overlong_buffer: int = setting(0, "DAPO soft overlong penalty over the last N tokens of the budget (0: off)")
    # sampling
    temperature: float = setting(0.7, "sampling temperature during training")
    top_p: float = setting(1.0, "nucleus sampling during training (log-probs ignore the cut below 1)")
    max_prompt_tokens: int = setting(1024, "longer problems are skipped")
    max_completion_tokens: int = setting(4096, "generation budget per completion")
    max_draft_tokens: int = setting(2048, "a longer best draft is cut from the front, keeping its end")
    eval_temperature: float = setting(0.6, "sampling temperature for held-out scoring")
    eval_top_p: float = setting(0.95, "nucleus sampling for held-out scoring")
    chat_template: str = setting("auto", "auto | on | off: wrap prompts in the tokenizer's chat template")
    # engineering
    micro_batch_size: int = setting(8, "sequences per forward/backward; sets peak memory")
    generation_batch_size: int = setting(256, "sequences per generate call")
    gradient_checkpointing: bool = setting(True, "recompute activations in backward to save memory")
    dtype: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32; master weights stay fp32")
    trust_remote_code: bool = setting(False, "allow model/tokenizer code from the hub")
    seed: int = setting(0, "random seed")
    output_dir: str = setting("runs/igrpo", "metrics.jsonl, args.json and checkpoints go here")
    save_every: int = setting(0, "also save a checkpoint every N steps (0: only the final one)")
    # scaling out (see "Scaling out" below; multi-GPU runs start with torchrun, no flag)
    lora_rank: int = setting(0, "train LoRA adapters of this rank on a frozen base (0: full fine-tuning)")
    lora_alpha: float = setting(32.0, "LoRA scale: adapters add (alpha / rank) * B A x")
    lora_targets: str = setting("all-linear", "modules given adapters: all-linear, or e.g. q_proj,v_proj")
    save_merged: bool = setting(False, "with --lora-rank: also save final-merged/, adapter merged in")


def fail(message):
    """Bad input stops the run before training with one line that names the problem."""
    raise SystemExit(f"igrpo: error: {message}")


def check_config(cfg):
    choices = dict(algo=("igrpo", "grpo"), loss=("grpo", "dr_grpo", "dapo", "gspo"),
                   reward=("rule", "judge", "rule+judge"), dtype=("auto", "bf16", "fp32"),
                   chat_template=("auto", "on", "off"))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            fail(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    if cfg.group_size < 2:
        fail(f"--group-size {cfg.group_size}: a group needs at least 2 completions")
    if cfg.algo == "igrpo" and not 1 <= cfg.num_drafts < cfg.group_size - 1:
        fail(f"--num-drafts {cfg.num_drafts} with --group-size {cfg.group_size}: iGRPO needs at least 1 draft "
             "and 2 refinements (num_drafts <= group_size - 2)")
    for name in ("steps", "prompts_per_step", "ppo_epochs", "eval_samples", "micro_batch_size", "generation_batch_size",
                 "max_completion_tokens", "max_draft_tokens", "max_prompt_tokens"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        fail(f"--temperature {cfg.temperature} --top-p {cfg.top_p}: training samples need temperature > 0 and "
             "0 < top-p <= 1 (log-probs are taken under softmax(logits / temperature))")
    if cfg.reward != "rule" and not (cfg.judge_model or cfg.judge_url):
        fail(f"--reward {cfg.reward}: give --judge-model or --judge-url")
    check_scaling_config(cfg)


# ----------------------------------------------------------------------------------------------
# Data: problems with gold answers, from a local file or the hub
# ----------------------------------------------------------------------------------------------
PROBLEM_KEYS = ("problem", "question", "prompt", "query", "input")
ANSWER_KEYS = ("answer", "solution", "final_answer", "target", "output")


def read_rows(name, config="", split="train", flag="dataset"):
    path = Path(name)
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            fail(f"--{flag}: no such file: {name}")
        if path.suffix == ".parquet":
            import datasets
            return list(datasets.Dataset.from_parquet(str(path)))
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = []
            for line_number, line in enumerate(text.splitlines(), 1):
                try:
                    rows.append(json.loads(line)) if line.strip() else None
                except json.JSONDecodeError as error:
                    fail(f"--{flag} {name}, line {line_number}: not valid JSON ({error.msg})")
            return rows
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            fail(f"--{flag} {name}: not valid JSON ({error})")
        return data if isinstance(data, list) else next((v for v in data.values() if isinstance(v, list)), [])
    try:
        import datasets
        return list(datasets.load_dataset(name, config or None, split=split))
    except Exception as error:  # the hub client raises many types; the user needs the name and the reason
        fail(f"--{flag} {name!r}: not a local file, and loading it from the Hugging Face hub failed "
             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")


def load_problems(name, cfg, flag="dataset", limit=None):
    """Rows -> [{"problem": str, "answer": str}], the gold answer extracted from a full solution if needed."""
    rows = read_rows(name, cfg.dataset_config, cfg.split, flag)
    if not rows:
        fail(f"--{flag} {name}: no rows")

    columns = set().union(*(row.keys() for row in rows if isinstance(row, dict)))

    def pick(given, candidates, what, option):
        found = given if given in columns else next((k for k in candidates if k in columns), None)
        if found is None:
            fail(f"--{flag} {name}: no {what} column among {sorted(columns)}; name it with --{option}")
        return found

    problem_key = pick(cfg.problem_key, PROBLEM_KEYS, "problem", "problem-key")
    answer_key = pick(cfg.answer_key, ANSWER_KEYS, "answer", "answer-key")
    problems = []
    for index, row in enumerate(rows[:limit]):
        if not isinstance(row, dict):
            fail(f"--{flag} {name}, row {index}: not an object with {problem_key!r} and {answer_key!r}")
        problem, raw = row.get(problem_key), row.get(answer_key)
        gold = gold_answer(str(raw)) if raw not in (None, "") else None
        if not problem or not gold:
            missing = problem_key if not problem else answer_key
            fail(f"--{flag} {name}, row {index}: empty or missing {missing!r}")
        problems.append({"problem": str(problem), "answer": gold})
    return problems


# ----------------------------------------------------------------------------------------------
# Prompts: the system prompt, and the Stage-2 prompt q' = q + best draft
# ----------------------------------------------------------------------------------------------
SYSTEM_PROMPT = (
    "You are a careful mathematician. Reason step by step, then give the final answer as \\boxed{answer}. "
    "If the message contains a previous draft, it is guidance, not ground truth: check it, fix its "
    "mistakes, fill its gaps, and write a strictly better complete solution instead of copying it.")
# The paper does not publish how the draft is introduced; this separator is ours.
REFINE_TEMPLATE = "{problem}\n\nPrevious draft (may contain mistakes):\n{draft}\n\nWrite an improved solution."
PLAIN_TEMPLATE = "{system}\n\nProblem: {user}\n\nSolution:"  # for base models without a chat template


def uses_chat_template(tokenizer, cfg):
    return cfg.chat_template == "on" or (cfg.chat_template == "auto" and bool(tokenizer.chat_template))


def build_prompt(tokenizer, user_message, cfg):
    if uses_chat_template(tokenizer, cfg):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_message}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(system=SYSTEM_PROMPT, user=user_message)


def cut_draft(tokenizer, draft, max_tokens):
    """A draft over budget loses its beginning: the end, where the final answer is, stays."""
    ids = tokenizer(draft, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[-max_tokens:]) if len(ids) > max_tokens else draft


def refine_message(problem, draft):
    return REFINE_TEMPLATE.format(problem=problem, draft=draft.strip())


# ----------------------------------------------------------------------------------------------
# Answer checking and rewards (never evaluates model text; every call is time-bounded)
#
# Grading policy. The final answer is the last \boxed{}/\fbox{}; else the last explicit marker
# ("final answer is", "the answer is", "Answer:", "####", <answer></answer>); else none, which
# scores 0. Cosmetics never matter (units, \text, spacing, \left/\right, \dfrac, degrees, percent,
# thousands separators, case, Unicode forms, a leading "x ="). Values match when exactly equal:
# rationals exactly, radicals/pi/e to 35 significant digits, so 0.333 != 1/3 and 3.14 != pi.
# Lists and sets are unordered multisets; tuples, intervals and matrices are ordered (interval ends'
# brackets must agree); expressions match when equal at three rational points (the same variables
# required); equations side by side. What our small parser does not accept is compared as text.
# ----------------------------------------------------------------------------------------------
MAX_ANSWER_CHARS = 300      # longer answers are compared as text only
MAX_DIGITS = 60             # longest number literal the parser accepts
MAX_RESULT_DIGITS = 400     # a power whose value would need more digits is not built

BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
CHOICE = re.compile(r"\(?([A-E])\)?")
MARKER = re.compile(
    r"<answer>(?P<tag>[^<]{1,400})</answer>|final answer is:?\s*(?P<final>[^\n]{1,400}?)(?:\.?\s*I hope it is"
    r" correct|\n|$)|the answer is:?\s*(?P<answer_is>[^\n]{1,400})|answer:\s*(?P<colon>[^\n]{1,400})"
    r"|####\s*(?P<hash>[^\n]{1,400})|\\boxed\s+(?P<bare>[^\s$]{1,100})", re.IGNORECASE)


def extract_answer(text):
    """The final answer of a completion (or of a gold solution), or None."""
    if not text:
        return None
    closing, stack = {}, []
    for match in re.finditer(r"[{}]", text):  # one pass pairs every brace: linear even for 20,000 "\boxed{"
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            closing[stack.pop()] = match.start()
    for match in reversed(list(BOX.finditer(text))):
        if match.end() - 1 in closing:
            return text[match.end():closing[match.end() - 1]].strip()
    markers = list(MARKER.finditer(text))
    if not markers:
        return None
    answer = next(v for v in markers[-1].groupdict().values() if v is not None)
    answer = re.sub(r"\.?\s*I hope it is correct.*", "", answer).strip().strip("$").rstrip(".").strip()
    return (extract_answer(answer) if MARKER.search(answer) else None) or answer or None


def gold_answer(raw):
    return extract_answer(raw) or raw.strip()


GREEK = ("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho "
         "sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega").split()
FUNCTIONS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc,
             "cot": sympy.cot, "ln": sympy.log, "log": sympy.log, "exp": sympy.exp, "arcsin": sympy.asin,
             "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh}
COSMETIC = [(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1"),
            (r"\\(?:left|right|displaystyle|big|Big|bigg|Bigg)(?![a-zA-Z])", ""), (r"\\!", ""), (r"(?<!\\)\\[,;: ]|\\q?quad|~", " "),
            (r"\\[dt]frac", r"\\frac"), (r"\^\s*\{?\s*\\circ\s*\}?|°|\\%|%|\\\$|\$", ""),
            (r"\{,\}", ","), (r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d])", lambda m: m.group(0).replace(",", "")),
            (r"\\le(?![a-zA-Z])", r"\\leq"), (r"\\ge(?![a-zA-Z])", r"\\geq"), (r"\s+", " ")]
UNICODE = {"−": "-", "π": "\\pi ", "√": "\\sqrt", "×": "\\times ", "·": "\\cdot ", "∞": "\\infty ",
           "≤": "\\leq ", "≥": "\\geq ", "÷": "/"}


def normalize(answer):
    answer = unicodedata.normalize("NFKC", answer)
    for symbol, latex in UNICODE.items():
        answer = answer.replace(symbol, latex)
    for pattern, replacement in COSMETIC:
        answer = re.sub(pattern, replacement, answer)
    return answer.strip().rstrip(".").strip()


def split_top_level(text, separator):
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += 1 if char in "([{" else -1 if char in ")]}" else 0
        if depth == 0 and text.startswith(separator, index):
            parts.append(text[start:index])
            start = index + len(separator)
    return [part.strip() for part in parts + [text[start:]]]


def answers_match(pred, gold):
    """True when a careful grader would accept `pred` for `gold`. Never raises, returns in about 1 s."""
    if pred is None or gold is None:
        return False
    try:
        with time_limit(1.0):
            return match_normalized(normalize(str(pred)), normalize(str(gold)))
    except Exception:  # TimeoutError, RecursionError, anything sympy throws: an answer we cannot grade is wrong
        return False


def math_reward(completion, gold):
    return 1.0 if answers_match(extract_answer(completion), gold) else 0.0


def format_reward(completion):
    """The paper's appendix rewards the expected layout: reasoning first, then one final boxed answer."""
    before, _, after = completion.partition("\\boxed{")
    return 1.0 if before.strip() and after and "\\boxed{" not in after else 0.0


def match_normalized(pred, gold):
    compact = lambda s: s.replace(" ", "").lower()
    if compact(pred) == compact(gold):
        return True
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    gold_choice = CHOICE.fullmatch(gold.replace(" ", ""))  # multiple choice: (C), C, \text{(C)}
    if gold_choice:
        found = CHOICE.fullmatch(pred.replace(" ", ""))
        return bool(found) and found.group(1) == gold_choice.group(1)
    pred_sides, gold_sides = split_top_level(pred, "="), split_top_level(gold, "=")
    if len(gold_sides) == 1 and len(pred_sides) == 2 and re.fullmatch(r"[a-zA-Z](_\{?\w+\}?)?", pred_sides[0]):
        return match_normalized(pred_sides[1], gold)  # "x = 5" for the value 5
    if len(gold_sides) == 2:  # equations match side by side, either way round
        return len(pred_sides) == 2 and (all(map(match_normalized, pred_sides, gold_sides)) or
                                         all(map(match_normalized, pred_sides[::-1], gold_sides)))
    if "\\begin{" in gold:
        pred_cells, gold_cells = matrix_cells(pred), matrix_cells(gold)
        return bool(pred_cells and gold_cells) and same_shape_cells_match(pred_cells, gold_cells)
    gold_items, pred_items = answer_items(gold), answer_items(pred)
    if gold_items or pred_items:
        return gold_items is not None and pred_items is not None and items_match(pred_items, gold_items)
    gold_value = parse_math(strip_units(gold, pred))
    pred_value = parse_math(strip_units(pred, gold))
    return gold_value is not None and pred_value is not None and values_equal(pred_value, gold_value)


def strip_units(answer, other):
    """'10 cm' -> '10' when the other side has no words at all (a spaced unit word, not '2k')."""
    found = re.fullmatch(r"(.*?\d)\s+[a-zA-Z]+( [a-zA-Z]+)?(/[a-zA-Z]+)?(\^\{?\d\}?)?", answer)
    return found.group(1) if found and not re.search(r"[a-zA-Z]", other) else answer


def answer_items(answer):
    """Lists, sets, tuples and intervals -> (kind, brackets, items); a single value -> None."""
    if answer.count("\\pm") == 1:  # a \pm b is the list a+b, a-b
        return ("set", "", [answer.replace("\\pm", "+"), answer.replace("\\pm", "-")])
    if "\\cup" in answer:
        return ("set", "", split_top_level(answer, "\\cup"))
    if answer.startswith("\\{") and answer.endswith("\\}"):
        return ("set", "", split_top_level(answer[2:-2], ","))
    parts = split_top_level(answer, ",")
    wrapped = len(answer) > 1 and answer[0] in "([" and answer[-1] in ")]" and \
        len(split_top_level(answer[1:-1], ",")) > 1 and split_top_level(answer, ",") == [answer]
    if wrapped:
        return ("tuple", answer[0] + answer[-1], split_top_level(answer[1:-1], ","))
    return ("set", "", parts) if len(parts) > 1 else None


def items_match(pred, gold):
    (pred_kind, pred_brackets, pred_list), (gold_kind, gold_brackets, gold_list) = pred, gold
    if pred_kind != gold_kind or pred_brackets != gold_brackets or len(pred_list) != len(gold_list):
        return False
    if len(gold_list) > 30:
        return False
    if gold_kind == "tuple":
        return all(map(match_normalized, pred_list, gold_list))
    unmatched = list(gold_list)  # unordered: each predicted item must use up one gold item
    for item in pred_list:
        hit = next((g for g in unmatched if match_normalized(item, g)), None)
        if hit is None:
            return False
        unmatched.remove(hit)
    return True


def matrix_cells(answer):
    found = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", answer.strip(), re.S)
    if not found:
        return None
    return [[cell.strip() for cell in row.split("&")] for row in found.group(1).split("\\\\") if row.strip()]


def same_shape_cells_match(pred_cells, gold_cells):
    return [len(r) for r in pred_cells] == [len(r) for r in gold_cells] and all(
        match_normalized(p, g) for pr, gr in zip(pred_cells, gold_cells) for p, g in zip(pr, gr))


TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|\\([a-zA-Z]+)|([a-zA-Z])"
                   r"|(\*\*|[-+*/^()!{}\[\]_,'|]))")


def parse_math(text):
    """Our own recursive-descent parser for the answers we accept, building sympy objects; else None."""
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        found = TOKEN.match(text, position)
        if not found or found.end() == position:
            return None
        number, command, letter, symbol = found.groups()
        tokens.append(("num", number) if number else ("cmd", command) if command else
                      ("var", letter) if letter else ("sym", symbol))
        position = found.end()
    parser = MathParser(tokens)
    try:
        value = parser.expression()
    except (ValueError, ZeroDivisionError):
        return None
    return value if parser.index == len(tokens) else None


class MathParser:
    """expression := term (+|- term)*; term := unary ((*|/|implicit) unary)*; unary := -unary | power;
    power := factor (^ unary)?; factor := number | variable | (expression) | {expression} | \\frac | \\sqrt | ..."""

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

    def expression(self):
        self.depth += 1
        if self.depth > 40:
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
            if (kind, token) in (("sym", "*"), ("cmd", "cdot"), ("cmd", "times")):
                self.take()
                value = value * self.unary()
            elif (kind, token) in (("sym", "/"), ("cmd", "div")):
                self.take()
                value = value / self.unary()
            elif kind in ("num", "var") or (kind == "sym" and token in "({") or \
                    (kind == "cmd" and token not in ("cdot", "times", "div")):
                mixed = isinstance(value, sympy.Integer) and token == "frac" and self.tokens[self.index - 1][0] == "num"
                right = self.unary()
                value = value + right if mixed and right.is_Rational else value * right  # 1\frac14 = 5/4
            else:
                return value

    def unary(self):
        if self.peek() in (("sym", "-"), ("sym", "+")):
            return -self.unary() if self.take()[1] == "-" else self.unary()
        return self.power()

    def power(self):
        base = self.factor()
        while self.peek() == ("sym", "!"):
            self.take()
            if not (base.is_Integer and 0 <= base <= 200):
                raise ValueError("factorial out of range")
            base = sympy.factorial(base)
        if self.peek() in (("sym", "^"), ("sym", "**")):
            self.take()
            return safe_power(base, self.unary())
        return base

    def group(self):
        kind, token = self.peek()
        if kind == "sym" and token == "{":
            self.take()
            value = self.expression()
            self.take("sym", "}")
            return value
        if kind == "num" and "." not in token and len(token) > 1:  # \frac12: single-digit arguments
            self.tokens[self.index] = ("num", token[1:])
            return sympy.Integer(token[0])
        return self.factor()

    def factor(self):
        kind, token = self.take()
        if kind == "num":
            if len(token) > MAX_DIGITS:
                raise ValueError("number too long")
            mantissa, _, exponent = token.lower().partition("e")  # 3.2e-5, exactly
            if abs(int(exponent or 0)) > MAX_RESULT_DIGITS:
                raise ValueError("exponent too large")
            return sympy.Rational(mantissa) * sympy.Integer(10) ** int(exponent or 0)
        if kind == "var":
            name = token
            if self.peek() == ("sym", "_"):
                self.take()
                name += "_" + str(self.group())
            return {"i": sympy.I, "e": sympy.E}.get(name, sympy.Symbol(name))
        if kind == "sym" and token in "([{|":
            value = self.expression()
            self.take("sym", {"(": ")", "[": "]", "{": "}", "|": "|"}[token])
            return sympy.Abs(value) if token == "|" else value
        if kind == "cmd":
            if token == "frac":
                return self.group() / self.group()
            if token == "sqrt":
                degree = sympy.Integer(2)
                if self.peek() == ("sym", "["):
                    self.take()
                    degree = self.expression()
                    self.take("sym", "]")
                return safe_power(self.group(), 1 / degree)
            if token == "pi":
                return sympy.pi
            if token == "infty":
                return sympy.oo
            if token in GREEK:
                name = token
                if self.peek() == ("sym", "_"):
                    self.take()
                    name += "_" + str(self.group())
                return sympy.Symbol(name)
            if token in FUNCTIONS:
                exponent = None
                if self.peek() == ("sym", "^"):
                    self.take()
                    exponent = self.group()
                value = FUNCTIONS[token](self.power())
                return safe_power(value, exponent) if exponent is not None else value
        raise ValueError(f"unsupported {token!r}")


def safe_power(base, exponent):
    """Refuse powers whose value would be astronomically large, e.g. 9^9^9^9 or 10^{10^{10}}."""
    if exponent.is_Number:
        if abs(exponent) > 10_000:
            raise ValueError("exponent too large")
        if base.is_Number and base != 0 and abs(exponent) * abs(math.log10(abs(complex(base))) + 1) > MAX_RESULT_DIGITS:
            raise ValueError("power too large")
    elif exponent.has(sympy.Pow) and base.is_Number:
        raise ValueError("power tower")
    return sympy.Pow(base, exponent)


SAMPLE_POINTS = [sympy.Rational(p, q) for p, q in ((3, 7), (11, 13), (-5, 17), (19, 23), (2, 29), (-31, 37))]


def values_equal(pred, gold):
    """Exact rationals compare exactly; anything else to 40 digits, at three rational points if symbolic."""
    if pred.free_symbols != gold.free_symbols:  # a renamed variable is a different answer
        return False
    if not gold.free_symbols:
        return numbers_equal(pred, gold)
    symbols = sorted(gold.free_symbols, key=str)
    for shift in range(3):
        point = {s: SAMPLE_POINTS[(i + shift) % len(SAMPLE_POINTS)] + shift for i, s in enumerate(symbols)}
        if not numbers_equal(pred.xreplace(point), gold.xreplace(point)):
            return False
    return True


def numbers_equal(a, b):
    if a == b:
        return True
    infinite = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)
    if (a.is_Rational and b.is_Rational) or a.has(*infinite) or b.has(*infinite):
        return False
    difference, size = sympy.N(a - b, 50), sympy.N(abs(a) + abs(b), 50)
    return bool(abs(difference) <= size * sympy.Float("1e-35", 50))


@contextlib.contextmanager
def time_limit(seconds):
    """A hard wall-clock bound on one grading call (main thread only; elsewhere the input bounds suffice)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
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


# ----------------------------------------------------------------------------------------------
# Rewards: R = accuracy (checker, judge, or their mean) + format_weight * format - overlong penalty
# ----------------------------------------------------------------------------------------------
def score(completions, golds, cfg, lengths=None, problems=None, judge=None):
    """The one reward function: accuracy (checker and/or judge) + format bonus - overlong penalty.
    Returns (rewards, accuracy, format, unparsed judge replies)."""
    accuracy = torch.tensor([math_reward(c, g) for c, g in zip(completions, golds)])
    rewards, unparsed = accuracy.clone(), 0
    if cfg.reward != "rule":
        scores = judge(problems, golds, completions)
        unparsed = sum(s is None for s in scores)
        judged = torch.tensor([s or 0.0 for s in scores])
        rewards = judged if cfg.reward == "judge" else (accuracy + judged) / 2
    formats = torch.tensor([format_reward(c) for c in completions])
    rewards = rewards + cfg.format_weight * formats
    if cfg.overlong_buffer and lengths is not None:  # DAPO (Yu et al. 2025): soft penalty near the budget
        start = cfg.max_completion_tokens - cfg.overlong_buffer
        rewards = rewards - ((lengths.cpu().float() - start) / cfg.overlong_buffer).clamp(0, 1)
    return rewards, accuracy, formats, unparsed


# ----------------------------------------------------------------------------------------------
# Sampling: one batched generate per stage (left padding, KV cache, no grad)
# ----------------------------------------------------------------------------------------------
@dataclass
class Samples:
    """A batch of prompts with their sampled completions, laid out as one left-padded tensor."""
    input_ids: torch.Tensor       # (B, P+T) prompt left-padded to P, completion right-padded to T
    attention_mask: torch.Tensor  # (B, P+T)
    prompt_length: int            # P
    completion_mask: torch.Tensor  # (B, T) True on generated tokens up to and including EOS
    texts: list                   # B decoded completions

    @property
    def lengths(self):            # (B,)
        return self.completion_mask.sum(1)


def eos_ids(model, tokenizer):
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample(model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_p, cfg):
    """num_samples completions for each prompt, grouped: rows i*num_samples .. (i+1)*num_samples-1."""
    from transformers import GenerationConfig
    model.eval()
    stop = eos_ids(model, tokenizer)
    # Every field that shapes the distribution is set, else generate() takes the model's own defaults
    # (a top_k, a repetition penalty) and we would sample from a distribution our log-probs do not describe.
    sampling = dict(temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, typical_p=1.0) if temperature else {}
    generation = GenerationConfig(
        do_sample=temperature > 0, **sampling, repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop,
        num_return_sequences=num_samples)
    chunks, per_call = [], max(1, cfg.generation_batch_size // num_samples)
    for start in range(0, len(prompts), per_call):
        encoded = tokenizer(prompts[start:start + per_call], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=not uses_chat_template(tokenizer, cfg))
        encoded = encoded.to(model.device)
        output = model.generate(**encoded, generation_config=generation)
        prompt_mask = encoded.attention_mask.repeat_interleave(num_samples, 0)
        chunks.append((output, prompt_mask))
    return stack_samples(chunks, tokenizer, stop)


def stack_samples(chunks, tokenizer, stop):
    """Pad generate outputs to one (B, P+T) layout; masks come from lengths, never from token ids."""
    P = max(mask.shape[1] for _, mask in chunks)
    T = max(out.shape[1] - mask.shape[1] for out, mask in chunks)
    pad = tokenizer.pad_token_id
    ids, prompt_masks = [], []
    for out, mask in chunks:
        p, t = mask.shape[1], out.shape[1] - mask.shape[1]
        ids.append(torch.nn.functional.pad(out, (P - p, T - t), value=pad))
        prompt_masks.append(torch.nn.functional.pad(mask, (P - p, 0), value=0))
    input_ids, prompt_mask = torch.cat(ids), torch.cat(prompt_masks)
    completions = input_ids[:, P:]                                              # (B, T)
    # A chunk shorter than T stopped because all its rows hit EOS, so its padding is never inside a mask.
    is_stop = torch.isin(completions, torch.tensor(stop, device=completions.device))
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, T)   # EOS is part of the completion
    completion_mask = torch.arange(T, device=completions.device)[None] < first_stop[:, None]
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(completions, first_stop.tolist())],
                                   skip_special_tokens=True)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    return Samples(input_ids, attention_mask, P, completion_mask, texts)


# ----------------------------------------------------------------------------------------------
# Log-probs of the sampled tokens under the sampling distribution, softmax(logits / temperature)
# ----------------------------------------------------------------------------------------------
def token_logprobs(model, input_ids, attention_mask, prompt_length, completion_mask, temperature,
                   with_entropy=True, chunk_tokens=1024):
    """(logp, entropy or None), each (b, T), zero off the mask. Only the hidden states that predict completion
    tokens meet the output layer, a chunk at a time, so no (tokens x vocabulary) float32 tensor exists."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state                 # (b, P+T, H)
    hidden = hidden[:, prompt_length - 1:-1][completion_mask]                    # (N, H) states before each token
    targets = input_ids[:, prompt_length:][completion_mask]                      # (N,)
    head, softcap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    logps, entropies = [], []
    for start in range(0, len(targets), chunk_tokens):
        chunk = (head, hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens], temperature, softcap,
                 with_entropy)
        # checkpoint: backward recomputes the chunk's logits instead of keeping them all alive
        logp, entropy = checkpoint(chunk_logprobs, *chunk, use_reentrant=False) if torch.is_grad_enabled() \
            else chunk_logprobs(*chunk)
        logps.append(logp)
        entropies.append(entropy)
    zeros = torch.zeros(completion_mask.shape, device=hidden.device)
    entropy = zeros.masked_scatter(completion_mask, torch.cat(entropies)) if with_entropy else None
    return zeros.masked_scatter(completion_mask, torch.cat(logps)), entropy


def chunk_logprobs(head, hidden, targets, temperature, softcap=None, with_entropy=True):
    logits = head(hidden).float()                                                # (n, V)
    if softcap:  # Gemma-style models squash logits before sampling; so must we
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    log_normalizer = logits.logsumexp(-1)                                        # (n,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - log_normalizer
    entropy = None
    if with_entropy:
        with torch.no_grad():  # entropy is a metric, never a loss term here
            entropy = log_normalizer - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


# ----------------------------------------------------------------------------------------------
# Group-relative advantages:  A_j = (R_j - mean(R)) / (std(R) + eps),  exactly 0 when the group agrees
# ----------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size, scale_by_std=True):
    grouped = rewards.view(-1, group_size)                                       # (B, G)
    centered = grouped - grouped.mean(1, keepdim=True)
    if scale_by_std:  # Dr. GRPO (Liu et al. 2025) drops this division
        centered = centered / (grouped.std(1, correction=0, keepdim=True) + 1e-6)
    agree = grouped.amax(1, keepdim=True) == grouped.amin(1, keepdim=True)
    return centered.masked_fill(agree, 0.0).view(-1)                              # (B*G,)


def informative_groups(rewards, group_size):
    """(B*G,) True for members of groups whose rewards differ: the only groups that carry signal."""
    grouped = rewards.view(-1, group_size)
    return (grouped.amax(1) != grouped.amin(1)).repeat_interleave(group_size)


# ----------------------------------------------------------------------------------------------
# The clipped surrogate with KL penalty, for token t of completion j, with r = pi_theta / pi_old:
#   loss_jt = -min(r A_j, clip(r, 1 - eps_low, 1 + eps_high) A_j) + beta * KL_jt
#   KL_jt   = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1           (the "k3" estimator, >= 0)
# averaged over each completion's tokens (1/|o_j|) and then over completions (the paper's choice).
# ----------------------------------------------------------------------------------------------
CLIP_DEFAULTS = {"grpo": (0.2, 0.2), "dr_grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}


def loss_weights(completion_mask, loss, max_completion_tokens):
    """(B, T) weight of each token's term; summed over the batch's micro-batches they give the batch loss."""
    mask = completion_mask.float()
    completions, tokens = summed_over_ranks(len(mask), mask.sum())  # the whole step's, over torchrun's ranks
    if loss == "dapo":     # DAPO (Yu et al. 2025): one token-level mean over the whole batch
        return mask / tokens
    if loss == "dr_grpo":  # Dr. GRPO: a constant normalizer, so a completion's length does not scale it
        return mask / (max_completion_tokens * completions)
    return mask / (mask.sum(1, keepdim=True) * completions)  # grpo, gspo: per-completion mean, then mean


def policy_loss(logp, old_logp, advantages, completion_mask, weights, cfg, ref_logp=None):
    """logp, old_logp, ref_logp, weights, completion_mask: (b, T); advantages: (b,).
    Returns (loss, number of clipped tokens, summed KL), the last two as tensors (no device sync here)."""
    log_ratio = logp - old_logp
    if cfg.loss == "gspo":  # GSPO (Zheng et al. 2025): one ratio per sequence, the geometric mean of its tokens'
        log_ratio = (log_ratio * completion_mask).sum(1, keepdim=True) / completion_mask.sum(1, keepdim=True)
    ratio = log_ratio.exp()                                                      # (b, T) or (b, 1)
    low, high = cfg.clip_eps_low or CLIP_DEFAULTS[cfg.loss][0], cfg.clip_eps_high or CLIP_DEFAULTS[cfg.loss][1]
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
# The update: micro-batches with gradient accumulation into fp32 master weights
# ----------------------------------------------------------------------------------------------
def micro_batch(samples, rows):
    """Rows of the batch without the columns that are padding in every one of them (same result, less work)."""
    attention = samples.attention_mask[rows]
    start = int(attention[:, :samples.prompt_length].argmax(1).min())
    end = samples.prompt_length + int(samples.lengths[rows].max())
    return (samples.input_ids[rows, start:end], attention[:, start:end], samples.prompt_length - start,
            samples.completion_mask[rows, :end - samples.prompt_length])


def policy_update(model, optimizer, master, samples, advantages, keep, cfg, ref_model=None):
    """--ppo-epochs optimizer steps on the kept completions. Returns metrics."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    device = samples.input_ids.device
    advantages, index = advantages.to(device), keep.to(device).nonzero().squeeze(1)
    weights = loss_weights(samples.completion_mask[index], cfg.loss, cfg.max_completion_tokens)
    chunks = [(index[i:i + cfg.micro_batch_size], weights[i:i + cfg.micro_batch_size])
              for i in range(0, len(index), cfg.micro_batch_size)]

    def frozen_logprobs(policy):  # one no-grad pass, only when a ratio must be taken against it
        with torch.no_grad():
            return [token_logprobs(policy, *micro_batch(samples, rows), cfg.temperature, with_entropy=False)[0]
                    for rows, _ in chunks]
    # With one epoch the sampler *is* the policy being updated: old log-probs = logp.detach(), no extra pass.
    old = frozen_logprobs(model) if cfg.ppo_epochs > 1 else None
    with reference_policy(model, ref_model):  # LoRA: the policy with its adapters off
        reference = frozen_logprobs(ref_model) if ref_model is not None else None
    totals = dict(loss=0.0, clipped=0, kl=0.0, entropy=0.0)  # summed as tensors, read once at the end
    for epoch in range(cfg.ppo_epochs):
        for k, (rows, chunk_weights) in enumerate(chunks):
            input_ids, attention_mask, prompt_length, completion_mask = micro_batch(samples, rows)
            logp, entropy = token_logprobs(model, input_ids, attention_mask, prompt_length, completion_mask,
                                           cfg.temperature, with_entropy=epoch == 0)
            loss, clipped, kl = policy_loss(logp, old[k] if old else logp.detach(), advantages[rows],
                                            completion_mask, chunk_weights[:, :logp.shape[1]], cfg,
                                            reference[k] if reference else None)
            loss.backward()
            accumulate_gradients(params, master)
            totals["loss"] += loss.detach() / cfg.ppo_epochs
            totals["clipped"] += clipped
            totals["kl"] += kl
            if entropy is not None:
                totals["entropy"] += (entropy * completion_mask).sum()
        if summed_over_ranks(len(chunks))[0]:  # under torchrun every rank steps if any has work
            sum_gradients_over_ranks(master)
            torch.nn.utils.clip_grad_norm_(master, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(params, master):
                    if p is not m:
                        p.copy_(m)
    totals["tokens"] = samples.completion_mask[index].sum()
    totals = {name: float(value) for name, value in zip(totals, summed_over_ranks(*totals.values()))}
    tokens = max(1, int(totals["tokens"]))
    return dict(loss=totals["loss"], clip_frac=totals["clipped"] / (tokens * cfg.ppo_epochs),
                kl=totals["kl"] / (tokens * cfg.ppo_epochs) if ref_model is not None else None,
                entropy=totals["entropy"] / tokens if totals["tokens"] else None)


def master_weights(model):
    """The optimizer's fp32 copy of a bf16 model (bf16 alone would round small updates away)."""
    return [p if p.dtype == torch.float32 else p.detach().float().clone()
            for p in model.parameters() if p.requires_grad]


def accumulate_gradients(params, master):
    for p, m in zip(params, master):
        if p is not m and p.grad is not None:
            m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
            p.grad = None


def learning_rate(step, cfg):
    """Linear warm-up, then cosine decay to a floor of min_lr_ratio x the peak."""
    warmup = max(1, round(cfg.warmup_ratio * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# One step. GRPO: G completions of q, one update. iGRPO, two stages and one update:
#   Stage 1: N drafts of q (no gradient), scored; d* = the first of the best (used even if wrong)
#   Stage 2: q' = q + d* through REFINE_TEMPLATE; G - N refinements of q' get advantages and gradient.
# Either way the step generates G sequences per problem: the matched rollout budget.
# ----------------------------------------------------------------------------------------------
def rollout(model, tokenizer, batch, cfg, judge=None):
    """Sample and score one step. Returns (samples to train on, rewards, group size, metrics)."""
    problems, golds = [b["problem"] for b in batch], [b["answer"] for b in batch]
    prompts = [build_prompt(tokenizer, problem, cfg) for problem in problems]
    group, info = cfg.group_size, dict(draft_reward=None, best_draft_reward=None, generated_tokens=0)
    if cfg.algo == "igrpo":
        N = cfg.num_drafts
        drafts = sample(model, tokenizer, prompts, N, cfg.max_completion_tokens, cfg.temperature, cfg.top_p, cfg)
        draft_rewards = score(drafts.texts, repeat(golds, N), cfg, drafts.lengths, repeat(problems, N), judge)[0]
        best_rows = torch.arange(len(batch)) * N + draft_rewards.view(-1, N).argmax(1)  # argmax: first of ties
        best_drafts = [cut_draft(tokenizer, drafts.texts[row], cfg.max_draft_tokens) for row in best_rows.tolist()]
        prompts = [build_prompt(tokenizer, refine_message(problem, draft), cfg)
                   for problem, draft in zip(problems, best_drafts)]
        group = cfg.group_size - N
        info.update(draft_reward=draft_rewards.mean().item(), best_draft_reward=draft_rewards[best_rows].mean().item(),
                    best_drafts=best_drafts, generated_tokens=int(drafts.lengths.sum()))
    samples = sample(model, tokenizer, prompts, group, cfg.max_completion_tokens, cfg.temperature, cfg.top_p, cfg)
    rewards, accuracy, formats, unparsed = score(samples.texts, repeat(golds, group), cfg, samples.lengths,
                                                 repeat(problems, group), judge)
    info.update(accuracy=accuracy.mean().item(), format_reward=formats.mean().item(), judge_unparsed=unparsed,
                generated_tokens=info["generated_tokens"] + int(samples.lengths.sum()))
    return samples, rewards, group, info


def repeat(items, times):
    return [item for item in items for _ in range(times)]


@torch.no_grad()
def held_out_accuracy(model, tokenizer, problems, cfg):
    """Single-pass accuracy from q alone (no drafts at test time), averaged over eval_samples samples."""
    problems, correct = shard_problems(problems), 0.0  # under torchrun each rank scores its share
    prompts = [build_prompt(tokenizer, p["problem"], cfg) for p in problems]
    k = cfg.eval_samples
    if problems:
        samples = sample(model, tokenizer, prompts, k, cfg.max_completion_tokens, cfg.eval_temperature,
                         cfg.eval_top_p, cfg)
        golds = repeat([p["answer"] for p in problems], k)
        correct = sum(math_reward(text, gold) for text, gold in zip(samples.texts, golds))
    correct, count = summed_over_ranks(correct, len(problems) * k)
    return correct / count


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def load_model(name, cfg, dtype, device, flag="model"):
    if (Path(name) / "adapter_config.json").is_file():  # saved with --lora-rank: base + adapter, merged
        return load_lora_checkpoint(name, cfg, dtype, device, flag)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        fail(f"--{flag} {name!r}: not a local model folder, and loading it from the Hugging Face hub failed "
             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for module in model.modules():  # a training forward must score tokens under the policy that sampled them
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model.to(device), tokenizer


def save(model, tokenizer, folder):
    if not is_main_process():  # under torchrun rank 0 alone writes files
        return
    save_adapter(model, folder) if is_lora(model) else model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def train(cfg):
    check_config(cfg)
    setup_distributed(cfg)  # torchrun only; one process creates no process group
    random.seed(cfg.seed)  # the same problem order on every rank
    torch.manual_seed(cfg.seed + process_rank())  # each rank draws its own samples
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device == "cuda") else torch.float32
    if not cfg.dataset:
        fail("--dataset: give a dataset to train on (or no --model, for the toy world)")
    problems = load_problems(cfg.dataset, cfg)
    held_out = load_problems(cfg.eval_dataset, cfg, "eval-dataset", cfg.eval_limit) if cfg.eval_dataset else []
    model, tokenizer = load_model(cfg.model, cfg, dtype, device)
    model = apply_lora(model, cfg)
    fits = [p for p in problems if len(tokenizer(build_prompt(tokenizer, p["problem"], cfg)).input_ids)
            <= cfg.max_prompt_tokens]
    if not fits:
        fail(f"--dataset {cfg.dataset}: every prompt is longer than --max-prompt-tokens {cfg.max_prompt_tokens}")
    if len(fits) < len(problems):
        print(f"skipping {len(problems) - len(fits)} problems longer than --max-prompt-tokens")
    ref_model = None if cfg.beta <= 0 else model if cfg.lora_rank else \
        load_model(cfg.model, cfg, dtype, device)[0].eval().requires_grad_(False)  # LoRA: adapters off
    judge = None
    if cfg.reward != "rule":
        from judge import make_judge
        judge = make_judge(cfg, device, dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    master = master_weights(model)
    optimizer = torch.optim.AdamW(master, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.output_dir)
    if is_main_process():  # under torchrun rank 0 alone writes files
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics_file = open(out / "metrics.jsonl" if is_main_process() else os.devnull, "w")

    def log(record):  # one JSON object per line, flushed, so a plot can follow a live run
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    results = {}
    if held_out:
        results["eval_before"] = held_out_accuracy(model, tokenizer, held_out, cfg)
        tqdm.write(f"held-out accuracy before training: {results['eval_before']:.3f} ({len(held_out)} problems)")
        log(dict(step=0, eval_accuracy=results["eval_before"]))
    order = []
    bar = tqdm(range(1, cfg.steps + 1), desc=cfg.algo, dynamic_ncols=True, disable=not is_main_process())
    for step in bar:
        started = time.time()
        while len(order) < cfg.prompts_per_step:  # epochs over the shuffled problems
            order += random.sample(fits, len(fits))
        batch, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
        batch = shard_problems(batch)  # torchrun: this rank's share of the step
        samples, rewards, group, info = rollout(model, tokenizer, batch, cfg, judge)
        advantages = group_advantages(rewards, group, scale_by_std=cfg.loss != "dr_grpo")
        # DAPO drops the groups that agree; elsewhere they stay in the average with advantage 0
        keep = informative_groups(rewards, group) if cfg.loss == "dapo" else torch.ones_like(rewards, dtype=torch.bool)
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate(step - 1, cfg)
        stats = policy_update(model, optimizer, master, samples, advantages, keep, cfg, ref_model)
        seconds = time.time() - started
        record = dict(step=step, reward=rewards.mean().item(), accuracy=info["accuracy"],
                      draft_reward=info["draft_reward"], best_draft_reward=info["best_draft_reward"], **stats,
                      format_reward=info["format_reward"], completion_tokens=info["generated_tokens"],
                      mean_completion_length=samples.lengths.float().mean().item(),
                      dropped_groups=int((~keep).sum()) // group, judge_unparsed=info["judge_unparsed"],
                      lr=optimizer.param_groups[0]["lr"], step_seconds=seconds,
                      tokens_per_second=info["generated_tokens"] / seconds)
        record = step_record_over_ranks(record)
        if held_out and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            record["eval_accuracy"] = held_out_accuracy(model, tokenizer, held_out, cfg)
        log(record)
        bar.set_postfix(reward=f"{record['reward']:.2f}", **({} if info["draft_reward"] is None else
                                                              {"draft": f"{info['draft_reward']:.2f}"}))
        if cfg.save_every and step % cfg.save_every == 0:
            save(model, tokenizer, out / f"step-{step}")
    if held_out:
        results["eval_after"] = held_out_accuracy(model, tokenizer, held_out, cfg)
        tqdm.write(f"held-out accuracy after {cfg.steps} steps: {results['eval_after']:.3f} "
                   f"(before: {results['eval_before']:.3f})")
        log(dict(step=cfg.steps, eval_accuracy=results["eval_after"]))
    save(model, tokenizer, out / "final")
    save_merged(out / "final", out / "final-merged", cfg, dtype)
    metrics_file.close()
    tqdm.write(f"metrics: {out / 'metrics.jsonl'}  checkpoint: {out / 'final'}")
    return results


# ----------------------------------------------------------------------------------------------
# Scaling out: LoRA adapters (past one GPU's memory) and torchrun (past one GPU)
#
# LoRA (Hu et al. 2021): W x + (alpha / r) B A x with the base W frozen in the model's dtype; only
# A (r x d_in) and B (d_out x r) train, in fp32, so gradients and Adam state exist for the adapters alone.
# B starts at zero: at step 0 the policy is the base model, which (adapters off) is also the KL reference.
#
# torchrun: rank k of n samples and scores problems k, k+n, ... of the step (a group lives on one rank, so
# advantages need no communication). Every normalizer of the loss counts the whole step (all ranks), so
# each rank's loss is its share of the one-process loss and the step's gradient is the sum over ranks:
#   grad L = sum_k grad L_k,   L_k = sum over rank k's tokens of w_jt * loss_jt
# Data parallelism by hand: one all-reduce of the fp32 master gradients per optimizer step. (PyTorch's
# DistributedDataParallel would reduce the bf16 model gradients on every micro-batch's backward.)
# ----------------------------------------------------------------------------------------------
def check_scaling_config(cfg):
    if cfg.lora_rank < 0 or (cfg.lora_rank and cfg.lora_alpha <= 0):
        fail(f"--lora-rank {cfg.lora_rank} --lora-alpha {cfg.lora_alpha}: the rank must be 0 (off) or more, "
             "alpha positive")
    if cfg.save_merged and not cfg.lora_rank:
        fail("--save-merged: only with --lora-rank (a full fine-tune is saved whole anyway)")
    if cfg.lora_rank:
        import_peft()


def import_peft():
    try:
        import peft
    except ImportError:
        fail("--lora-rank: LoRA needs the optional peft package (pip install peft)")
    return peft


def apply_lora(model, cfg):
    """--lora-rank > 0: the same model, its weights frozen, trainable fp32 adapters inside; else as is."""
    if not cfg.lora_rank:
        return model
    peft = import_peft()
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else \
        [name.strip() for name in cfg.lora_targets.split(",") if name.strip()]
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                             target_modules=targets)
    try:  # peft freezes the base, adds the adapters and keeps them fp32 over a bf16 base
        wrapped = peft.get_peft_model(model, config)
    except ValueError as error:  # e.g. no module of the model has the given name
        fail(f"--lora-targets {cfg.lora_targets!r}: {str(error).splitlines()[0]}")
    local = cfg.model and Path(cfg.model).is_dir()  # a saved adapter names its base, a local one absolutely
    base = str(Path(cfg.model).resolve()) if local else cfg.model
    wrapped.peft_config["default"].base_model_name_or_path = base
    model = wrapped.get_base_model()  # the original model object, adapters inside: the rest of igrpo as is
    for p in model.parameters() if process_count() > 1 else []:  # A starts random: all ranks take rank 0's
        if p.requires_grad:
            torch.distributed.broadcast(p.data, src=0)
    return model


def is_lora(model):
    return hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_policy(model, ref_model):
    """With LoRA the reference policy is the policy with its adapters off: no second copy of the weights."""
    if ref_model is not model:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def save_adapter(model, folder):
    """The adapter alone, in peft's format: peft.PeftModel.from_pretrained(base, folder) reads it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {f"base_model.model.{name}": tensor.detach().contiguous().cpu()  # peft's key prefix
               for name, tensor in get_peft_model_state_dict(model).items()}
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(folder)


def load_lora_checkpoint(folder, cfg, dtype, device, flag="model"):
    """A folder saved with --lora-rank: its base (named in adapter_config.json), the adapter merged in."""
    peft = import_peft()
    base = json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        fail(f"--{flag} {folder}: adapter_config.json names no base model (base_model_name_or_path)")
    model, tokenizer = load_model(base, cfg, dtype, device, flag)
    return peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload(), tokenizer


def save_merged(folder, merged_folder, cfg, dtype):
    """--save-merged: the adapter folder's model, merged, as a plain checkpoint (AutoModelForCausalLM, vLLM).
    Merged on the CPU from the saved files, so the GPU holds no second copy."""
    if cfg.save_merged and is_main_process():
        save(*load_lora_checkpoint(folder, cfg, dtype, "cpu"), merged_folder)


def setup_distributed(cfg=None):
    """Under torchrun (WORLD_SIZE > 1): join the process group (once); ranks other than 0 print nothing.
    In one process: nothing at all."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(torch.distributed.destroy_process_group)
        if not is_main_process():
            sys.stdout = open(os.devnull, "w")
    if cfg and cfg.prompts_per_step % process_count():
        fail(f"--prompts-per-step {cfg.prompts_per_step} counts a step's problems over all "
             f"{process_count()} ranks: make it a multiple of {process_count()}")


@contextlib.contextmanager
def main_process_first():
    """torchrun: rank 0 runs the block (e.g. builds a cache) before the other ranks (that read it)."""
    setup_distributed()
    if not is_main_process():
        torch.distributed.barrier()
    yield
    if is_main_process() and process_count() > 1:
        torch.distributed.barrier()


def process_count():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def process_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main_process():
    return process_rank() == 0


def shard_problems(items):
    """This rank's share: items k, k+n, k+2n, ... (all of them in one process)."""
    return items[process_rank()::process_count()]


def summed_over_ranks(*values):
    """Each number (int, float or one-element tensor) summed over all ranks; in one process, as given."""
    if process_count() == 1:
        return values
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
    torch.distributed.all_reduce(total)
    return tuple(total.tolist())


def sum_gradients_over_ranks(master):
    """The step's gradient: the sum of every rank's, on the fp32 master gradients, once per optimizer step."""
    if process_count() == 1:
        return
    for m in master:  # a rank without completions to train on still takes part, with zeros
        if m.grad is None:
            m.grad = torch.zeros_like(m)
    for work in [torch.distributed.all_reduce(m.grad, async_op=True) for m in master]:
        work.wait()


STEP_SUMS = ("completion_tokens", "dropped_groups", "judge_unparsed")
STEP_MEANS = ("reward", "accuracy", "draft_reward", "best_draft_reward", "format_reward",
              "mean_completion_length")


def step_record_over_ranks(record):
    """One step's numbers over all ranks: counts summed, per-completion means averaged (every rank holds as
    many completions), throughput from the summed tokens. The update's metrics are already global."""
    if process_count() == 1:
        return record
    names = [name for name in STEP_SUMS + STEP_MEANS if record.get(name) is not None]
    totals = summed_over_ranks(*(record[name] for name in names))
    record = dict(record, **{name: int(total) if name in STEP_SUMS else total / process_count()
                             for name, total in zip(names, totals)})
    record["tokens_per_second"] = record["completion_tokens"] / record["step_seconds"]
    return record


# ----------------------------------------------------------------------------------------------
# main: every Config field is a --kebab-case flag
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="GRPO and iGRPO for math reasoning in one file.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    args = parser.parse_args(argv)
    given = {action.dest for action in parser._actions for option in action.option_strings
             for arg in (argv if argv is not None else sys.argv[1:])
             if arg == option or arg.startswith(option + "=")}
    return Config(**vars(args)), given


def main(argv=None):
    cfg, given = parse_args(argv)
    check_config(cfg)  # before the toy spends minutes on its warm start
    if not cfg.model:  # no model named: the offline toy world (see toy.py), kept out of this file
        import toy
        with main_process_first():  # torchrun: rank 0 builds the toy's cache, then the others read it
            cfg = toy.prepare(cfg, given)
    return train(cfg)


if __name__ == "__main__":
    main()
