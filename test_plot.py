"""plot.py and the toy world, as a specification. Offline, CPU, Agg backend, a few seconds."""
import builtins
import json
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

import igrpo
import plot
import toy


def write_run(folder, algo="igrpo", seed=0, steps=4, evals=(0, 4), torn=False):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(dict(algo=algo, loss="grpo", seed=seed, lr=1e-4,
                                                      model=f".cache/toy-abc-seed{seed}/model",
                                                      output_dir=str(folder))))
    rows = [dict(step=0, eval_accuracy=0.5)] if 0 in evals else []
    for step in range(1, steps + 1):
        drafts = (0.4 + 0.01 * step, 0.7) if algo == "igrpo" else (None, None)
        rows.append(dict(step=step, reward=0.5 + 0.01 * step + 0.01 * seed, draft_reward=drafts[0],
                         best_draft_reward=drafts[1], entropy=0.3,
                         mean_completion_length=20.0 + step, step_seconds=1.0))
    rows += [dict(step=steps, eval_accuracy=0.6)] if steps in evals else []
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 5, "rew' if torn else ""))
    return folder


def png_written(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_every_panel_from_a_synthetic_run(tmp_path):
    out = plot.plot_training([write_run(tmp_path / "run")], tmp_path / "run.png")
    assert png_written(tmp_path / "run.png") and out == tmp_path / "run.png"


def test_plot_reads_a_live_run_up_to_its_torn_last_line(tmp_path):
    run = write_run(tmp_path / "run", evals=(0,), torn=True)
    assert [r["step"] for r in plot.read_run(run)["rows"]] == [0, 1, 2, 3, 4]
    plot.main([str(run), "--out", str(tmp_path / "live.png")])
    assert png_written(tmp_path / "live.png")


def test_a_broken_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    run = write_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    with pytest.raises(SystemExit, match="metrics.jsonl, line 3: not valid JSON"):
        plot.read_run(run)


def test_plot_handles_runs_without_eval_rows_and_grpo_null_draft_rewards(tmp_path):
    runs = [write_run(tmp_path / "grpo", algo="grpo", evals=()),
            write_run(tmp_path / "igrpo", evals=())]
    assert plot.series(plot.read_run(runs[0])["rows"], "draft_reward") == ([], [])
    plot.plot_training(runs, tmp_path / "both.png", smooth=3)
    assert png_written(tmp_path / "both.png")


def test_runs_that_differ_only_in_seed_are_one_line_with_a_min_max_band(tmp_path):
    runs = [plot.read_run(write_run(tmp_path / f"{algo}{seed}", algo=algo, seed=seed))
            for algo in ("grpo", "igrpo") for seed in (0, 1, 2)]
    groups = plot.group_by_setting(runs)
    assert [label for label, _ in groups] == ["grpo, loss=grpo (seeds 0, 1, 2)",
                                              "igrpo, loss=grpo (seeds 0, 1, 2)"]
    steps, mean, low, high = plot.across_seeds(groups[0][1], "reward")
    assert steps == [1, 2, 3, 4]
    assert (mean[0], low[0], high[0]) == pytest.approx((0.52, 0.51, 0.53))


def test_smoothing_is_a_trailing_mean_and_off_by_default(tmp_path):
    rows = [dict(step=s, reward=float(s)) for s in range(1, 5)]
    assert plot.series(rows, "reward") == ([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
    assert plot.series(rows, "reward", smooth=2)[1] == [1.0, 1.5, 2.5, 3.5]


def test_smoothing_applies_to_training_curves_and_held_out_accuracy_is_drawn_as_measured(
        tmp_path, monkeypatch):
    drawn, real = {}, plot.draw_line

    def recorded(axis, members, metric, smooth, *args, **kwargs):
        drawn[metric] = plot.across_seeds(members, metric, smooth)[1]
        return real(axis, members, metric, smooth, *args, **kwargs)
    monkeypatch.setattr(plot, "draw_line", recorded)
    run = write_run(tmp_path / "run")
    plot.plot_training([run], tmp_path / "smoothed.png", smooth=5)
    measured = [r["eval_accuracy"] for r in plot.read_run(run)["rows"] if "eval_accuracy" in r]
    assert drawn["eval_accuracy"] == measured  # the last point is the run's final accuracy
    assert drawn["reward"] != plot.across_seeds([plot.read_run(run)], "reward")[1]  # smoothed


def test_eval_summaries_become_an_avg_at_k_bar_chart(tmp_path):
    for name, accuracy in (("a", 0.25), ("b", 0.5)):
        (tmp_path / name).mkdir()
        results = {"gsm8k": dict(k=2, avg_at_k=accuracy),
                   "math500": dict(k=2, avg_at_k=accuracy / 2)}
        summary = dict(model=f"model-{name}", results=results)
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "evals.png")])
    assert png_written(tmp_path / "evals.png")
    with pytest.raises(SystemExit, match="not both"):
        plot.main([str(tmp_path / "a"), str(write_run(tmp_path / "run"))])


def test_missing_matplotlib_is_one_clear_line(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit,
                       match="plot.py needs matplotlib, an optional dependency: pip install"):
        plot.main([str(write_run(tmp_path / "run"))])


def test_a_mistyped_flag_is_one_line_naming_it_and_the_closest_real_flag_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        plot.main([str(write_run(tmp_path / "run")), "--smoth", "3"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "plot: error: unknown flag --smoth; did you mean --smooth?\n"


def test_plot_errors_are_its_own_one_line_and_plot_does_not_import_igrpo(tmp_path):
    with pytest.raises(SystemExit, match=r"^plot: error: \S*nowhere: no such folder$"):
        plot.main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"^plot: error: --smooth 0: must be at least 1"):
        plot.main([str(write_run(tmp_path / "run")), "--smooth", "0"])
    imports = subprocess.run([sys.executable, "-c", "import sys, plot; print(sorted(sys.modules))"],
                             cwd=Path(plot.__file__).parent, capture_output=True, text=True,
                             check=True)
    assert "'igrpo'" not in imports.stdout


def drawn_colors(monkeypatch):
    """label -> the colours of every line and bar drawn under it, from here on."""
    import matplotlib.axes
    seen = {}
    for method in ("plot", "bar"):
        real = getattr(matplotlib.axes.Axes, method)

        def drawing(self, *args, real=real, **kwargs):
            seen.setdefault(kwargs.get("label"), set()).add(kwargs.get("color"))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(matplotlib.axes.Axes, method, drawing)
    return seen


def eval_folder(folder, model, algo):
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(dict(model=model, algo=algo, results={
        "gsm8k": dict(k=2, avg_at_k=0.5)})))
    return folder


def test_each_algorithm_has_its_own_colour_in_every_figure(tmp_path, monkeypatch):
    seen = drawn_colors(monkeypatch)
    igrpo_run, grpo_run = write_run(tmp_path / "igrpo"), write_run(tmp_path / "grpo", algo="grpo")
    plot.plot_training([igrpo_run], tmp_path / "alone.png")
    igrpo_alone = seen.pop("igrpo, loss=grpo")
    plot.plot_training([igrpo_run, grpo_run], tmp_path / "igrpo-first.png")
    plot.plot_training([grpo_run, igrpo_run], tmp_path / "grpo-first.png")
    plot.plot_eval([eval_folder(tmp_path / "a", "Qwen/Qwen2.5-Math-1.5B", None),
                    eval_folder(tmp_path / "b", "runs/b/final", "igrpo"),
                    eval_folder(tmp_path / "c", "runs/c/final", "grpo")], tmp_path / "evals.png")
    igrpo_color, grpo_color = plot.ALGO_COLORS["igrpo"], plot.ALGO_COLORS["grpo"]
    assert igrpo_alone == seen["igrpo, loss=grpo"] == seen["runs/b/final"] == {igrpo_color}
    assert seen["grpo, loss=grpo"] == seen["runs/c/final"] == {grpo_color} != {igrpo_color}
    assert len(seen["Qwen/Qwen2.5-Math-1.5B"]) == 1
    assert not seen["Qwen/Qwen2.5-Math-1.5B"] & {igrpo_color, grpo_color}


def test_a_second_setting_of_an_algorithm_is_a_shade_of_it_and_other_labels_keep_their_colour():
    import colorsys

    def hue(color):
        return colorsys.rgb_to_hsv(*(int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)))[0]
    first, second, mine = plot.colors([("igrpo", "lr=1e-4"), ("igrpo", "lr=1e-5"), (None, "mine")])
    assert first == plot.ALGO_COLORS["igrpo"] and second != first
    assert hue(second) == pytest.approx(hue(first), abs=0.01)
    assert plot.colors([(None, "mine")]) == [mine]
    assert plot.colors([("grpo", "x"), (None, "mine")])[1] == mine
    assert len(set(plot.colors([(None, f"model-{i}") for i in range(8)]))) == 8  # all apart


# ----------------------------------------------------------------------------------------------
# The toy world
# ----------------------------------------------------------------------------------------------
def test_a_wrong_draft_has_exactly_one_wrong_column_step_and_a_wrong_final_answer():
    rng = random.Random(0)
    for _ in range(50):
        terms = (rng.randint(10, 99), rng.randint(10, 99))
        draft = toy.wrong_draft(terms, rng)
        body = draft.split(" \\boxed")[0].strip().rstrip(".")
        steps = [step.split(" = ") for step in body.split(". ")]
        wrong = [sum(map(int, left.split(" + "))) != int(right) for left, right in steps]
        assert sum(wrong) == 1
        assert not igrpo.math_reward(draft, str(sum(terms)))
        assert igrpo.math_reward(toy.solution(terms), str(sum(terms)))


def test_warm_start_stops_at_the_first_check_inside_the_band_not_at_a_step_count(tiny_toy):
    tokenizer, model, examples = tiny_toy
    measured = iter([0.1, 0.3, 0.5, 0.9])
    steps, accuracy, _ = toy.warm_start(model, tokenizer, examples, random.Random(0),
                                        lambda m: next(measured), band=(0.45, 0.6), check_every=2,
                                        batch_size=4)
    assert (steps, accuracy) == (6, 0.5)


def test_a_warm_start_that_never_reaches_the_band_fails_with_one_line(tiny_toy):
    tokenizer, model, examples = tiny_toy
    with pytest.raises(SystemExit, match="did not reach 45% calibration accuracy in 4 steps"):
        toy.warm_start(model, tokenizer, examples, random.Random(0), lambda m: 0.0,
                       band=(0.45, 0.6), check_every=2, max_steps=4, batch_size=4)


@pytest.fixture(scope="module")
def tiny_toy():
    cfg = igrpo.Config(**toy.SETTINGS)
    rng = random.Random(0)
    problems, _ = toy.make_problems(8, rng)
    tokenizer = toy.build_tokenizer([
        igrpo.build_prompt(None, igrpo.refine_message(p["problem"], toy.solution(p["terms"])), cfg)
        + toy.solution(p["terms"]) for p in problems])
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    return tokenizer, model, toy.warm_start_examples(problems, tokenizer, cfg, rng)


@pytest.fixture(scope="module")
def built_toy(tmp_path_factory):
    """A real toy build whose band is met at the first check (2 steps): the files, not the skill."""
    folder = tmp_path_factory.mktemp("cache") / "toy-test-seed0"
    cfg = igrpo.Config(**toy.SETTINGS | dict(max_completion_tokens=8))  # a short calibration
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(toy, "CALIBRATION_PROBLEMS", 8)
        record = toy.build(folder, cfg, seed=0, band=(0.0, 1.0), check_every=2)
    return folder, record


def test_toy_build_records_where_its_warm_start_stopped_and_is_complete(built_toy):
    folder, record = built_toy
    written = json.loads((folder / "toy.json").read_text())
    assert record["warm_start_steps"] == 2 and written == record
    assert toy.is_complete(folder) and not list(folder.parent.glob("*.partial-*"))


def test_toy_world_builds_a_warm_started_model_and_problem_files_that_reload(
        built_toy, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, _ = built_toy
    cfg = igrpo.Config(**toy.SETTINGS)
    assert AutoModelForCausalLM.from_pretrained(folder / "model").config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    assert tokenizer.decode(tokenizer("What is 47 + 38?").input_ids) == "What is 47 + 38?"
    train, test = (igrpo.load_problems(str(folder / f"{n}.jsonl"), cfg) for n in ("train", "test"))
    # held out means held out
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}
    monkeypatch.setattr(toy, "cache_folder", lambda seed=0, right_drafts=0.5: folder)
    prepared = toy.prepare(igrpo.Config(algo="grpo", steps=3), given={"algo", "steps"})
    assert (prepared.algo, prepared.steps, prepared.lr) == ("grpo", 3, toy.SETTINGS["lr"])
    assert prepared.model == str(folder / "model")


def test_an_incomplete_toy_cache_is_rebuilt_and_never_blames_dataset(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "toy-broken-seed0"
    (broken / "model").mkdir(parents=True)
    (broken / "model" / "config.json").write_text("{}")  # a build killed mid-save
    built = []
    monkeypatch.setattr(toy, "cache_folder", lambda seed=0, right_drafts=0.5: broken)
    monkeypatch.setattr(toy, "build", lambda folder, cfg, seed: built.append(folder))
    toy.prepare(igrpo.Config(), given=set())
    assert built == [broken] and "incomplete" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--dataset x.jsonl needs --model"):
        igrpo.main(["--dataset", "x.jsonl"])


def test_toy_runs_of_different_settings_go_to_different_folders(built_toy, monkeypatch):
    folder, _ = built_toy
    monkeypatch.setattr(toy, "cache_folder", lambda seed=0, right_drafts=0.5: folder)
    outputs = [toy.prepare(cfg, given).output_dir for cfg, given in (
        (igrpo.Config(), set()), (igrpo.Config(algo="grpo"), {"algo"}),
        (igrpo.Config(seed=1), {"seed"}),
        (igrpo.Config(loss="dapo", steps=5), {"loss", "steps"}),
        (igrpo.Config(output_dir="mine"), {"output_dir"}),
        (igrpo.Config(resume=True, micro_batch_size=8), {"resume", "micro_batch_size"}))]
    assert outputs == ["runs/toy-igrpo-seed0", "runs/toy-grpo-seed0", "runs/toy-igrpo-seed1",
                       "runs/toy-igrpo-seed0-loss-dapo-steps-5", "mine",
                       "runs/toy-igrpo-seed0"]  # a resumed run goes on in the run's own folder


def test_plot_draws_a_real_two_step_toy_run(built_toy, tmp_path, monkeypatch):
    folder, _ = built_toy
    monkeypatch.setattr(toy, "cache_folder", lambda seed=0, right_drafts=0.5: folder)
    toy.main(["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--num-drafts", "2",
                "--max-completion-tokens", "12", "--eval-limit", "4", "--eval-samples", "1",
                "--output-dir", str(tmp_path / "run")])
    rows = plot.read_run(tmp_path / "run")["rows"]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2]
    assert all(r["draft_reward"] is not None for r in rows if "reward" in r)
    plot.main([str(tmp_path / "run")])
    assert png_written(tmp_path / "run" / "plot.png")


def test_comparison_table_gives_accuracy_before_and_after_over_seeds_and_igrpo_stage_rewards(
        tmp_path):
    for algo in toy.ALGOS:
        for seed in (0, 1):
            write_run(tmp_path / f"{algo}-seed{seed}", algo=algo, seed=seed)
    table = toy.comparison_table(tmp_path, [0, 1])
    assert ("| grpo | 2 | 50.0 [50.0, 50.0] | 60.0 [60.0, 60.0] | 10.0 [10.0, 10.0] "
            "| 50.0 -> 60.0, 50.0 -> 60.0 |") in table
    assert "| drafts | 42.5 [42.5, 42.5] | 42.5 [42.5, 42.5] | 42.5 [42.5, 42.5] |" in table
    assert "| refinements (trained on) | 53.0 [52.5, 53.5] |" in table


def test_a_comparison_folder_refuses_a_rerun_with_other_flags(tmp_path):
    (tmp_path / "compare.json").write_text(json.dumps(dict(flags=["--steps", "5"])))
    with pytest.raises(SystemExit, match="holds a comparison run with other flags"):
        toy.compare(["--output-dir", str(tmp_path), "--seeds", "0"])


def test_a_comparison_rerun_resumes_a_run_stopped_with_a_checkpoint_and_restarts_one_without(
        tmp_path, monkeypatch):
    (tmp_path / "grpo-seed0" / "step-3").mkdir(parents=True)
    # Ctrl-C after step 3
    (tmp_path / "grpo-seed0" / "step-3" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "igrpo-seed0").mkdir()
    (tmp_path / "igrpo-seed0" / "args.json").write_text("{}")  # killed before its first checkpoint
    record = dict(seed=0, warm_start_steps=2, calibration_accuracy=0.5)
    (tmp_path / "toy.json").write_text(json.dumps(record))
    calls = []
    monkeypatch.setattr(toy, "main", calls.append)
    monkeypatch.setattr(toy, "comparison_table", lambda out, seeds: "")
    monkeypatch.setattr(toy, "cache_folder", lambda seed=0, right_drafts=0.5: tmp_path)
    monkeypatch.setattr(plot, "plot_training", lambda runs, path: path)
    toy.compare(["--output-dir", str(tmp_path), "--seeds", "0"])
    assert [argv[-1] for argv in calls] == ["--resume", "--overwrite"]


def test_a_toy_build_killed_while_saving_leaves_no_cache_that_looks_complete(tmp_path, monkeypatch):
    def killed_mid_save(folder, policy, parts):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(toy, "warm_start", lambda *args, **kwargs: (2, 0.5, 1.0))
    monkeypatch.setattr(igrpo, "save", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        toy.build(tmp_path / "toy-seed0", igrpo.Config(**toy.SETTINGS))
    assert not (tmp_path / "toy-seed0").exists() and not toy.is_complete(tmp_path / "toy-seed0")
