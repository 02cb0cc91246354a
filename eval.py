"""
eval.py: the iGRPO paper's evaluation protocol, for a checkpoint of igrpo.py or any causal LM.

Single pass from the original prompt (no drafts at test time), temperature 0.6, top-p 0.95, k
samples per problem (64 for AIME24/25, 8 for the rest). Reports, per benchmark:
  avg@k   mean accuracy over all k samples: the paper's "pass@1 averaged over k"
  pass@k  the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), n samples of which
          c correct
  maj@k   accuracy of the majority answer, equivalent spellings counted as one answer
and the no-answer rate and mean completion tokens. Prompts and the answer checker are igrpo.py's
own. The printed table gives accuracies and rates in percent; summary.json and the per-benchmark
rows keep them as fractions (0.5 for 50%).

    python eval.py --model runs/toy-igrpo-seed0/final --benchmarks gsm8k,math500 --limit 20 --k 2
    python eval.py --model runs/toy-igrpo-seed0 --benchmarks aime24   # a run folder: its final/
    python eval.py --model runs/toy-igrpo-seed0/final --benchmarks my_problems.jsonl \
        --refine-rounds 1

A rerun with the same --output-dir and settings resumes: problems already in
OUTPUT_DIR/<benchmark>.jsonl (the same problem and answer at the same index) are skipped; other
settings (model, k, temperature, budget, ...), or a file holding another benchmark's problems, are
refused. Nothing is written before the first completion, and rows are appended as they finish: a
kill or Ctrl-C keeps every finished problem, and the same command resumes. summary.json holds every
benchmark evaluated in the folder, a later run's beside the earlier ones.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import igrpo
import scale

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"  # the six benchmark files, shipped with the code (data/README.md)
# name: (file in --data-dir, hub dataset, hub config, hub split, samples per problem in the paper)
BENCHMARKS = {
    "aime24": ("aime24.jsonl", "HuggingFaceH4/aime_2024", "", "train", 64),
    "aime25": ("aime25.jsonl", "math-ai/aime25", "", "test", 64),
    "amc23": ("amc23.jsonl", "math-ai/amc23", "", "test", 8),
    "math500": ("math500.jsonl", "HuggingFaceH4/MATH-500", "", "test", 8),
    "gsm8k": ("gsm8k_test.jsonl", "openai/gsm8k", "main", "test", 8),
    "minerva": ("minerva_math.jsonl", "math-ai/minervamath", "", "test", 8),
}


def pass_at_k(n, c, k):
    """Probability that at least one of k samples drawn without replacement from n (c correct) is
    correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(extracted, gold):
    """Vote over extracted answers, equivalent spellings pooled; the first-seen answer wins a
    tie."""
    clusters = []  # [representative, votes]
    for answer in extracted:
        if answer is None:
            continue
        cluster = next((c for c in clusters if igrpo.answers_match(answer, c[0])), None)
        if cluster:
            cluster[1] += 1
        else:
            clusters.append([answer, 1])
    if not clusters:
        return False
    winner = max(clusters, key=lambda c: c[1])  # max keeps the first of equal counts
    return igrpo.answers_match(winner[0], gold)


def resolve(name, data_dir):
    """A benchmark name -> (path or hub name, hub config, split, paper k)."""
    if name in BENCHMARKS:
        file, hub, config, split, k = BENCHMARKS[name]
        local = Path(data_dir) / file if data_dir else None
        return (str(local), "", "test", k) if local and local.is_file() else (hub, config, split, k)
    if name.endswith(".jsonl") or Path(name).exists():
        if not Path(name).is_file():
            igrpo.fail(f"--benchmarks: no such file: {name}")
        return name, "", "test", 8
    igrpo.fail(f"--benchmarks: unknown benchmark {name!r}; "
               f"use one of {', '.join(BENCHMARKS)} or a .jsonl file")


def label(name):
    return name if name in BENCHMARKS else Path(name).stem


def grade(completion, gold, tokens):
    extracted = igrpo.extract_answer(completion)
    return dict(completion=completion, extracted=extracted,
                correct=igrpo.answers_match(extracted, gold), tokens=tokens)


def generate(model, tokenizer, prompts, k, cfg):
    """k samples of each prompt; --compile-generation (on by default on CUDA): scale.py's
    fixed-shape calls with a static KV cache."""
    sample = scale.compiled_sample if scale.compiles_generation(cfg, model.device) else \
        igrpo.sample
    samples = sample(model, tokenizer, prompts, cfg, per_prompt=k,
                     temperature=cfg.eval_temperature, top_p=cfg.eval_top_p)
    return samples.texts, samples.lengths.tolist()


@dataclass
class Benchmark:
    """One benchmark of this run: its problems, samples per problem, completions file, and the rows
    already there (a previous run's, then this run's as they finish)."""
    label: str
    source: str
    problems: list
    k: int
    path: Path
    done: dict

    def finished(self):
        return sum(index in self.done for index in range(len(self.problems)))


def check_names(names, data_dir):
    """Every benchmark name checked before anything loads; two never share a completions file."""
    for name in names:
        resolve(name, data_dir)
    for name in names:
        sharing = [other for other in names if label(other) == label(name)]
        if len(sharing) > 1:
            igrpo.fail(f"--benchmarks: {' and '.join(sharing)} would both write "
                       f"{label(name)}.jsonl in --output-dir; give the files different names")


def prepare(name, args, cfg, out):
    """A benchmark of this run, loaded (a name neither in --data-dir nor on the hub is one line
    naming both), with the rows a previous run left in its completions file."""
    source, hub_config, split, paper_k = resolve(name, args.data_dir)
    cfg.dataset_config, cfg.split = hub_config, split
    try:
        problems = igrpo.load_problems(source, cfg, flag="benchmarks", limit=args.limit)
    except SystemExit as error:
        if name not in BENCHMARKS or source != BENCHMARKS[name][1]:
            raise
        igrpo.fail(f"--benchmarks {name}: no {BENCHMARKS[name][0]} in --data-dir "
                   f"{args.data_dir or '(none given)'}, and from the hub: "
                   f"{str(error).removeprefix('igrpo: error: ')}")
    path = out / f"{label(name)}.jsonl"
    done = finished_rows(path, problems, source) if path.exists() else {}
    k = args.k if args.k is not None else paper_k
    return Benchmark(label(name), source, problems, k, path, done)


def finished_rows(path, problems, source):
    """Problems a previous run already wrote, each the same problem (text and gold answer) as this
    benchmark's at its index: a file name alone does not say which benchmark it holds. A last line
    cut short by a kill mid-write is redone."""
    rows, lines = {}, path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                igrpo.fail(f"{path}: line {number} is not valid JSON; "
                           "delete the file to redo this benchmark")
            print(f"{path}: the last line is cut short (a run killed mid-write?); "
                  "its problem is redone")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("index"), int) \
                or not {"problem", "answer"} <= row.keys():
            igrpo.fail(f"{path}: line {number} is not a row eval.py writes (index, problem, "
                       "answer); delete the file to redo this benchmark")
        index = row["index"]
        expected = problems[index] if index < len(problems) else row  # beyond --limit: unused
        if (row["problem"], row["answer"]) != (expected["problem"], expected["answer"]):
            igrpo.fail(f"{path}, line {number}: its problem {index + 1} "
                       f"({row['problem'][:40]!r}) is not {source}'s: the file holds another "
                       "benchmark's completions; use another --output-dir, or delete the file")
        rows[index] = row
    return rows


def mend_last_line(path):
    """Before appending: a last line cut short by a kill is dropped (finished_rows redoes its
    problem); a whole row that lost only its newline gets it back."""
    text = path.read_bytes() if path.exists() else b""
    if not text or text.endswith(b"\n"):
        return
    head, newline, last = text.rpartition(b"\n")
    try:
        json.loads(last)
    except json.JSONDecodeError:
        os.truncate(path, len(head) + len(newline))
        return
    with open(path, "ab") as file:
        file.write(b"\n")


def write_atomically(path, text):
    """Written beside, then renamed over: a kill leaves the old file or the new, never half."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def unanswered(problem, k, args):
    """A problem whose prompt fills the model's context: k empty completions, scored as no
    answer."""
    empty = [grade("", problem["answer"], 0) for _ in range(k)]
    return dict(index=problem["index"], problem=problem["problem"], answer=problem["answer"],
                samples=empty, refined=[empty] * args.refine_rounds, prompt_too_long=True)


def complete(model, tokenizer, chunk, k, args, cfg):
    """The rows of a chunk of problems: k graded samples each, and each refined args.refine_rounds
    times."""
    prompts = [igrpo.build_prompt(tokenizer, p["problem"], cfg) for p in chunk]
    texts, lengths = generate(model, tokenizer, prompts, k, cfg)
    rows = []
    for j, p in enumerate(chunk):
        row_span = slice(j * k, (j + 1) * k)  # problem j's k samples in texts and lengths
        samples = [grade(t, p["answer"], n) for t, n in zip(texts[row_span], lengths[row_span])]
        rows.append(dict(index=p["index"], problem=p["problem"], answer=p["answer"],
                         refined=[], samples=samples))
    previous = [s["completion"] for row in rows for s in row["samples"]]
    # beyond the paper: refine each sample with igrpo's template
    for _ in range(args.refine_rounds):
        drafts = [igrpo.cut_draft(tokenizer, text, cfg.max_draft_tokens) for text in previous]
        messages = [igrpo.refine_message(rows[i // k]["problem"], draft)
                    for i, draft in enumerate(drafts)]
        refine = [igrpo.build_prompt(tokenizer, message, cfg) for message in messages]
        previous, lengths = generate(model, tokenizer, refine, 1, cfg)
        for j, row in enumerate(rows):
            row_span = slice(j * k, (j + 1) * k)
            row["refined"].append([grade(t, row["answer"], n)
                                   for t, n in zip(previous[row_span], lengths[row_span])])
    return rows


def evaluate_benchmark(model, tokenizer, bench, args, cfg, folder):
    todo = [problem | {"index": i} for i, problem in enumerate(bench.problems)
            if i not in bench.done]
    context = igrpo.max_positions(model)
    too_long = [p for p in todo
                if context and igrpo.prompt_length(tokenizer, p["problem"], cfg) >= context]
    if too_long:
        print(f"{bench.label}: {len(too_long)} of {len(todo)} prompts fill the model's context "
              f"({context} positions): scored as unanswered")
        folder.append(bench, [unanswered(p, bench.k, args) for p in too_long])
    todo = [p for p in todo if p not in too_long]
    per_call = max(1, cfg.generation_batch_size // bench.k)
    with tqdm(total=len(todo), desc=bench.label, unit="problem", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), per_call):
            chunk = todo[start:start + per_call]
            folder.append(bench, complete(model, tokenizer, chunk, bench.k, args, cfg))
            bar.update(len(chunk))
    return summarize([bench.done[i] for i in range(len(bench.problems))], bench.k) | dict(
        source=bench.source)


# What a resumed run must share with the run it continues: everything that changes the completions.
RESUME_SETTINGS = ("model", "k", "temperature", "top_p", "max_completion_tokens", "refine_rounds",
                   "max_draft_tokens", "chat_template", "dtype", "seed")


def resume_settings(args):
    settings = {name: getattr(args, name) for name in RESUME_SETTINGS}
    if Path(args.model).exists():
        settings["model"] = str(Path(args.model).resolve())
    return settings


def check_resume(out, settings):
    """A rerun into the same --output-dir resumes only with the settings that wrote the completions
    there. A folder without completions is not a run: anything may start there. True for a run."""
    if not out.is_dir() or not any(path.stat().st_size for path in out.glob("*.jsonl")):
        return False
    saved_path = out / "settings.json"
    if not saved_path.exists():
        igrpo.fail(f"--output-dir {out} holds completions without a settings.json: "
                   "use another --output-dir")
    saved = read_json(saved_path)
    differ = [f"--{name.replace('_', '-')} {saved.get(name)} there, {value} here"
              for name, value in settings.items() if saved.get(name) != value]
    if differ:
        igrpo.fail(f"--output-dir {out} holds completions made with other settings "
                   f"({'; '.join(differ)}): use another --output-dir, "
                   "or the same settings to resume")
    return True


def read_json(path):
    """settings.json or summary.json of --output-dir; anything else there is one line naming it."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        igrpo.fail(f"{path}: not valid JSON ({error}); delete it, or use another --output-dir")
    if not isinstance(value, dict):
        igrpo.fail(f"{path}: not a JSON object (not written by eval.py?); delete it, or use "
                   "another --output-dir")
    return value


def training_algo(model):
    """The algorithm of the igrpo.py run a checkpoint folder sits in (its args.json), else None:
    plot.py gives each algorithm its own colour."""
    args_path = Path(model).parent / "args.json"
    try:
        return json.loads(args_path.read_text()).get("algo") if args_path.is_file() else None
    except (OSError, ValueError, AttributeError):  # not igrpo.py's args.json: no algorithm
        return None


class RunFolder:
    """--output-dir as this run writes it. Nothing is written before the first completion, so a run
    that fails to start leaves nothing that refuses the next; rows are appended as they finish and
    never rewritten, so a kill loses at most the row being written."""

    def __init__(self, out, settings, args):
        self.out, self.settings, self.args = out, settings, args
        earlier = out / "summary.json"
        self.earlier = read_json(earlier).get("results", {}) \
            if check_resume(out, settings) and earlier.exists() else {}
        if not isinstance(self.earlier, dict):
            igrpo.fail(f"{earlier}: 'results' is not an object (not written by eval.py?); delete "
                       "it, or use another --output-dir")
        self.benchmarks, self.results, self.started, self.mended = [], {}, False, set()

    def start(self):
        if not self.started:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomically(self.out / "settings.json", json.dumps(self.settings, indent=2))
            self.started = True

    def append(self, bench, rows):
        self.start()
        if bench.path not in self.mended:
            mend_last_line(bench.path)
            self.mended.add(bench.path)
        with open(bench.path, "a") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        bench.done.update((row["index"], row) for row in rows)

    def summary(self):
        """Every benchmark evaluated in this folder: a run's results join those of earlier runs
        (other --benchmarks, same settings) and replace their own benchmarks' there."""
        return dict(model=self.args.model, algo=training_algo(self.args.model),
                    settings=vars(self.args), results=self.earlier | self.results)

    def finish(self, bench, result):
        self.results[bench.label] = result
        self.start()
        write_atomically(self.out / "summary.json", json.dumps(self.summary(), indent=2))

    def interrupted(self):
        """Ctrl-C: one line, what is kept and how to go on, instead of a traceback."""
        kept = ", ".join(f"{b.label} {b.finished()} of {len(b.problems)}" for b in self.benchmarks
                         if b.finished())
        print(f"eval: interrupted; kept in {self.out}: {kept} problems finished. Run the same "
              "command again to resume" if kept else
              "eval: interrupted before the first completion; nothing written", file=sys.stderr)
        raise SystemExit(130)


def summarize(rows, k):
    samples = [s for row in rows for s in row["samples"]]
    pass_per_problem = [pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), k)
                        for r in rows]
    majority_per_problem = [majority_correct([s["extracted"] for s in r["samples"]], r["answer"])
                            for r in rows]
    summary = dict(problems=len(rows), k=k,
                   avg_at_k=sum(s["correct"] for s in samples) / len(samples),
                   pass_at_k=sum(pass_per_problem) / len(rows),
                   maj_at_k=sum(majority_per_problem) / len(rows),
                   no_answer_rate=sum(s["extracted"] is None for s in samples) / len(samples),
                   mean_completion_tokens=sum(s["tokens"] for s in samples) / len(samples))
    for round_index in range(len(rows[0]["refined"]) if rows else 0):
        refined = [s for row in rows for s in row["refined"][round_index]]
        accuracy = sum(s["correct"] for s in refined) / len(refined)
        summary[f"refined_{round_index + 1}_avg_at_k"] = accuracy
    return summary


# The printed table, for a person: accuracies and rates in percent, as the README and the paper
# give them. summary.json and the rows keep fractions (0.5, not 50).
HEADINGS = dict(problems="problems", k="k", avg_at_k="avg@k %", pass_at_k="pass@k %",
                maj_at_k="maj@k %", no_answer_rate="no answer %", mean_completion_tokens="tokens")


def cell(row, column):
    value = row.get(column)
    if value is None or column in ("problems", "k"):
        return "" if value is None else str(value)
    return f"{value:.1f}" if column == "mean_completion_tokens" else f"{100 * value:.1f}"


def print_table(results):
    columns = list(HEADINGS) + sorted({c for r in results.values() for c in r
                                       if c.startswith("refined_")})
    headings = [HEADINGS.get(c) or f"refined {c.split('_')[1]} avg@k %" for c in columns]
    print(f"{'benchmark':<12}" + "".join(f"{h:>{len(h) + 2}}" for h in headings))
    for name, row in results.items():
        print(f"{name:<12}" + "".join(f"{cell(row, c):>{len(h) + 2}}"
                                      for c, h in zip(columns, headings)))


class ShownDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, once: not where its help already says it, nor None."""
    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate a causal LM with the iGRPO paper's protocol.",
        formatter_class=ShownDefaults)
    parser.add_argument("--model", required=True,
                        help="hub name, model folder (e.g. runs/toy-igrpo-seed0/final), or a "
                             "training run folder (its final/)")
    parser.add_argument("--benchmarks", default="aime24,aime25,amc23,math500,gsm8k,minerva",
                        help=f"comma-separated: {', '.join(BENCHMARKS)}, or paths to .jsonl files")
    parser.add_argument("--data-dir", default=str(DATA),
                        help="folder with the local benchmark copies (the shipped data/); "
                             "names not found there load from the hub")
    parser.add_argument("--k", type=int, default=None,
                        help="samples per problem (default: the paper's, 64 AIME, 8 others)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N problems of each")
    parser.add_argument("--refine-rounds", type=int, default=0,
                        help="beyond the paper: refine each sample this many times "
                             "through iGRPO's template")
    parser.add_argument("--output-dir", default="runs/eval",
                        help="summary.json and one JSONL per benchmark")
    fields = {f.name: f for f in dataclasses.fields(scale.ScaleConfig)}
    for name, field_name in CONFIG_FLAGS.items():
        igrpo.add_flag(parser, fields[field_name], name)
    args = parser.parse_args(argv)
    args.model = igrpo.model_source(args.model)
    scale.check_scale_config(config(args))  # igrpo.py's checks and --compile-generation's
    if args.k is not None and args.k < 1:
        igrpo.fail(f"--k {args.k}: need at least 1 sample per problem")
    if args.limit is not None and args.limit < 1:
        igrpo.fail(f"--limit {args.limit}: evaluate at least 1 problem per benchmark")
    if args.refine_rounds < 0:
        igrpo.fail(f"--refine-rounds {args.refine_rounds}: must be 0 or more")
    return args


# igrpo.py's (and scale.py's) settings that eval.py shares, by eval.py's flag name: defaults and
# help come from scale.ScaleConfig
CONFIG_FLAGS = dict(temperature="eval_temperature", top_p="eval_top_p",
                    max_completion_tokens="max_completion_tokens",
                    max_draft_tokens="max_draft_tokens", chat_template="chat_template",
                    generation_batch_size="generation_batch_size",
                    compile_generation="compile_generation", dtype="dtype",
                    trust_remote_code="trust_remote_code", seed="seed")


def config(args):
    return scale.ScaleConfig(**{field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()})


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = config(args)
    names = list(dict.fromkeys(name.strip() for name in args.benchmarks.split(",") if name.strip()))
    check_names(names, args.data_dir)
    out = Path(args.output_dir)
    folder = RunFolder(out, resume_settings(args), args)
    try:
        folder.benchmarks = [prepare(name, args, cfg, out) for name in names]
        device, dtype = igrpo.device_and_dtype(cfg.dtype)
        model, tokenizer = scale.lean_load_model(args.model, cfg, dtype, device)  # LoRA folders too
        igrpo.say_context_limit(igrpo.max_positions(model), 1, cfg.max_completion_tokens)
        for bench in folder.benchmarks:
            folder.finish(bench, evaluate_benchmark(model, tokenizer, bench, args, cfg, folder))
    except KeyboardInterrupt:
        folder.interrupted()
    print_table(folder.summary()["results"])
    return folder.results


if __name__ == "__main__":
    main()
