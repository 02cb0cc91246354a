"""--track: igrpo.py's numbers and completions also sent to an experiment tracker.

igrpo.py imports this file only when --track asks for a tracker, and this file imports nothing from
igrpo.py. open_tracker returns an object with log(record) (one line of metrics.jsonl, at its
"step"), log_completions(step, rows) (the lines written to completions.jsonl that step) and
close(). The tracker packages are optional: none is needed to train.

  tensorboard  event files in the output folder: `tensorboard --logdir runs` shows each run
               under its folder's name
  wandb        a Weights & Biases run (WANDB_MODE=offline: only under the output folder's wandb/;
               `wandb sync` uploads it later); project "igrpo", or $WANDB_PROJECT
  trackio      a run of the trackio project "igrpo", in trackio's local database
               (`trackio show --project igrpo`)
"""
import contextlib
import importlib
import json
import os
from pathlib import Path

KINDS = ("tensorboard", "wandb", "trackio")
COLUMNS = ["step", "problem", "gold", "role", "text", "reward", "advantage"]


def open_tracker(kind, run_name, settings, output_dir):
    """The tracker of that kind, for the run in output_dir, with its settings logged once. Under
    torchrun only rank 0 logs: the other ranks get a tracker that does nothing."""
    require(kind)
    if os.environ.get("RANK", "0") != "0":
        return Silent()
    backend = dict(tensorboard=TensorBoard, wandb=WandB, trackio=Trackio)[kind]
    return backend(run_name, {**settings, "run_name": run_name}, Path(output_dir))


@contextlib.contextmanager
def tracking(kind, run_name, settings, output_dir):
    """open_tracker's tracker, closed however the run ends."""
    tracker = open_tracker(kind, run_name, settings, output_dir)
    try:
        yield tracker
    finally:
        tracker.close()


def require(kind):
    """Stop with one line unless the package of --track kind is installed (it is imported) and, for
    wandb, can log: an account's key, or WANDB_MODE=offline. Checked before anything loads, so a
    run folder is never changed by a run that could not have started."""
    if kind not in KINDS:
        raise SystemExit(f"igrpo: error: --track {kind}: choose one of {', '.join(KINDS)}")
    try:
        importlib.import_module(kind)
    except ModuleNotFoundError as error:
        if error.name != kind:
            raise
        raise SystemExit(f"igrpo: error: --track {kind}: the {kind} package is not installed "
                         f"(pip install {kind})") from None
    if kind == "wandb" and not wandb_can_log():
        raise SystemExit("igrpo: error: --track wandb: no wandb account here (WANDB_API_KEY, or "
                         "`wandb login`); WANDB_MODE=offline logs without one")


def wandb_can_log():
    """A key in the environment or in ~/.netrc (what `wandb login` writes), or a mode that needs
    none; read without asking wandb's servers."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled",
                                                                          "dryrun"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


def numbers(record):
    """The record's numbers, without its step; None (NaN, inf or absent) is not logged."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float))}


def table_rows(rows):
    """completions.jsonl's rows as a table's rows (COLUMNS), one per text: each draft, the best
    draft and each refinement (iGRPO), or each completion of the group (GRPO)."""
    table = []
    for row in rows:
        texts = [("draft", d["text"], d["reward"], None) for d in row.get("drafts", [])]
        if "best_draft" in row:
            texts.append(("best draft", row["best_draft"], None, None))
        role = "refinement" if "refinements" in row else "completion"
        texts += [(role, c["text"], c["reward"], c["advantage"])
                  for c in row.get("refinements", row.get("group", []))]
        table += [[row["step"], row["problem"], row["gold"], *text] for text in texts]
    return table


def markdown(rows):
    """completions.jsonl's rows as one Markdown text; every text as a code block."""
    def block(text):
        return "\n".join("    " + line for line in (text or "(empty)").split("\n"))
    parts = []
    for row in rows:
        parts.append(f"### Problem (gold answer: `{row['gold']}`)\n\n{block(row['problem'])}")
        for *_, role, text, reward, advantage in table_rows([row]):
            scores = [f"reward {reward:.3g}"] if reward is not None else []
            scores += [f"advantage {advantage:+.3g}"] if advantage is not None else []
            parts.append(f"**{role}** {', '.join(scores)}".strip() + f"\n\n{block(text)}")
    return "\n\n".join(parts)


def resumed_after(output_dir):
    """The last step in metrics.jsonl when the tracker opens: -1 for a new run (igrpo.py has
    emptied it), else the step a resumed run goes on after (cut back to its checkpoint)."""
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=-1)


def cell(value):
    """A setting's value as one cell of a Markdown table."""
    return json.dumps(value).replace("|", "\\|")


class Silent:
    """A tracker that logs nothing: torchrun's ranks other than 0."""
    def log(self, record):
        pass

    def log_completions(self, step, rows):
        pass

    def close(self):
        pass


class TensorBoard:
    """Event files in the output folder. A resumed run (or an --overwrite) first drops what a
    previous run logged from the step it goes on at (TensorBoard's purge_step)."""
    def __init__(self, run_name, settings, output_dir):
        from torch.utils.tensorboard import SummaryWriter
        first = resumed_after(output_dir) + 1  # 0, or the step a resumed run goes on at
        self.writer = SummaryWriter(output_dir, purge_step=first, flush_secs=30)
        table = "\n".join(f"| {key} | {cell(value)} |" for key, value in settings.items())
        self.writer.add_text("settings", "| setting | value |\n| --- | --- |\n" + table, first)

    def log(self, record):
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def log_completions(self, step, rows):
        self.writer.add_text("completions", markdown(rows), step)

    def close(self):
        self.writer.close()


class WandB:
    """A wandb run named run_name in project "igrpo" (or $WANDB_PROJECT), its files under the
    output folder's wandb/. A resumed run is a new wandb run of the same name."""
    def __init__(self, run_name, settings, output_dir):
        import wandb
        self.wandb = wandb
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "igrpo"),
                                  name=run_name, config=settings, dir=output_dir)
        except Exception as error:  # no account, no network: wandb's error types vary
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise SystemExit(f"igrpo: error: --track wandb: {type(error).__name__}: {message} "
                             "(WANDB_MODE=offline logs without an account)") from None

    def log(self, record):
        self.run.log(numbers(record), step=record["step"])

    def log_completions(self, step, rows):
        self.run.log({"completions": self.wandb.Table(columns=COLUMNS, data=table_rows(rows))},
                     step=step)

    def close(self):
        self.run.finish()


class Trackio:
    """A run named run_name in the trackio project "igrpo" (trackio's database: $TRACKIO_DIR,
    by default under the Hugging Face cache). A resumed run is a new run of the same name."""
    def __init__(self, run_name, settings, output_dir):
        import trackio
        self.trackio = trackio
        self.run = trackio.init(project="igrpo", name=run_name, config=settings)

    def log(self, record):
        self.run.log(numbers(record), step=record["step"])

    def log_completions(self, step, rows):
        table = self.trackio.Table(columns=COLUMNS, data=table_rows(rows))
        self.run.log({"completions": table}, step=step)

    def close(self):
        self.trackio.finish()  # and forgets the run: it is not finished again at exit
