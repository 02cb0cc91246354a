"""
eval.py: the iGRPO paper's evaluation protocol, for a checkpoint of igrpo.py or any causal LM.

Single pass from the original prompt (no drafts at test time), temperature 0.6, top-p 0.95, k samples per
problem (64 for AIME24/25, 8 for the rest). Reports, per benchmark:
  avg@k   mean accuracy over all k samples: the paper's "pass@1 averaged over k"
  pass@k  the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), n samples of which c correct
  maj@k   accuracy of the majority answer, equivalent spellings counted as one answer
and the no-answer rate and mean completion tokens. Prompts and the answer checker are igrpo.py's own.

    python eval.py --model runs/toy/final --benchmarks gsm8k,math500 --limit 50 --k 4
    python eval.py --model runs/toy/final --benchmarks my_problems.jsonl --refine-rounds 1

A rerun with the same --output-dir resumes: problems already in OUTPUT_DIR/<benchmark>.jsonl are skipped.
"""
import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

import igrpo

HERE = Path(__file__).resolve().parent
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
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(extracted, gold):
    """Vote over extracted answers, equivalent spellings pooled; the first-seen answer wins a tie."""
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
    igrpo.fail(f"--benchmarks: unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)} or a .jsonl file")


def label(name):
    return name if name in BENCHMARKS else Path(name).stem


def grade(completion, gold, tokens):
    extracted = igrpo.extract_answer(completion)
    return dict(completion=completion, extracted=extracted, correct=igrpo.answers_match(extracted, gold),
                tokens=tokens)


def generate(model, tokenizer, prompts, k, args, cfg):
    samples = igrpo.sample(model, tokenizer, prompts, k, args.max_completion_tokens, args.temperature, args.top_p, cfg)
    return samples.texts, samples.lengths.tolist()


def evaluate_benchmark(model, tokenizer, name, args, cfg, out):
    source, hub_config, split, paper_k = resolve(name, args.data_dir)
    k = args.k if args.k is not None else paper_k
    cfg.dataset_config, cfg.split = hub_config, split
    problems = igrpo.load_problems(source, cfg, flag="benchmarks", limit=args.limit)
    path = out / f"{label(name)}.jsonl"
    done = {}
    if path.exists():  # resume: keep finished problems that used the same k and refine rounds
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if len(row["samples"]) == k and len(row.get("refined", [])) == args.refine_rounds:
                done[row["index"]] = row
    todo = [i for i in range(len(problems)) if i not in done]
    per_call = max(1, args.generation_batch_size // k)
    with open(path, "w") as file:
        for row in done.values():
            file.write(json.dumps(row) + "\n")
        for start in tqdm(range(0, len(todo), per_call), desc=label(name), dynamic_ncols=True):
            chunk = [problems[i] | {"index": i} for i in todo[start:start + per_call]]
            prompts = [igrpo.build_prompt(tokenizer, p["problem"], cfg) for p in chunk]
            texts, lengths = generate(model, tokenizer, prompts, k, args, cfg)
            rows = [dict(index=p["index"], problem=p["problem"], answer=p["answer"], refined=[],
                         samples=[grade(t, p["answer"], n) for t, n in zip(texts[j * k:(j + 1) * k], lengths[j * k:(j + 1) * k])])
                    for j, p in enumerate(chunk)]
            previous = [s["completion"] for row in rows for s in row["samples"]]
            for _ in range(args.refine_rounds):  # beyond the paper: refine each sample with igrpo's template
                refine = [igrpo.build_prompt(tokenizer, igrpo.refine_message(
                    rows[i // k]["problem"], igrpo.cut_draft(tokenizer, draft, args.max_draft_tokens)), cfg)
                    for i, draft in enumerate(previous)]
                previous, lengths = generate(model, tokenizer, refine, 1, args, cfg)
                for j, row in enumerate(rows):
                    row["refined"].append([grade(t, row["answer"], n) for t, n in
                                           zip(previous[j * k:(j + 1) * k], lengths[j * k:(j + 1) * k])])
            for row in rows:
                done[row["index"]] = row
                file.write(json.dumps(row) + "\n")
            file.flush()
    return summarize([done[i] for i in range(len(problems))], k)


def summarize(rows, k):
    samples = [s for row in rows for s in row["samples"]]
    summary = dict(problems=len(rows), k=k,
                   avg_at_k=sum(s["correct"] for s in samples) / len(samples),
                   pass_at_k=sum(pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), k)
                                 for r in rows) / len(rows),
                   maj_at_k=sum(majority_correct([s["extracted"] for s in r["samples"]], r["answer"])
                                for r in rows) / len(rows),
                   no_answer_rate=sum(s["extracted"] is None for s in samples) / len(samples),
                   mean_completion_tokens=sum(s["tokens"] for s in samples) / len(samples))
    for round_index in range(len(rows[0]["refined"]) if rows else 0):
        refined = [s for row in rows for s in row["refined"][round_index]]
        summary[f"refined_{round_index + 1}_avg_at_k"] = sum(s["correct"] for s in refined) / len(refined)
    return summary


def print_table(results):
    columns = ["problems", "k", "avg_at_k", "pass_at_k", "maj_at_k", "no_answer_rate", "mean_completion_tokens"]
    columns += sorted({c for r in results.values() for c in r if c.startswith("refined_")})
    print(f"{'benchmark':<12}" + "".join(f"{c:>{len(c) + 2}}" for c in columns))
    for name, row in results.items():
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"{name:<12}" + "".join(f"{cell:>{len(c) + 2}}" for cell, c in zip(cells, columns)))


def parse_args(argv=None):
    default_data = HERE.parent / "shared" / "data"
    parser = argparse.ArgumentParser(description="Evaluate a causal LM with the iGRPO paper's protocol.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="hub name or local folder (e.g. runs/toy/final)")
    parser.add_argument("--benchmarks", default="aime24,aime25,amc23,math500,gsm8k,minerva",
                        help=f"comma-separated: {', '.join(BENCHMARKS)}, or paths to .jsonl files")
    parser.add_argument("--data-dir", default=str(default_data) if default_data.is_dir() else "",
                        help="folder with the local benchmark copies; names not found there load from the hub")
    parser.add_argument("--k", type=int, default=None, help="samples per problem (default: the paper's, 64 AIME, 8 others)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    parser.add_argument("--max-completion-tokens", type=int, default=4096, help="generation budget")
    parser.add_argument("--refine-rounds", type=int, default=0,
                        help="beyond the paper: refine each sample this many times through iGRPO's template")
    parser.add_argument("--max-draft-tokens", type=int, default=2048, help="a longer draft is cut from the front")
    parser.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"], help="as in igrpo.py")
    parser.add_argument("--generation-batch-size", type=int, default=256, help="sequences per generate call")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="bf16 on GPU by default")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--output-dir", default="runs/eval", help="summary.json and one JSONL per benchmark")
    args = parser.parse_args(argv)
    if args.k is not None and args.k < 1:
        igrpo.fail(f"--k {args.k}: need at least 1 sample per problem")
    if args.refine_rounds < 0:
        igrpo.fail(f"--refine-rounds {args.refine_rounds}: must be 0 or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = igrpo.Config(chat_template=args.chat_template, generation_batch_size=args.generation_batch_size,
                       trust_remote_code=args.trust_remote_code)
    names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    for name in names:
        resolve(name, args.data_dir)  # every name checked before the model loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device == "cuda") else torch.float32
    model, tokenizer = igrpo.load_model(args.model, cfg, dtype, device)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {label(name): evaluate_benchmark(model, tokenizer, name, args, cfg, out) for name in names}
    (out / "summary.json").write_text(json.dumps(dict(model=args.model, settings=vars(args), results=results), indent=2))
    print_table(results)
    return results


if __name__ == "__main__":
    main()
