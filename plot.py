"""
plot.py: what training did, as one figure, from the files runs leave behind (metrics.jsonl,
args.json); and eval.py's avg@k per benchmark as a bar chart (from summary.json). Needs matplotlib
(optional: only this file uses it).

    # one run -> runs/toy-igrpo-seed0/plot.png
    python plot.py runs/toy-igrpo-seed0
    # seeds of a setting: mean, min-max band
    python plot.py runs/toy-compare/*-seed* --out compare.png
    # folders holding eval.py's summary.json
    python plot.py runs/eval-grpo runs/eval-igrpo --out evals.png

Runs are labelled by their args.json (algo, loss, and any other setting that tells them apart).
Runs that differ only in --seed are drawn as one line, the mean over seeds, with a band from the
lowest to the highest seed, over the steps every seed has reached. A run still being written is read
as far as it goes. Each algorithm keeps one colour in every figure, GRPO blue and iGRPO orange (a
bar: the algorithm eval.py's summary.json names); anything else keeps a colour picked by its label.
"""
import argparse
import difflib
import json
import re
import zlib
from pathlib import Path

# (metric, panel title); "drafts" is iGRPO's Stage 1 next to its Stage 2
PANELS = [("reward", "training reward (iGRPO: the refinements')"),
          ("eval_accuracy", "held-out accuracy"),
          ("drafts", "iGRPO: draft, best draft, refinement reward"),
          ("entropy", "entropy (nats per token)"),
          ("mean_completion_length", "mean completion length (tokens)"),
          ("step_seconds", "step time (s)")]
# these never make two runs a different setting
IGNORED_SETTINGS = ("seed", "output_dir", "save_every")
# One colour per algorithm in every figure (GRPO blue, iGRPO orange, as in docs/toy-compare.png);
# anything else takes one of the others, picked by its label, so it too keeps its colour.
ALGO_COLORS = {"grpo": "#1f77b4", "igrpo": "#ff7f0e"}
OTHER_COLORS = ["#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                "#17becf"]


def fail(message):
    """Bad input stops plot.py with one line that names the problem."""
    raise SystemExit(f"plot: error: {message}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line; a mistyped flag is named with the closest real one."""

    def error(self, message):
        unknown = message.removeprefix("unrecognized arguments: ").split()
        flags = [word for word in unknown if word.startswith("-")]
        if message.startswith("unrecognized arguments: ") and flags:
            flag = flags[0].split("=")[0]
            known = [option for action in self._actions for option in action.option_strings]
            close = difflib.get_close_matches(flag, known, n=1)
            message = f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else
                                                f"; the flags are {', '.join(known)}")
        self.exit(2, f"plot: error: {message}\n")


def pyplot():
    try:
        import matplotlib
    except ImportError:
        fail("plot.py needs matplotlib, an optional dependency: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------------
# Reading runs: metrics.jsonl is the single source, read as far as it is written
# ----------------------------------------------------------------------------------------------
def read_metrics(path):
    """The rows of a metrics.jsonl. A torn last line (a live run, or a kill mid-write) is left
    out."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            fail(f"{path}, line {number}: not valid JSON")
    return rows


def read_run(folder):
    folder = Path(folder)
    if not (folder / "metrics.jsonl").is_file():
        fail(f"{folder}: no metrics.jsonl (not a training run folder)")
    args_path = folder / "args.json"
    args = json.loads(args_path.read_text()) if args_path.is_file() else {}
    return dict(folder=folder, args=args, rows=read_metrics(folder / "metrics.jsonl"))


def setting_key(args):
    """A run's settings without its seed; a seed inside a path (the toy's per-seed cache) is masked
    too."""
    return tuple(sorted((k, re.sub(r"seed\d+", "seed*", v) if isinstance(v, str) else v)
                        for k, v in args.items() if k not in IGNORED_SETTINGS))


def group_by_setting(runs):
    """[(label, runs)]: runs that differ only in seed form one group, labelled by what sets groups
    apart."""
    groups = {}
    for run in runs:
        groups.setdefault(setting_key(run["args"]), []).append(run)
    differing = sorted({k for key in groups for k, v in key} - {"algo", "loss"}
                       if len(groups) > 1 else set())
    differing = [k for k in differing if len({dict(key).get(k) for key in groups}) > 1]
    labelled = []
    for key, members in groups.items():
        settings = dict(key)
        if not settings:
            label = str(members[0]["folder"])
        else:
            label = " ".join([f"{settings.get('algo', '?')}, loss={settings.get('loss', '?')}"] +
                             [f"{k}={settings.get(k)}" for k in differing])
        seeds = sorted(m["args"].get("seed", "?") for m in members)
        label += f" (seeds {', '.join(map(str, seeds))})" if len(members) > 1 else ""
        labelled.append((label, members))
    return labelled


def series(rows, metric, smooth=1):
    """(steps, values) of the rows where metric is a number; a trailing mean over `smooth`
    points."""
    points = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    steps, values = [s for s, _ in points], [v for _, v in points]
    if smooth > 1:
        windows = [values[max(0, i - smooth + 1):i + 1] for i in range(len(values))]
        values = [sum(window) / len(window) for window in windows]
    return steps, values


def across_seeds(members, metric, smooth=1):
    """(steps, mean, low, high) over the steps every seed has reached."""
    per_run = [dict(zip(*series(m["rows"], metric, smooth))) for m in members]
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    values = [[p[s] for p in per_run] for s in steps]
    means = [sum(v) / len(v) for v in values]
    return steps, means, [min(v) for v in values], [max(v) for v in values]


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------
def shade(color, step):
    """step 0: the colour itself; then alternately darker and lighter (the same hue)."""
    rgb = [int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    amount, target = min(0.8, 0.35 * ((step + 1) // 2)), 0.0 if step % 2 else 1.0
    return "#" + "".join(f"{round(255 * (c + (target - c) * amount)):02x}" for c in rgb)


def colors(keys):
    """A colour for each (algorithm or None, label) of a figure. An algorithm's is its own in every
    figure (a second setting of it: a shade of it); another label's is picked by a hash of the
    label, or the next one free in this figure."""
    chosen, taken, settings_of = [], set(), {}
    for algo, label in keys:
        if algo in ALGO_COLORS:
            settings_of[algo] = settings_of.get(algo, -1) + 1
            color = shade(ALGO_COLORS[algo], settings_of[algo])
        else:
            start = zlib.crc32(label.encode())
            picks = [OTHER_COLORS[(start + i) % len(OTHER_COLORS)]
                     for i in range(len(OTHER_COLORS))]
            color = next((c for c in picks if c not in taken), picks[0])
        chosen.append(color)
        taken.add(color)
    return chosen


def draw_line(axis, members, metric, smooth, color, label, style="-"):
    steps, mean, low, high = across_seeds(members, metric, smooth)
    if not steps:
        return False
    marker = "o" if metric == "eval_accuracy" else None
    axis.plot(steps, mean, style, color=color, label=label, marker=marker, markersize=4,
              linewidth=1.3)
    if len(members) > 1:
        axis.fill_between(steps, low, high, color=color, alpha=0.18, linewidth=0)
    return True


def plot_training(run_folders, out, smooth=1):
    plt = pyplot()
    groups = group_by_setting([read_run(f) for f in run_folders])
    palette = colors([(members[0]["args"].get("algo"), label) for label, members in groups])
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for axis, (metric, title) in zip(axes.flat, PANELS):
        drawn = False
        for (label, members), color in zip(groups, palette):
            if metric == "drafts":  # GRPO's draft rewards are null: it draws nothing here
                drawn |= draw_line(axis, members, "draft_reward", smooth, color,
                                   f"{label}: drafts", ":")
                drawn |= draw_line(axis, members, "best_draft_reward", smooth, color,
                                   f"{label}: best draft", "--")
                logged_drafts = any(isinstance(r.get("draft_reward"), (int, float))
                                    for m in members for r in m["rows"])
                if logged_drafts:
                    drawn |= draw_line(axis, members, "reward", smooth, color,
                                       f"{label}: refinements")
            else:  # held-out accuracy as measured: a few scorings, not a noisy step series
                drawn |= draw_line(axis, members, metric,
                                   1 if metric == "eval_accuracy" else smooth, color, label)
        if not drawn:
            axis.text(0.5, 0.5, "no iGRPO runs" if metric == "drafts" else f"no {metric} logged",
                      ha="center", va="center", transform=axis.transAxes, color="gray")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step", fontsize=9)
        axis.grid(alpha=0.3)
        if drawn and (metric == "drafts" or axis is axes.flat[0]):
            axis.legend(fontsize=7)
    note = ("" if all(len(m) == 1 for _, m in groups)
            else "  line: mean over seeds, band: min to max")
    smoothing = "" if smooth <= 1 else (f"training curves: trailing mean over {smooth} steps "
                                        "(held-out accuracy as measured).")
    figure.suptitle(smoothing + note, fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


def read_summary(path):
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        fail(f"{path}: no summary.json (not an eval.py output folder)")
    summary = json.loads(file.read_text())
    if not isinstance(summary.get("results"), dict):
        fail(f"{file}: no 'results' object (not written by eval.py?)")
    return summary


def plot_eval(paths, out):
    """avg@k per benchmark, one bar per model (eval.py's summary.json)."""
    plt = pyplot()
    summaries = [read_summary(p) for p in paths]
    benchmarks = list(dict.fromkeys(name for s in summaries for name in s["results"]))
    width = 0.8 / len(summaries)
    figure_width = max(5, 1.4 * len(benchmarks) * max(1, len(summaries) / 2))
    figure, axis = plt.subplots(figsize=(figure_width, 4))
    labels = [summary.get("model") or str(path) for path, summary in zip(paths, summaries)]
    palette = colors([(s.get("algo"), label) for s, label in zip(summaries, labels)])
    for index, (summary, label, color) in enumerate(zip(summaries, labels, palette)):
        results = summary["results"]
        positions = [b + (index - (len(summaries) - 1) / 2) * width for b in range(len(benchmarks))]
        heights = [100 * results[name]["avg_at_k"] if name in results else 0 for name in benchmarks]
        bars = axis.bar(positions, heights, width, label=label, color=color)
        values = [f"{h:.1f}" if name in results else "" for h, name in zip(heights, benchmarks)]
        axis.bar_label(bars, labels=values, fontsize=7)
    ks = sorted({r.get("k") for s in summaries for r in s["results"].values()}, key=str)
    axis.set_xticks(range(len(benchmarks)), benchmarks)
    axis.set_ylabel(f"avg@k (%), k = {', '.join(map(str, ks))}")
    axis.set_ylim(0, 105)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


def main(argv=None):
    parser = Parser(
        description="Plot training runs (metrics.jsonl) or eval.py summaries.")
    parser.add_argument("folders", nargs="+",
                        help="run folders (metrics.jsonl), or eval.py output folders "
                             "(summary.json) for an avg@k bar chart; not both at once")
    parser.add_argument("--out", default="",
                        help="PNG to write (default: plot.png in the first folder)")
    parser.add_argument("--smooth", type=int, default=1, help="trailing mean over N steps (1: off)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        fail(f"--smooth {args.smooth}: must be at least 1 (1: off)")
    for folder in args.folders:
        if not Path(folder).exists():
            fail(f"{folder}: no such folder")
    is_eval = [not (Path(f) / "metrics.jsonl").is_file() and (Path(f).name == "summary.json" or
                                                               (Path(f) / "summary.json").is_file())
               for f in args.folders]
    if any(is_eval) and not all(is_eval):
        fail("give either training run folders (metrics.jsonl) "
                   "or eval.py folders (summary.json), not both")
    first = Path(args.folders[0])
    out = args.out or str((first if first.is_dir() else first.parent) / "plot.png")
    (plot_eval if all(is_eval) else plot_training)(args.folders, out, **({} if all(is_eval) else
                                                                        dict(smooth=args.smooth)))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
