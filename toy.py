"""
The offline toy world: a tiny model that half-knows arithmetic, trained by igrpo.py without a
download.

RL needs a policy that is sometimes right, so the toy builds one locally (no download): a byte-level
BPE tokenizer trained on the toy's own text, a small Llama-style model from a config, and a
supervised warm start on synthetic problems ("What is 47 + 38?") solved in written column steps
(" 7 + 8 = 15. 4 + 3 + 1 = 8. \\boxed{85}"), in the same prompt format that igrpo.py trains with.
Half the warm-start examples are refinement prompts whose draft solves the *same* problem, right
(keep it) or with one wrong step (fix it), so refinement is a skill the model has and iGRPO can
improve. The warm start stops on a measurement, not a step count: when single-pass accuracy on
calibration problems (training problems) enters CALIBRATION_BAND, so every machine starts RL from
the same place. Each seed's starting point is cached: only the first run pays for it. Everything
here exists only to give igrpo.py something real to train offline.

    python toy.py                        # the default job: iGRPO on the toy (flags: igrpo.py's)
    python toy.py compare --seeds 0 1 2  # GRPO vs iGRPO on the toy, 3 seeds each: table + figure

The launcher lives here, not in igrpo.py, so imports point one way: toy.py uses igrpo.py, never
back.
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import sys
import time
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
                lr=1e-4, warmup_ratio=0.05,
                max_prompt_tokens=256, max_completion_tokens=32, max_draft_tokens=32,
                micro_batch_size=128, gradient_checkpointing=False, chat_template="off",
                eval_limit=300, eval_samples=2)


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


def warm_start_examples(problems, tokenizer, cfg, rng):
    """(prompt, completion) pairs: each problem plainly, and as a refinement prompt whose draft is
    of the same problem, right or with one wrong step. The target is always the right solution:
    keep it, or fix it."""
    examples = []
    for p in problems:
        draft = solution(p["terms"]) if rng.random() < 0.5 else wrong_draft(p["terms"], rng)
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
    bar = tqdm(range(1, max_steps + 1), desc="toy warm start", dynamic_ncols=True)
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
            bar.set_postfix(loss=f"{loss.item():.3f}", calibration=f"{accuracy:.2f}")
            if accuracy >= band[0]:
                bar.close()
                if accuracy > band[1]:
                    print(f"toy: warning: calibration accuracy {accuracy:.2f} "
                          f"jumped past the band {band}")
                return step, accuracy, loss.item()
    bar.close()
    igrpo.fail(f"toy: the warm start did not reach {band[0]:.0%} calibration accuracy "
               f"in {max_steps} steps (last {accuracy:.0%}); "
               f"delete {cache_root()} and report this machine's torch version")


def build(folder, cfg, seed=0, **warm_start_options):
    """Write folder/model (tokenizer + warm-started model), train.jsonl, test.jsonl and toy.json
    (last), all into a temporary folder renamed to `folder` at the end: a killed build never looks
    complete."""
    rng = random.Random(seed)
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
        model, tokenizer, warm_start_examples(train, tokenizer, cfg, rng), rng,
        lambda m: igrpo.held_out_accuracy(m, tokenizer, calibration, probe),
        **warm_start_options)
    record = dict(seed=seed, warm_start_steps=steps, calibration_accuracy=accuracy,
                  final_loss=loss, seconds=round(time.time() - started, 1),
                  calibration_problems=len(calibration),
                  band=list(warm_start_options.get("band", CALIBRATION_BAND)))
    print(f"toy: warm start stopped after {steps} steps ({record['seconds']:.0f}s) "
          f"at {accuracy:.1%} calibration accuracy, loss {loss:.3f}")
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    igrpo.save(model, tokenizer, partial / "model")
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


def cache_folder(seed=0):
    """Keyed by the code and settings that build the toy, igrpo's prompts and the seed: change any
    and the toy is built anew."""
    builders = (make_problems, solution, wrong_draft, warm_start_examples, build_tokenizer,
                build_model, supervised_loss, warm_start, build)
    code = [inspect.getsource(f) for f in builders]
    settings = repr((MODEL_SIZE, CALIBRATION_BAND, CALIBRATION_PROBLEMS, CHECK_EVERY,
                     MAX_WARM_START_STEPS, SETTINGS))
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
    extra = sorted(given - {"algo", "seed", "output_dir"} - igrpo.RESUMABLE_CHANGES)
    parts = [f"toy-{cfg.algo}-seed{cfg.seed}"]
    parts += [f"{name.replace('_', '-')}-{getattr(cfg, name)}" for name in extra]
    return str(Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)))


def prepare(cfg, given):
    """The toy's settings over the user's unset flags, and this seed's cached starting point (built
    once)."""
    cfg = dataclasses.replace(cfg, **{k: v for k, v in SETTINGS.items() if k not in given})
    if "output_dir" not in given:
        cfg = dataclasses.replace(cfg, output_dir=run_folder(cfg, given))
    cache = cache_folder(cfg.seed)
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
    """final/ is saved after the last held-out score is logged."""
    return (folder / "metrics.jsonl").is_file() and (folder / "final").is_dir()


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
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "compare.json"
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
    if recorded is not None and recorded["flags"] != flags:
        previous = " ".join(recorded["flags"]) or "none"
        igrpo.fail(f"{out} holds a comparison run with other flags ({previous}): "
                   "give another --output-dir")
    record_path.write_text(json.dumps(dict(flags=flags)))
    for seed in args.seeds:
        for algo in ALGOS:
            folder = out / f"{algo}-seed{seed}"
            if finished(folder):
                print(f"toy compare: {folder} is done, kept")
                continue
            print(f"toy compare: {algo}, seed {seed} -> {folder}")
            # a run stopped by Ctrl-C goes on from its checkpoint; one killed before any starts over
            again = ["--resume"] if any(folder.glob("step-*/trainer_state.pt")) else ["--overwrite"]
            main(flags + ["--algo", algo, "--seed", str(seed), "--output-dir", str(folder)] + again)
    table = comparison_table(out, args.seeds)
    (out / "table.md").write_text(table)
    print(table)
    starts = [json.loads((cache_folder(seed) / "toy.json").read_text()) for seed in args.seeds]
    print("warm starts: " + ", ".join(f"seed {s['seed']}: {s['warm_start_steps']} steps, "
                                      f"{100 * s['calibration_accuracy']:.1f}%" for s in starts))
    import plot
    runs = [out / f"{algo}-seed{seed}" for algo in ALGOS for seed in args.seeds]
    print(f"figure: {plot.plot_training(runs, out / 'compare.png')}")


def main(argv=None):
    """python toy.py [igrpo.py flags]: this seed's toy world (built once), then igrpo.py's training
    on it."""
    cfg, given = igrpo.parse_args(argv)
    igrpo.check_config(cfg)  # before the warm start spends minutes
    if cfg.model:
        igrpo.fail(f"--model {cfg.model}: the toy world trains its own model; "
                   "run igrpo.py to train yours")
    return igrpo.train(prepare(cfg, given))


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        compare(sys.argv[2:])
    else:
        main()
