"""
The offline toy world: a tiny model that half-knows arithmetic, trained by igrpo.py without a
download.

RL needs a policy that is sometimes right, so the toy builds one locally (no download): a byte-level
BPE tokenizer trained on the toy's own text, a small Llama-style model from a config, and a
supervised warm start on synthetic problems ("What is 47 + 38?") solved in written column steps
(" 7 + 8 = 15. 4 + 3 + 1 = 8. \\boxed{85}"), in the same prompt format that igrpo.py trains with.
Half the warm-start examples are refinement prompts whose draft solves the *same* problem, right
(keep it: a share --right-drafts of them) or with one wrong step (fix it), so refinement is a skill
the model has and iGRPO can improve. The warm start stops on a measurement, not a step count:
when single-pass accuracy on calibration problems (training problems) enters CALIBRATION_BAND, so
every machine starts RL from the same place. Each seed's starting point is cached: only the first
run pays for it. Everything here exists only to give igrpo.py something real to train offline.

    python toy.py                        # the default job: iGRPO on the toy (flags: igrpo.py's)
    python toy.py compare --seeds 0 1 2  # GRPO vs iGRPO on the toy, 3 seeds each: table + figure
    python toy.py explain                # one iGRPO step, every quantity printed (docs/one-step.md)

The launcher lives here, not in igrpo.py, so imports point one way: toy.py uses igrpo.py, never
back.
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import igrpo

MODEL_SIZE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=384, max_position_embeddings=512)
CALIBRATION_BAND = (0.45, 0.60)  # single-pass accuracy at which the warm start stops
CALIBRATION_PROBLEMS = 200       # training problems scored every CHECK_EVERY warm-start steps
CHECK_EVERY = 20
# a warm start that never reaches the band is an error, not a silent start
MAX_WARM_START_STEPS = 3000

# The toy's settings: everything the user did not set on the command line.
SETTINGS = dict(steps=60, prompts_per_step=16, group_size=8, num_drafts=4,
                lr=1e-4, warmup_ratio=0.05, eval_every=10,
                max_prompt_tokens=256, max_completion_tokens=32, max_draft_tokens=32,
                micro_batch_size=128, gradient_checkpointing=False, chat_template="off",
                eval_limit=300, eval_samples=2)


@dataclass
class ToyConfig(igrpo.Config):
    right_drafts: float = igrpo.setting(0.5, "toy: share of the warm start's refinement examples "
                                             "whose draft is right (the rest have one wrong step)",
                                        "in [0, 1]")


# ----------------------------------------------------------------------------------------------
# Problems: a + b in written column steps (ones, then tens with the carry); a wrong draft has one
# wrong step
# ----------------------------------------------------------------------------------------------
def make_problems(count, rng, exclude=()):
    problems, seen = [], set(exclude)
    while len(problems) < count:
        terms = (rng.randint(10, 99), rng.randint(10, 99))
        if terms not in seen:
            seen.add(terms)
            problems.append({"problem": f"What is {terms[0]} + {terms[1]}?",
                             "answer": str(sum(terms)), "terms": terms})
    return problems, seen


def solution(terms, wrong_step=None, error=0):
    """The ones, then the tens plus the carry: " 7 + 8 = 15. 4 + 3 + 1 = 8. \\boxed{85}" for
    47 + 38. A wrong step's slip carries into the step after it, as it would on paper."""
    (a_tens, a_ones), (b_tens, b_ones) = divmod(terms[0], 10), divmod(terms[1], 10)
    ones = a_ones + b_ones + (error if wrong_step == 0 else 0)
    carry = ones // 10
    tens = a_tens + b_tens + carry + (error if wrong_step == 1 else 0)
    return (f" {a_ones} + {b_ones} = {ones}. {a_tens} + {b_tens} + {carry} = {tens}."
            f" \\boxed{{{tens}{ones % 10}}}")


def wrong_draft(terms, rng):
    """The slips of adding by hand: in the ones a digit off by one or a lost or invented carry
    (+-10), in the tens a digit off by one. Never a negative partial sum, so the draft still reads
    like arithmetic."""
    ones = terms[0] % 10 + terms[1] % 10
    slips = [(0, e) for e in (-10, -1, 1, 10) if 0 <= ones + e <= 19] + [(1, -1), (1, 1)]
    return solution(terms, *rng.choice(slips))


def warm_start_examples(problems, tokenizer, cfg, rng, right_drafts=0.5):
    """(prompt, completion) pairs: each problem plainly, and as a refinement prompt whose draft is
    of the same problem, right (a share right_drafts of them) or with one wrong step. The target is
    always the right solution: keep it, or fix it."""
    examples = []
    for p in problems:
        right = rng.random() < right_drafts
        draft = solution(p["terms"]) if right else wrong_draft(p["terms"], rng)
        examples.append((igrpo.build_prompt(tokenizer, p["problem"], cfg), solution(p["terms"])))
        message = igrpo.refine_message(p["problem"], draft)
        examples.append((igrpo.build_prompt(tokenizer, message, cfg), solution(p["terms"])))
    return examples


# ----------------------------------------------------------------------------------------------
# The model, and its warm start
# ----------------------------------------------------------------------------------------------
def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    # Digits stay single tokens, so arithmetic is learnable; anything else may merge, across spaces
    # too, so the long system prompt costs a few tokens and the toy trains fast on a CPU.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_model(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **MODEL_SIZE)
    return LlamaForCausalLM(config)


def supervised_loss(model, tokenizer, batch):
    """Cross-entropy on the completion tokens (and EOS) of (prompt, completion) pairs."""
    prompts = [tokenizer(p, add_special_tokens=True).input_ids for p, _ in batch]
    completions = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                   for _, c in batch]
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(batch), length), tokenizer.pad_token_id)          # (B, T)
    labels = torch.full((len(batch), length), -100)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        labels[row, len(p):len(p) + len(c)] = torch.tensor(c)
        attention_mask[row, :len(p) + len(c)] = 1
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def warm_start(model, tokenizer, examples, rng, calibrate, band=CALIBRATION_BAND,
               check_every=CHECK_EVERY, max_steps=MAX_WARM_START_STEPS, batch_size=32, lr=2e-3):
    """Supervised fine-tuning until calibrate() (single-pass accuracy) reaches the band's floor.
    Returns (steps, calibration accuracy, last loss). A stop above the band's ceiling is
    reported."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # no total: it stops on a measurement (about 300 steps, a minute on 2 cores), not a count
    bar = tqdm(iter(range(1, max_steps + 1)), dynamic_ncols=True,
               desc=f"toy warm start, until calibration accuracy reaches {band[0]:.0%}")
    accuracy = 0.0
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 20)
        loss = supervised_loss(model, tokenizer, rng.sample(examples, batch_size))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % check_every == 0:
            accuracy = calibrate(model)
            bar.set_postfix(loss=f"{loss.item():.3f}", calibration=f"{accuracy:.1%}")
            if accuracy >= band[0]:
                bar.close()
                if accuracy > band[1]:
                    print(f"toy: warning: calibration accuracy {accuracy:.2f} "
                          f"jumped past the band {band}")
                return step, accuracy, loss.item()
    bar.close()
    fail(f"the warm start did not reach {band[0]:.0%} calibration accuracy "
               f"in {max_steps} steps (last {accuracy:.0%}); "
               f"delete {cache_root()} and report this machine's torch version")


def build(folder, cfg, seed=0, **warm_start_options):
    """Write folder/model (tokenizer + warm-started model), train.jsonl, test.jsonl and toy.json
    (last), all into a temporary folder renamed to `folder` at the end: a killed build never looks
    complete."""
    cfg, rng = ToyConfig(**dataclasses.asdict(cfg)), random.Random(seed)
    test, seen = make_problems(300, rng)
    train, _ = make_problems(3000, rng, exclude=seen)
    drafts = [wrong_draft(p["terms"], rng) for p in train[:500]]
    corpus = [igrpo.build_prompt(None, igrpo.refine_message(p["problem"], draft), cfg)
              + solution(p["terms"]) for p, draft in zip(train, drafts)]
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, seed)
    calibration = train[:CALIBRATION_PROBLEMS]
    probe = dataclasses.replace(cfg, eval_samples=1)
    started = time.time()
    steps, accuracy, loss = warm_start(
        model, tokenizer, warm_start_examples(train, tokenizer, cfg, rng, cfg.right_drafts), rng,
        lambda m: igrpo.held_out_accuracy(m, tokenizer, calibration, probe, label="calibration"),
        **warm_start_options)
    record = dict(seed=seed, right_drafts=cfg.right_drafts, warm_start_steps=steps,
                  calibration_accuracy=accuracy,
                  final_loss=loss, seconds=round(time.time() - started, 1),
                  calibration_problems=len(calibration),
                  band=list(warm_start_options.get("band", CALIBRATION_BAND)))
    print(f"toy: warm start stopped after {steps} steps ({record['seconds']:.0f}s) "
          f"at {accuracy:.1%} calibration accuracy, loss {loss:.3f}")
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    igrpo.save(partial / "model", igrpo.Policy(model, tokenizer, None, []), igrpo.Parts())
    for name, rows in (("train", train), ("test", test)):
        with open(partial / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n"
                         for r in rows)
    (partial / "toy.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return record


# ----------------------------------------------------------------------------------------------
# The cache, and the toy's settings over the user's flags
# ----------------------------------------------------------------------------------------------
def cache_root():
    return Path(__file__).resolve().parent / ".cache"


def cache_folder(seed=0, right_drafts=0.5):
    """Keyed by the code and settings that build the toy, igrpo's prompts, the share of right
    drafts and the seed: change any and the toy is built anew."""
    builders = (make_problems, solution, wrong_draft, warm_start_examples, build_tokenizer,
                build_model, supervised_loss, warm_start, build)
    code = [inspect.getsource(f) for f in builders]
    settings = repr((MODEL_SIZE, CALIBRATION_BAND, CALIBRATION_PROBLEMS, CHECK_EVERY,
                     MAX_WARM_START_STEPS, SETTINGS, right_drafts))
    prompts = [igrpo.SYSTEM_PROMPT, igrpo.REFINE_TEMPLATE, igrpo.PLAIN_TEMPLATE]
    key = hashlib.sha256("".join(code + [settings] + prompts).encode()).hexdigest()[:12]
    return cache_root() / f"toy-{key}-seed{seed}"


def is_complete(folder):
    """toy.json is written last, before the rename; the model files must be there too."""
    needed = ("train.jsonl", "test.jsonl", "model/config.json", "model/model.safetensors",
              "model/tokenizer.json")
    return (folder / "toy.json").is_file() and all((folder / name).is_file() for name in needed)


def run_folder(cfg, given):
    """runs/toy-<algo>-seed<N>, plus each other setting the user gave: runs never share a folder,
    while the flags that a resumed run may change (--resume, --micro-batch-size...) keep the folder
    of the run."""
    resumable = {f.name for f in dataclasses.fields(ToyConfig) if f.metadata["resumable"]}
    extra = sorted(given - {"algo", "seed"} - resumable)
    parts = [f"toy-{cfg.algo}-seed{cfg.seed}"]
    parts += [f"{name.replace('_', '-')}-{getattr(cfg, name)}" for name in extra]
    return str(Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)))


def prepare(cfg, given):
    """The toy's settings over the user's unset flags, and this seed's cached starting point (built
    once)."""
    cfg = ToyConfig(**dataclasses.asdict(cfg))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in SETTINGS.items() if k not in given})
    if "output_dir" not in given:
        cfg = dataclasses.replace(cfg, output_dir=run_folder(cfg, given))
    cache = cache_folder(cfg.seed, cfg.right_drafts)
    if not is_complete(cache):
        if cache.exists():
            print(f"toy: {cache} is incomplete (an interrupted build?): rebuilding it")
        print(f"toy: building the offline toy world for seed {cfg.seed} in {cache} "
              "(first run only)")
        build(cache, cfg, cfg.seed)
    return dataclasses.replace(cfg, model=str(cache / "model"), dataset=str(cache / "train.jsonl"),
                               eval_dataset=cfg.eval_dataset or str(cache / "test.jsonl"))


# ----------------------------------------------------------------------------------------------
# GRPO vs iGRPO on the toy at a matched budget (8 sequences per problem per step), over seeds
# ----------------------------------------------------------------------------------------------
ALGOS = ("grpo", "igrpo")


def finished(folder):
    """final/ is saved, then the last held-out score is logged: the last line of metrics.jsonl."""
    rows = igrpo.read_metrics(folder)
    return (folder / "final").is_dir() and bool(rows) and "eval_accuracy" in rows[-1]


def spread(values):
    mean = 100 * sum(values) / len(values)
    return f"{mean:.1f} [{100 * min(values):.1f}, {100 * max(values):.1f}]"


def comparison_table(out, seeds):
    """Markdown: held-out accuracy before/after per algorithm (mean [min, max] over seeds, in %),
    and iGRPO's draft, best-draft and refinement rewards over the first 10, the last 10 and all
    steps."""
    import plot
    lines = ["| algorithm | seeds | held-out before | held-out after | gain (points) "
             "| per seed (before -> after) |",
             "|---|---|---|---|---|---|"]
    rewards = []
    for algo in ALGOS:
        runs = [plot.read_run(out / f"{algo}-seed{seed}") for seed in seeds]
        evals = [[r["eval_accuracy"] for r in run["rows"] if "eval_accuracy" in r] for run in runs]
        before, after = [e[0] for e in evals], [e[-1] for e in evals]
        gains = [a - b for a, b in zip(after, before)]
        per_seed = ", ".join(f"{100 * b:.1f} -> {100 * a:.1f}" for b, a in zip(before, after))
        lines.append(f"| {algo} | {len(seeds)} | {spread(before)} | {spread(after)} "
                     f"| {spread(gains)} | {per_seed} |")
        if algo == "igrpo":
            rewards = [(key, [plot.series(run["rows"], key)[1] for run in runs])
                       for key in ("draft_reward", "best_draft_reward", "reward")]
    names = dict(draft_reward="drafts", best_draft_reward="best draft (what Stage 2 reads)",
                 reward="refinements (trained on)")
    lines += ["", "| iGRPO training reward (%), mean [min, max] over seeds "
              "| first 10 steps | last 10 steps | all steps |",
              "|---|---|---|---|"]
    for key, per_run in rewards:
        cells = [spread([sum(v[part]) / len(v[part]) for v in per_run])
                 for part in (slice(0, 10), slice(-10, None), slice(None))]
        lines.append(f"| {names[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(argv=None):
    parser = argparse.ArgumentParser(
        description="GRPO vs iGRPO on the toy, same budget, several seeds; "
                    "other flags go to igrpo.py (e.g. --steps 50)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="runs/toy-compare",
                        help="one folder per run, table.md, compare.png")
    args, flags = parser.parse_known_args(argv)
    igrpo.check_config(parse_flags(flags)[0])  # a typo fails before any file
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "compare.json"
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
    if recorded is not None and recorded["flags"] != flags:
        previous = " ".join(recorded["flags"]) or "none"
        fail(f"{out} holds a comparison run with other flags ({previous}): "
                   "give another --output-dir")
    record_path.write_text(json.dumps(dict(flags=flags)))
    for seed in args.seeds:
        for algo in ALGOS:
            folder = out / f"{algo}-seed{seed}"
            if finished(folder):
                print(f"toy compare: {folder} is done, kept")
                continue
            print(f"toy compare: {algo}, seed {seed} -> {folder}")
            # a run stopped after a checkpoint (or final/) goes on from it; one without starts over
            resumable = (folder / "final").is_dir() or (folder.is_dir() and any(
                (step / "trainer_state.pt").is_file() for step in igrpo.checkpoints(folder)))
            again = ["--resume"] if resumable else ["--overwrite"]
            main(flags + ["--algo", algo, "--seed", str(seed), "--output-dir", str(folder)] + again)
    table = comparison_table(out, args.seeds)
    (out / "table.md").write_text(table)
    print(table)
    right_drafts = parse_flags(flags)[0].right_drafts
    starts = [json.loads((cache_folder(seed, right_drafts) / "toy.json").read_text())
              for seed in args.seeds]
    print("warm starts: " + ", ".join(f"seed {s['seed']}: {s['warm_start_steps']} steps, "
                                      f"{100 * s['calibration_accuracy']:.1f}%" for s in starts))
    import plot
    runs = [out / f"{algo}-seed{seed}" for algo in ALGOS for seed in args.seeds]
    print(f"figure: {plot.plot_training(runs, out / 'compare.png')}")


def main(argv=None):
    """python toy.py [igrpo.py flags]: this seed's toy world (built once), then igrpo.py's training
    on it."""
    cfg, given = parse_flags(argv)
    igrpo.check_config(cfg)  # before the warm start spends minutes
    if cfg.model:
        fail(f"--model {cfg.model}: the toy world trains its own model; run igrpo.py to train "
             "yours")
    return igrpo.train(prepare(cfg, given))


def fail(message):
    raise SystemExit(f"toy: error: {message}")


def parse_flags(argv=None, prog="toy.py", description=None):
    """(a ToyConfig with the toy's settings as defaults, the names of the settings the command line
    gave): igrpo.py's flags, plus --right-drafts."""
    parser = igrpo.config_parser(ToyConfig, prog=prog, description=description or (
        "The offline toy world: a tiny model trained with igrpo.py on two-digit additions. "
        "`python toy.py compare --help` and `python toy.py explain --help` show the others."))
    parser.set_defaults(**SETTINGS, output_dir="runs/toy-<algo>-seed<seed>")
    argv = sys.argv[1:] if argv is None else argv
    cfg = ToyConfig(**vars(parser.parse_args(argv)))
    given = {action.dest for action in parser._actions for option in action.option_strings
             for arg in argv if arg == option or arg.startswith(option + "=")}
    return cfg, given


# ----------------------------------------------------------------------------------------------
# One step, shown: `python toy.py explain` takes step 1 of `python toy.py` (same flags) with
# igrpo.py's own functions, called in the order igrpo.train calls them, and prints every quantity:
# the drafts and d*, the Stage-2 prompt, rewards and advantages, per-token ratios, the update.
# It trains nothing to disk: no run folder, no checkpoint.
# ----------------------------------------------------------------------------------------------
SHOWN_PROBLEMS = 3  # problems of the batch shown in full
SHOWN_TOKENS = 24   # a longer completion shows its first and last tokens only
SCREEN_WIDTH = 100  # the printout reads in a terminal this wide: longer text is cut or wrapped
PROMPT_WIDTH = 92   # the Stage-2 prompt is wrapped at this width, under its margin
ALGO_NAMES = dict(igrpo="iGRPO", grpo="GRPO")
LINE_START, WRAPPED = "\u2502", "\u250a"  # the prompt's lines, and the pieces of a wrapped one


def explain(argv=None, judge=None):
    """python toy.py explain [igrpo.py flags] [--markdown PATH]: one step on the toy, printed.
    With --markdown and no --algo: the iGRPO step, then the GRPO step. Returns each step's
    numbers. judge: as igrpo.train's (for --reward judge)."""
    argv = sys.argv[2:] if argv is None else list(argv)
    cfg, given, markdown = explain_settings(argv)
    algos = [cfg.algo] if markdown is None or "algo" in given else ["igrpo", "grpo"]
    records, texts = [], []
    for algo in algos:
        lines = []

        def say(text=""):
            text = wrapped_to_screen(text.rstrip())
            print(text, flush=True)
            lines.append(text)
        records.append(explain_step(dataclasses.replace(cfg, algo=algo),
                                    run_command(argv, algo, cfg), say, judge))
        texts.append("\n".join(lines))
    if markdown:
        write_explanation(Path(markdown), argv, cfg, algos, texts)
        print(f"written: {markdown}")
    return records


def wrapped_to_screen(text, width=SCREEN_WIDTH):
    """A line of prose over the screen's width, wrapped under its own indent."""
    if len(text) <= width:
        return text
    indent = " " * (len(text) - len(text.lstrip()) + 2)
    return textwrap.fill(text, width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def explain_settings(argv):
    """(the toy's config, the flags given, the --markdown path): igrpo.py's flags, the toy's
    settings over the others, as `python toy.py` sets them; the warm start built if missing."""
    parser = argparse.ArgumentParser(
        prog="toy.py explain", description="One GRPO or iGRPO step on the toy, every number "
        "printed; other flags are igrpo.py's (--algo grpo, --beta 0.04, --loss dapo, --seed 1)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the printout there")
    args, flags = parser.parse_known_args(argv)
    cfg, given = parse_flags(flags, prog="toy.py explain")
    igrpo.check_config(cfg)
    if cfg.model:
        fail(f"--model {cfg.model}: the toy world explains its own model")
    return prepare(cfg, given), given, args.markdown


def explain_step(cfg, command, say, judge=None):
    """igrpo.train's set-up and first step, call for call, each quantity said as it comes. The
    held-out scoring a run does first is left out: it changes nothing that training samples."""
    cfg = dataclasses.replace(cfg, eval_dataset="")
    igrpo.check_config(cfg, judge)
    problems, _, policy, parts = igrpo.set_up(cfg, igrpo.Parts(judge=judge), None)
    say_settings(say, cfg, command)
    batch, _ = igrpo.next_batch(problems, [], cfg)
    rollout = igrpo.sample_and_score(batch, policy, cfg, parts)
    advantages, trained = igrpo.step_advantages(rollout.rewards.total, rollout.per_group, cfg)
    shown = problems_to_show(rollout, batch)
    cases = "a group whose rewards differ, one that agrees"
    cases += ", a wrong d*" if rollout.best_drafts else ""
    say(f"  shown: problem{'s' * (len(shown) > 1)} {', '.join(str(i + 1) for i in shown)} of "
        f"{len(batch)} (each case first found: {cases}); the batch's numbers count them all")
    for i in shown:
        say_problem(say, rollout, batch, i, advantages, policy.tokenizer, cfg,
                    first=i == shown[0])
    record = say_batch(say, rollout, batch, advantages, trained, cfg)
    row = refinement_to_show(rollout, advantages, trained, shown)
    before = token_view(policy, parts, rollout.sequences, row, cfg)
    for param_group in policy.optimizer.param_groups:
        param_group["lr"] = igrpo.learning_rate(0, cfg)
    update = igrpo.policy_update(policy, rollout.sequences, advantages, trained, cfg, parts)
    logged = igrpo.step_metrics(1, rollout, trained, update, 1.0, cfg, parts.world)
    after = token_view(policy, parts, rollout.sequences, row, cfg)
    say_tokens(say, rollout, row, advantages, trained, before, after, policy.tokenizer, cfg)
    say_update(say, logged, policy.optimizer.param_groups[0]["lr"], cfg)
    update = {k: logged[k] for k in ("loss", "clip_frac", "kl", "entropy", "grad_norm")}
    return dict(record, **update, lr=policy.optimizer.param_groups[0]["lr"])


def drafts_by_problem(rollout, cfg):
    """Stage 1's rewards, (B, N): a row of drafts per problem (None for GRPO)."""
    drafts = rollout.draft_rewards
    return None if drafts is None else drafts.total.view(-1, cfg.num_drafts)


def problems_to_show(rollout, batch):
    """Up to SHOWN_PROBLEMS problems, each case first found: a group whose rewards differ, a group
    that agrees, a wrong d*; then the batch's first problems."""
    groups = rollout.rewards.total.view(-1, rollout.per_group)
    agrees = (groups.amax(1) == groups.amin(1)).tolist()
    cases = [[not agree for agree in agrees], agrees]
    if rollout.best_drafts is not None:
        cases.append([not igrpo.math_reward(draft, problem["answer"])
                      for draft, problem in zip(rollout.best_drafts, batch)])
    shown = []
    for case in cases + [[True] * len(agrees)] * SHOWN_PROBLEMS:
        shown += [i for i, hit in enumerate(case) if hit and i not in shown][:1]
    return sorted(shown[:SHOWN_PROBLEMS])


# ----- the printout: each problem's stages, the batch, one refinement's tokens, the update -----
def rule(title, width=SCREEN_WIDTH):
    """A section's title line, as wide as the screen."""
    return f"\u2500\u2500 {title} ".ljust(width, "\u2500")


def number(value):
    """A reward, an advantage, a probability: 4 significant digits, no trailing noise."""
    return f"{value:.4g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.1e}"


def quoted(text, width):
    """A completion on one line in at most width characters, quotes included: a long one is cut,
    with a marker that says how much."""
    text = text.replace("\n", "\u21b5")
    if len(text) + 2 <= width:
        return f'"{text}"'
    keep = max(0, width - 2 - len(f"\u2026[+{len(text)} chars]"))
    return f'"{text[:keep]}\u2026[+{len(text) - keep} chars]"'


def sample_line(head, reward, text, advantage=None):
    """A draft's or a group member's line: its reward, final answer, advantage, text (cut)."""
    answer = str(igrpo.extract_answer(text))
    answer = answer if len(answer) <= 8 else answer[:7] + "\u2026"
    line = f"    {head}  reward {number(reward):<5} answer {answer:<8} "
    line += "" if advantage is None else f"A {advantage:+.3f}  "
    return line + quoted(text, SCREEN_WIDTH - len(line))


def say_settings(say, cfg, command):
    say(f"One {ALGO_NAMES[cfg.algo]} step on the toy, seed {cfg.seed}: step 1 of `{command}`, by "
        "igrpo.py's own functions (same problems, samples and numbers as that run's step 1)")
    warm = Path(cfg.model).parent / "toy.json"
    start = json.loads(warm.read_text()) if warm.is_file() else {}
    model = os.path.relpath(cfg.model, Path(__file__).resolve().parent)
    say(f"  model: {model}" + (f" (warm start: {start['warm_start_steps']} steps, "
        f"{start['calibration_accuracy']:.1%} calibration accuracy)" if start else ""))
    per_problem = (f"{cfg.num_drafts} drafts + {cfg.group_size - cfg.num_drafts} refinements"
                   if cfg.algo == "igrpo" else f"{cfg.group_size} completions")
    say(f"  {cfg.prompts_per_step} problems per step, each {per_problem} (--group-size "
        f"{cfg.group_size}); temperature {cfg.temperature:g}, at most "
        f"{cfg.max_completion_tokens} tokens each")
    low, high = clip_range(cfg)
    say(f"  --loss {cfg.loss} (r clipped to [{1 - low:g}, {1 + high:g}]), --beta {cfg.beta:g}, "
        f"--ppo-epochs {cfg.ppo_epochs}, --lr {cfg.lr:g} (peak), --reward {cfg.reward}"
        + (f", --format-weight {cfg.format_weight:g}" if cfg.format_weight else ""))


def run_command(argv, algo, cfg):
    """The command whose first step this is: explain's flags, less --markdown (plus --algo
    grpo for the GRPO half of a --markdown file)."""
    flags, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--markdown"):
            skip = arg == "--markdown"
            continue
        flags.append(arg)
    if algo != cfg.algo:
        flags += ["--algo", algo]
    return " ".join(["python toy.py", *flags])


def clip_range(cfg):
    default_low, default_high = igrpo.CLIP_DEFAULTS[cfg.loss]
    return cfg.clip_eps_low or default_low, cfg.clip_eps_high or default_high


def say_problem(say, rollout, batch, i, advantages, tokenizer, cfg, first):
    problem = batch[i]
    say()
    say(rule(f"Problem {i + 1} of {len(batch)}: {problem['problem']}   gold answer: "
             f"{problem['answer']}"))
    if rollout.drafts is not None:
        say_drafts(say, rollout, batch, i, tokenizer, cfg)
        say_refinement_prompt(say, rollout.prompts[i], tokenizer, cfg, first)
    say_group(say, rollout, i, advantages, cfg)


def say_drafts(say, rollout, batch, i, tokenizer, cfg):
    N, gold = cfg.num_drafts, batch[i]["answer"]
    rewards = drafts_by_problem(rollout, cfg)[i].tolist()
    say(f"  Stage 1: {N} drafts of q, sampled without gradient, scored with the training reward")
    for k in range(N):
        text = rollout.drafts.texts[i * N + k]
        say(sample_line(f"draft {k + 1}", rewards[k], text))
    best = max(rewards)
    chosen, ties = rewards.index(best), [k + 1 for k, r in enumerate(rewards) if r == best]
    why = f"the first of the best (reward {number(best)}" + (
        f"; drafts {', '.join(map(str, ties))} tie)" if len(ties) > 1 else ")")
    right = [igrpo.math_reward(rollout.drafts.texts[i * N + k], gold) for k in range(N)]
    if not any(right):
        why += ": no draft is right, and the best one is used anyway"
    elif not igrpo.math_reward(rollout.best_drafts[i], gold):
        why += ": d* is wrong (the reward ranked it first), and it is used anyway"
    say(f"  d* = draft {chosen + 1}, {why}")
    chosen_text = rollout.drafts.texts[i * N + chosen]
    length = len(tokenizer(chosen_text, add_special_tokens=False).input_ids)
    cut = (f"over --max-draft-tokens {cfg.max_draft_tokens}: it lost its first "
           f"{length - cfg.max_draft_tokens} tokens" if length > cfg.max_draft_tokens else
           f"within --max-draft-tokens {cfg.max_draft_tokens}: not cut")
    say(f"  d* is {length} tokens, {cut}")


def say_refinement_prompt(say, prompt, tokenizer, cfg, first):
    """q' = q + d*, every character as the model reads it (the system prompt once)."""
    tokens = igrpo.encode(tokenizer, [prompt], cfg).input_ids.shape[1]
    say(f"  Stage-2 prompt q' = q + d* through REFINE_TEMPLATE, exactly as the model reads it "
        f"({tokens} tokens):")
    if first:
        say(f"  ({LINE_START} starts a line of the prompt, {WRAPPED} continues one wrapped here)")
    elif igrpo.SYSTEM_PROMPT in prompt:
        prompt = prompt.replace(igrpo.SYSTEM_PROMPT, "[the system prompt, as above]")
    for line in prompt.split("\n"):
        for k, piece in enumerate(wrapped_exactly(line, PROMPT_WIDTH)):
            say(f"    {WRAPPED if k else LINE_START} {piece}".rstrip())


def wrapped_exactly(line, width):
    """Pieces of at most width characters, cut after a space where one is; joined: the line."""
    pieces = []
    while len(line) > width:
        cut = line.rfind(" ", 0, width) + 1 or width
        pieces.append(line[:cut])
        line = line[cut:]
    return pieces + [line]


def say_group(say, rollout, i, advantages, cfg):
    G = rollout.per_group
    rows = range(i * G, (i + 1) * G)
    rewards = rollout.rewards.total[i * G:(i + 1) * G]
    what = ("refinements of q', with gradient" if cfg.algo == "igrpo" else
            "completions of q, the group, with gradient")
    say(f"  {'Stage 2: ' if cfg.algo == 'igrpo' else ''}{G} {what}; advantage A over these {G}")
    label = "refinement" if cfg.algo == "igrpo" else "completion"
    for k, row in enumerate(rows):
        text = rollout.sequences.texts[row]
        say(sample_line(f"{label} {k + 1}", rewards[k].item(), text, advantages[row].item()))
    mean, std = rewards.mean().item(), rewards.std(correction=0).item()
    if rewards.amax() == rewards.amin():
        dropped = ("--loss dapo drops it from the batch" if cfg.loss == "dapo" else
                   "it still counts in the loss's average over completions")
        say(f"  the group agrees (every reward {number(mean)}): std 0, so every A = 0 and this "
            f"problem adds no gradient; {dropped}")
    elif cfg.loss == "dr_grpo":
        say(f"  mean {number(mean)}: A = R - {number(mean)} (Dr. GRPO: not divided by the std)")
    else:
        say(f"  mean {number(mean)}, std {number(std)}: A = (R - {number(mean)}) / "
            f"{number(std)}")


def say_batch(say, rollout, batch, advantages, trained, cfg):
    """The batch's numbers, as the run logs them; returns them."""
    rewards, G = rollout.rewards.total, rollout.per_group
    agree = int((~igrpo.informative_groups(rewards, G)).sum()) // G
    record = dict(algo=cfg.algo, reward=rewards.mean().item(),
                  accuracy=rollout.rewards.accuracy.mean().item(), texts=rollout.sequences.texts,
                  rewards=rewards.tolist(), advantages=advantages.tolist(), draft_reward=None,
                  best_draft_reward=None, dropped_groups=int((~trained).sum()) // G)
    say()
    say(rule(f"The batch: {len(batch)} problems x {G} = {len(rewards)} trained sequences"))
    drafts = drafts_by_problem(rollout, cfg)                                       # (B, N)
    if drafts is not None:
        record.update(draft_reward=drafts.mean().item(),
                      best_draft_reward=drafts.amax(1).mean().item(),
                      drafts=rollout.drafts.texts, draft_rewards=drafts.tolist(),
                      best_drafts=rollout.best_drafts)
        say(f"  drafts: mean reward {number(record['draft_reward'])} (metrics.jsonl "
            f"draft_reward); best drafts {number(record['best_draft_reward'])} "
            "(best_draft_reward)")
    say(f"  {'refinements' if cfg.algo == 'igrpo' else 'completions'}: mean reward "
        f"{number(record['reward'])} (reward), right {number(record['accuracy'])} (accuracy)")
    say(f"  groups that agree: {agree} of {len(batch)}, their {agree * G} sequences get "
        f"A = 0" + (f"; --loss dapo trains on the other {int(trained.sum())}"
                    if cfg.loss == "dapo" else ""))
    return record


def refinement_to_show(rollout, advantages, trained, shown):
    """The first trained sequence of the shown problems whose advantage is not 0 (else the
    first)."""
    G = rollout.per_group
    rows = [row for i in shown for row in range(i * G, (i + 1) * G)]
    moving = [row for row in rows if advantages[row] != 0 and trained[row]]
    return (moving or rows)[0]


def token_view(policy, parts, samples, row, cfg):
    """(token ids, log pi, log pi_ref or None, mask) of one sequence, each (1, T), from
    igrpo.no_grad_logprobs: the pass policy_update makes for pi_old and pi_ref."""
    rows = torch.tensor([row], device=samples.input_ids.device)
    input_ids, _, prompt_length, mask = igrpo.micro_batch(samples, rows)
    logp = igrpo.no_grad_logprobs(policy.model, samples, [(rows, None)], cfg, parts)[0]
    ref = policy.reference and igrpo.no_grad_logprobs(policy.reference, samples,
                                                      [(rows, None)], cfg, parts)[0]
    return input_ids[:, prompt_length:], logp, ref, mask


def token_terms(logp, old_logp, ref_logp, advantage, mask, t, cfg):
    """(loss term, clip active, k3 KL) of token t, from igrpo.policy_loss on that token alone
    (GSPO's ratio is the sequence's: its clip is judged on the whole mask)."""
    only = torch.zeros_like(mask)
    only[0, t] = True
    ratio_mask = mask if cfg.loss == "gspo" else only
    term, clipped, _ = igrpo.policy_loss(logp, old_logp, advantage, ratio_mask, only.float(), cfg,
                                         ref_logp)
    _, _, kl = igrpo.policy_loss(logp, old_logp, advantage, only, only.float(), cfg, ref_logp)
    return term.item(), bool(clipped), kl.item()


def say_tokens(say, rollout, row, advantages, trained, before, after, tokenizer, cfg):
    """One trained sequence token by token: log-prob, ratio, clip, KL, its loss term; and the
    same tokens after the update (what a next epoch, or step, would see)."""
    ids, logp, ref, mask = before
    new_logp, G = after[1], rollout.per_group
    advantage, length = advantages[row:row + 1], int(mask.sum())
    label = "refinement" if cfg.algo == "igrpo" else "completion"
    say()
    say(rule(f"One {label}, token by token: problem {row // G + 1}, {label} {row % G + 1} "
             f"(A = {advantage.item():+.3f}, {length} tokens)"))
    low, high = clip_range(cfg)
    say(f"  log pi: log-prob of the token at temperature {cfg.temperature:g} "
        "(igrpo.token_logprobs); r = pi_theta / pi_old")
    say(f"  term = -min(r A, clip(r, {1 - low:g}, {1 + high:g}) A) + beta KL (igrpo.policy_loss); "
        "KL = k3 to the reference")
    with_kl = ref is not None
    say(f"  {'t':>3}  {'token':<11} {'log pi':>8} {'p':>6} {'r':>7} {'clip':<4}"
        + (f" {'KL':>7}" if with_kl else "") + f" {'term':>8} | {'p after':>7} {'r after':>8} "
        f"{'clip':<4}" + (f" {'KL after':>8}" if with_kl else ""))
    shown = list(range(length))
    if length > SHOWN_TOKENS:
        shown = shown[:SHOWN_TOKENS - 8] + [None] + shown[-8:]
    for t in shown:
        if t is None:
            say("    \u2026")
            continue
        term, clipped, kl = token_terms(logp, logp, ref, advantage, mask, t, cfg)
        _, clipped_after, kl_after = token_terms(new_logp, logp, ref, advantage, mask, t, cfg)
        ratio = 1.0  # pi_old is this very policy: logp.detach() (one epoch) or a frozen pass of it
        say(f"  {t + 1:>3}  {token_text(tokenizer, ids[0, t]):<11} {logp[0, t]:8.4f} "
            f"{math.exp(logp[0, t]):6.3f} {ratio:7.4f} {'yes' if clipped else 'no':<4}"
            + (f" {kl:7.1e}" if with_kl else "") + f" {term:+8.4f} | "
            f"{math.exp(new_logp[0, t]):7.3f} {math.exp(new_logp[0, t] - logp[0, t]):8.5f} "
            f"{'yes' if clipped_after else 'no':<4}" + (f" {kl_after:8.1e}" if with_kl else ""))
    say_ratio_notes(say, rollout, row, trained, logp, new_logp, advantage, mask, ref, cfg)


def token_text(tokenizer, token_id):
    """A token as text, quoted; special tokens (the stop token, trained too) by name."""
    if int(token_id) in tokenizer.all_special_ids:
        return tokenizer.convert_ids_to_tokens(int(token_id))[:11]
    text = tokenizer.decode([int(token_id)]).replace("\n", "\u21b5")
    return f'"{text if len(text) <= 9 else text[:8] + chr(0x2026)}"'


def say_ratio_notes(say, rollout, row, trained, logp, new_logp, advantage, mask, ref, cfg):
    """Why r is 1, where the clip acts, this sequence's share of the loss, the KL."""
    epochs = cfg.ppo_epochs
    if epochs == 1:
        say("  r = 1 exactly: with one PPO epoch pi_old is the policy being updated "
            "(logp.detach() in igrpo.policy_update), so the clip never acts and the gradient "
            "of -r A is -A grad log pi.")
    else:
        later = "epoch 2 sees" if epochs == 2 else f"epochs 2 to {epochs} see"
        say(f"  r = 1 in epoch 1 (pi_old, a frozen pass, is this same policy); {later} r move, and "
            "clip_frac below counts the tokens clipped there.")
    say(f"  After the update ({epochs} AdamW step{'s' if epochs > 1 else ''}): r = pi_new / "
        "pi_old of the same tokens; 'yes' where a next epoch's clip would act (A pushes r out).")
    if cfg.loss == "gspo":
        sequence_ratio = ((new_logp - logp) * mask).sum() / mask.sum()
        say(f"  GSPO clips one ratio per sequence, exp(mean log r): {sequence_ratio.exp():.6f} "
            "after the update")
    rows = trained.nonzero().squeeze(1).tolist()
    if row in rows:
        weights = igrpo.loss_weights(rollout.sequences.completion_mask[rows], cfg.loss,
                                     cfg.max_completion_tokens, igrpo.World())
        weights = weights[rows.index(row), :mask.shape[1]]
        terms = [token_terms(logp, logp, ref, advantage, mask, t, cfg)[0]
                 for t in range(int(mask.sum()))]
        share = sum(term * weight for term, weight in zip(terms, weights.tolist()))
        say(f"  each term weighs {number(weights[0].item())} (--loss {cfg.loss}: "
            f"{WEIGHT_RULES[cfg.loss]}): this sequence adds {share:+.5f} to the loss")
    else:
        say("  this sequence's group agrees: --loss dapo drops it, it adds nothing to the loss")
    if ref is None:
        say("  no KL: --beta 0 (the paper's), so no reference model is loaded")
    else:
        say(f"  KL: the reference is the warm start, which the policy still is at step 1: KL = 0 "
            f"now; after the update it is the next step's penalty (x --beta {cfg.beta:g})")


WEIGHT_RULES = dict(grpo="1 / (its tokens x completions in the batch)",
                    gspo="1 / (its tokens x completions in the batch)",
                    dapo="1 / (tokens in the batch)",
                    dr_grpo="1 / (--max-completion-tokens x completions in the batch)")


def say_update(say, update, lr, cfg):
    say()
    say(rule("The update: igrpo.policy_update, one AdamW step per epoch on the fp32 master "
             "weights"))
    say(f"  loss       {update['loss']:+.6g}  (metrics.jsonl loss)")
    say(f"             {loss_note(cfg)}")
    norm, limit = update["grad_norm"], cfg.max_grad_norm
    last = ", the mean over the epochs" if cfg.ppo_epochs > 1 else ""
    say(f"  grad norm  {norm:.6g}  (grad_norm{last}), before clipping to --max-grad-norm "
        f"{limit:g}: " + (f"scaled down to {limit:g}" if norm > limit else "used as it is"))
    warmup = max(1, round(cfg.warmup_ratio * cfg.steps))
    schedule = (f"the first of {warmup} warm-up steps: {cfg.lr:g} x 1/{warmup}" if warmup > 1
                else "the peak: --warmup-ratio x --steps rounds to 1 warm-up step")
    say(f"  lr         {lr:.6g}  (lr) = igrpo.learning_rate(0): {schedule}")
    entropy = "n/a" if update["entropy"] is None else f"{update['entropy']:.4f}"
    kl = "" if update["kl"] is None else f", kl {update['kl']:.3g} (mean k3 per token)"
    say(f"  clip_frac  {update['clip_frac']:.4g}, entropy {entropy} nats per token{kl}")


def loss_note(cfg):
    """Why the loss has the value it has."""
    if cfg.ppo_epochs > 1:
        return f"the mean over {cfg.ppo_epochs} epochs; from epoch 2, r moves away from 1"
    if cfg.loss in ("grpo", "gspo"):
        return ("= -(1/B) sum_j A_j at r = 1 (B: completions): each group's A sum to 0, so the "
                "loss is 0 up to rounding; its gradient, -(1/B) sum_j A_j grad mean_t log "
                "pi(o_jt), is not")
    return (f"= -sum_j A_j |o_j| x the weight of --loss {cfg.loss} at r = 1: longer completions "
            "weigh more, so it need not be 0")


def write_explanation(path, argv, cfg, algos, texts):
    """The printout as a markdown page that says which command wrote it."""
    command = " ".join(["python toy.py explain", *argv])
    names = " and one ".join(ALGO_NAMES[algo] for algo in algos)
    shown = " and ".join(f"`{run_command(argv, algo, cfg)}`" for algo in algos)
    intro = (f"Written by `{command}`, on the cached toy warm start (built first if missing); that "
             f"command writes this page again. Each step is step 1 of {shown}, taken by igrpo.py's "
             "own functions: the same problems, samples and numbers as that run's step 1 in its "
             "metrics.jsonl, on this machine. Other machines and torch versions sample other "
             "completions.")
    intro = textwrap.fill(intro, SCREEN_WIDTH, break_long_words=False, break_on_hyphens=False)
    page = [f"# One {names} step, every number", "", intro, ""]
    for algo, text in zip(algos, texts):
        page += [f"## {ALGO_NAMES[algo]}", "", "```text", text, "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(page))

if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        compare(sys.argv[2:])
    elif sys.argv[1:2] == ["explain"]:
        explain(sys.argv[2:])
    else:
        main()
