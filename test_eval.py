"""The specification of eval.py and judge.py, as tests. Offline: tiny local models, a fake
endpoint on 127.0.0.1."""
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; fail fast, before any HF

import http.server
import itertools
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

import eval as evaluation
import igrpo
import judge
from conftest import tiny_config

DATA = evaluation.DATA  # the benchmark files shipped in data/


# ----------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------
def brute_force_pass_at_k(outcomes, k):
    """Fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 7) for c in range(n + 1)
                                   for k in range(1, n + 1)])
def test_pass_at_k_matches_brute_force_over_subsets(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(outcomes, k))


def test_majority_vote_pools_equivalent_spellings():
    # 2 votes vs 2: the first wins
    assert evaluation.majority_correct(["\\frac{1}{2}", "0.5", "3", "3", None], "1/2")
    assert evaluation.majority_correct(["7", "\\frac12", "0.5", "1/2"], "0.5")
    assert not evaluation.majority_correct(["7", "7", "0.5"], "0.5")
    assert not evaluation.majority_correct([None, None], "1")


# ----------------------------------------------------------------------------------------------
# The shipped benchmark files
# ----------------------------------------------------------------------------------------------
def run_eval(tiny, tmp_path, *extra):  # --data-dir: the default, the shipped data/
    return evaluation.main(["--model", str(tiny / "model"), "--chat-template", "off",
                            "--max-completion-tokens", "6", "--output-dir", str(tmp_path / "eval"),
                            *extra])


def evaluate(tiny, tmp_path, benchmark, *extra):
    return run_eval(tiny, tmp_path, "--benchmarks", str(benchmark), *extra)


def saved(tmp_path, name, folder="eval"):
    """A JSON file eval.py wrote in the output folder."""
    return json.loads((tmp_path / folder / name).read_text())


def written_rows(tmp_path, name="mine.jsonl"):
    return [json.loads(line) for line in (tmp_path / "eval" / name).read_text().splitlines()]


def small_benchmark(tmp_path, count=4):
    benchmark = tmp_path / "mine.jsonl"
    benchmark.write_text("".join(json.dumps({"problem": f"What is {a} + 1?", "answer": str(a + 1)})
                                 + "\n" for a in range(count)))
    return benchmark


SUMMARY_KEYS = {"problems", "k", "avg_at_k", "pass_at_k", "maj_at_k", "no_answer_rate",
                "mean_completion_tokens"}


def test_the_shipped_data_folder_is_the_default_and_holds_each_benchmark_with_its_stated_count():
    shipped = Path(evaluation.__file__).parent / "data"
    assert evaluation.parse_args(["--model", "m"]).data_dir == str(shipped)
    stated = {}  # file -> problems, from data/README.md's table
    for line in (DATA / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 3 and cells[1].endswith(".jsonl"):
            stated[cells[1]] = int(cells[2])
    assert set(stated) == {file for file, *_ in evaluation.BENCHMARKS.values()}
    for file, count in stated.items():
        rows = [json.loads(line) for line in (DATA / file).read_text().splitlines()]
        assert len(rows) == count and all(row["problem"] and row["answer"] for row in rows), file


def test_a_benchmark_neither_in_data_dir_nor_on_the_hub_is_one_line_naming_data_dir(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"--benchmarks aime24: no aime24.jsonl in --data-dir "
                                         r"\S*empty, and from the hub: .*HuggingFaceH4/aime_2024"):
        evaluate(tiny, tmp_path, "aime24", "--data-dir", str(tmp_path / "empty"))


def test_paper_sample_counts_are_the_defaults():
    assert evaluation.BENCHMARKS["aime24"][4] == evaluation.BENCHMARKS["aime25"][4] == 64
    assert {evaluation.BENCHMARKS[n][4] for n in ("amc23", "math500", "gsm8k", "minerva")} == {8}


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def test_eval_writes_a_summary_and_every_completion_for_two_shipped_benchmarks(tiny, tmp_path):
    results = evaluate(tiny, tmp_path, "gsm8k,aime24", "--limit", "2", "--k", "3")
    assert set(results) == {"gsm8k", "aime24"}
    summary = saved(tmp_path, "summary.json")
    for name in ("gsm8k", "aime24"):
        assert SUMMARY_KEYS <= set(summary["results"][name])
        assert summary["results"][name]["problems"] == 2 and summary["results"][name]["k"] == 3
        rows = written_rows(tmp_path, f"{name}.jsonl")
        assert len(rows) == 2 and all(len(r["samples"]) == 3 for r in rows)
        assert {"completion", "extracted", "correct", "tokens"} <= set(rows[0]["samples"][0])
    assert summary["results"]["gsm8k"]["avg_at_k"] <= summary["results"]["gsm8k"]["pass_at_k"]


def test_a_prompt_that_fills_the_models_context_is_scored_unanswered(tiny, tmp_path):
    benchmark = small_benchmark(tmp_path, count=1)
    with open(benchmark, "a") as file:  # the tiny model reads 256 positions
        problem = "What is " + " + ".join(["1"] * 300) + "?"
        file.write(json.dumps({"problem": problem, "answer": "9"}) + "\n")
    results = evaluate(tiny, tmp_path, benchmark, "--k", "2")
    assert results["mine"]["problems"] == 2 and results["mine"]["no_answer_rate"] >= 0.5
    rows = sorted(written_rows(tmp_path), key=lambda row: row["index"])
    assert [row.get("prompt_too_long", False) for row in rows] == [False, True]


def test_the_progress_bar_counts_problems_not_generate_calls(tiny, tmp_path, capsys):
    evaluate(tiny, tmp_path, small_benchmark(tmp_path), "--k", "2")  # one generate call
    assert "4/4 [" in capsys.readouterr().err


def test_refine_rounds_report_the_refined_accuracy_beside_the_single_pass(tiny, tmp_path):
    benchmark = tmp_path / "mine.jsonl"
    benchmark.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    results = evaluate(tiny, tmp_path, benchmark, "--k", "2", "--refine-rounds", "1")
    assert {"avg_at_k", "refined_1_avg_at_k"} <= set(results["mine"])
    row, = written_rows(tmp_path)
    assert len(row["refined"]) == 1 and len(row["refined"][0]) == 2


def test_the_printed_table_gives_accuracies_in_percent_while_the_summary_keeps_fractions(
        tiny, tmp_path, capsys):
    evaluation.print_table({"gsm8k": dict(problems=2, k=4, avg_at_k=0.375, pass_at_k=0.5,
                                          maj_at_k=0.5, no_answer_rate=0.125,
                                          mean_completion_tokens=12.5, refined_1_avg_at_k=0.625)})
    header, row = capsys.readouterr().out.splitlines()
    assert all(h in header for h in ("avg@k %", "pass@k %", "refined 1 avg@k %"))
    assert row.split() == ["gsm8k", "2", "4", "37.5", "50.0", "50.0", "12.5", "12.5", "62.5"]
    results = evaluate(tiny, tmp_path, small_benchmark(tmp_path, count=1), "--k", "2")
    summary = saved(tmp_path, "summary.json")["results"]["mine"]
    assert summary["avg_at_k"] == results["mine"]["avg_at_k"]
    assert 0 <= summary["no_answer_rate"] <= 1


# ----------------------------------------------------------------------------------------------
# Resuming: what a rerun into the same --output-dir finds there
# ----------------------------------------------------------------------------------------------
def test_a_rerun_resumes_and_generates_only_unfinished_problems(tiny, tmp_path, monkeypatch):
    benchmark = small_benchmark(tmp_path)
    evaluate(tiny, tmp_path, benchmark, "--limit", "2", "--k", "2")
    asked, real_sample = [], igrpo.sample

    def sample(model, tokenizer, prompts, *args, **kwargs):
        asked.extend(prompts)
        return real_sample(model, tokenizer, prompts, *args, **kwargs)
    monkeypatch.setattr(igrpo, "sample", sample)
    results = evaluate(tiny, tmp_path, benchmark, "--k", "2")
    assert len(asked) == 2 and all("What is 2 + 1?" in p or "What is 3 + 1?" in p for p in asked)
    assert results["mine"]["problems"] == 4
    assert len(written_rows(tmp_path)) == 4


def test_a_rerun_with_other_settings_is_refused_naming_what_differs(tiny, tmp_path):
    benchmark = small_benchmark(tmp_path)
    evaluate(tiny, tmp_path, benchmark, "--limit", "1", "--k", "2")
    differ = r"other settings \(--k 2 there, 3 here; --temperature 0.6 there, 1.0 here\)"
    with pytest.raises(SystemExit, match=differ):
        evaluate(tiny, tmp_path, benchmark, "--k", "3", "--temperature", "1.0")
    (tmp_path / "eval" / "settings.json").unlink()  # completions nobody can vouch for
    with pytest.raises(SystemExit, match="holds completions without a settings.json"):
        evaluate(tiny, tmp_path, benchmark, "--k", "2")


def test_a_last_line_cut_by_a_kill_is_redone_and_a_broken_line_elsewhere_is_named(
        tiny, tmp_path, capsys):
    benchmark, results = small_benchmark(tmp_path), tmp_path / "eval" / "mine.jsonl"
    evaluate(tiny, tmp_path, benchmark, "--limit", "2", "--k", "2")
    lines = results.read_text().splitlines()
    results.write_text(lines[0] + "\n" + lines[1][:len(lines[1]) // 2])  # killed mid-write
    rerun = evaluate(tiny, tmp_path, benchmark, "--limit", "2", "--k", "2")
    assert rerun["mine"]["problems"] == 2
    assert "the last line is cut short" in capsys.readouterr().out
    assert [row["index"] for row in written_rows(tmp_path)] == [0, 1]
    results.write_text("{not json\n" + results.read_text())
    with pytest.raises(SystemExit, match=r"mine.jsonl: line 1 is not valid JSON"):
        evaluate(tiny, tmp_path, benchmark, "--limit", "2", "--k", "2")


def test_a_whole_last_row_that_lost_its_newline_is_kept_and_the_next_row_starts_a_line(
        tiny, tmp_path):
    benchmark, results = small_benchmark(tmp_path), tmp_path / "eval" / "mine.jsonl"
    evaluate(tiny, tmp_path, benchmark, "--limit", "2", "--k", "2")
    results.write_text(results.read_text().rstrip("\n"))
    evaluate(tiny, tmp_path, benchmark, "--k", "2")
    assert [row["index"] for row in written_rows(tmp_path)] == [0, 1, 2, 3]


def test_finished_rows_are_on_disk_whenever_a_resumed_run_generates(tiny, tmp_path, monkeypatch):
    """So a kill at any moment (no cleanup, no flush) loses none of them."""
    benchmark = small_benchmark(tmp_path, count=6)
    evaluate(tiny, tmp_path, benchmark, "--limit", "2", "--k", "2")
    rows_on_disk, real_sample = [], igrpo.sample

    def sample(*args, **kwargs):
        rows_on_disk.append(len(written_rows(tmp_path)))
        return real_sample(*args, **kwargs)
    monkeypatch.setattr(igrpo, "sample", sample)
    evaluate(tiny, tmp_path, benchmark, "--k", "2", "--generation-batch-size", "2")
    assert rows_on_disk == [2, 3, 4, 5]  # one problem a call


def test_a_model_that_fails_to_load_leaves_nothing_that_refuses_the_corrected_command(
        tiny, tmp_path):
    benchmark = small_benchmark(tmp_path)
    with pytest.raises(SystemExit, match="--model"):
        evaluate(tiny, tmp_path, benchmark, "--k", "2", "--model", str(tmp_path / "typo"))
    assert not (tmp_path / "eval").exists()
    assert evaluate(tiny, tmp_path, benchmark, "--k", "2")["mine"]["problems"] == 4


def test_a_folder_without_completions_is_not_a_run_and_is_not_refused(tiny, tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "settings.json").write_text(json.dumps(dict(model="another", k=5)))
    (tmp_path / "eval" / "mine.jsonl").write_text("")
    evaluate(tiny, tmp_path, small_benchmark(tmp_path), "--k", "2")
    assert saved(tmp_path, "settings.json")["k"] == 2


@pytest.mark.parametrize("file,text,message", [
    ("settings.json", "{oops", r"settings.json: not valid JSON"),
    ("summary.json", "[]", r"summary.json: not a JSON object \(not written by eval.py\?\)"),
    ("summary.json", '{"results": 3}', r"summary.json: 'results' is not an object"),
])
def test_a_broken_settings_or_summary_file_is_one_line_naming_it(
        tiny, tmp_path, file, text, message):
    benchmark = small_benchmark(tmp_path, count=1)
    evaluate(tiny, tmp_path, benchmark, "--k", "1")
    (tmp_path / "eval" / file).write_text(text)
    with pytest.raises(SystemExit, match=message):
        evaluate(tiny, tmp_path, benchmark, "--k", "1")


def same_named_benchmarks(tmp_path, folders=("a", "b")):
    """folder/test.jsonl for each folder, each with other problems."""
    for offset, folder in enumerate(folders):
        (tmp_path / folder).mkdir()
        numbers = [a + 10 * offset for a in range(2)]
        (tmp_path / folder / "test.jsonl").write_text("".join(
            json.dumps({"problem": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
            for a in numbers))
    return [str(tmp_path / folder / "test.jsonl") for folder in folders]


def test_resume_is_keyed_by_the_problems_not_the_file_name(tiny, tmp_path, monkeypatch):
    first, other = same_named_benchmarks(tmp_path)
    evaluate(tiny, tmp_path, first, "--k", "2")
    with pytest.raises(SystemExit, match=r"test.jsonl, line 1: its problem 1 "
                                         r"\('What is 0 \+ 1\?'\) is not \S*b/test.jsonl's: "
                                         r"the file holds another benchmark's"):
        evaluate(tiny, tmp_path, other, "--k", "2")
    (tmp_path / "c").mkdir()
    copy = tmp_path / "c" / "test.jsonl"
    copy.write_text(Path(first).read_text())
    monkeypatch.setattr(igrpo, "sample", lambda *args, **kwargs: pytest.fail("nothing to generate"))
    assert evaluate(tiny, tmp_path, copy, "--k", "2")["test"]["problems"] == 2


def test_two_benchmarks_that_would_share_a_completions_file_are_refused(tiny, tmp_path):
    first, other = same_named_benchmarks(tmp_path)
    with pytest.raises(SystemExit, match=r"--benchmarks: \S*a/test.jsonl and \S*b/test.jsonl would "
                                         r"both write test.jsonl in --output-dir"):
        evaluate(tiny, tmp_path, f"{first},{other}")


def test_a_run_with_other_benchmarks_adds_them_to_the_summary_beside_the_earlier_ones(
        tiny, tmp_path):
    evaluate(tiny, tmp_path, small_benchmark(tmp_path), "--k", "2", "--limit", "1")
    evaluate(tiny, tmp_path, "aime24", "--k", "2", "--limit", "1")
    summary = saved(tmp_path, "summary.json")
    assert list(summary["results"]) == ["mine", "aime24"]
    assert summary["results"]["aime24"]["source"] == str(DATA / "aime24.jsonl")


def interrupt_on_call(monkeypatch, number):
    """Ctrl-C arrives during the number-th generate call."""
    calls, real_sample = [], igrpo.sample

    def sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)
    monkeypatch.setattr(igrpo, "sample", sample)


def test_ctrl_c_exits_with_one_line_saying_what_was_kept_and_that_the_same_command_resumes(
        tiny, tmp_path, monkeypatch, capsys):
    command = [small_benchmark(tmp_path), "--k", "2", "--generation-batch-size", "2"]
    interrupt_on_call(monkeypatch, 2)
    with pytest.raises(SystemExit) as stop:
        evaluate(tiny, tmp_path, *command)
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "Traceback" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        f"eval: interrupted; kept in {tmp_path / 'eval'}: mine 1 of 4 problems finished. "
        "Run the same command again to resume"]
    monkeypatch.undo()
    assert evaluate(tiny, tmp_path, *command)["mine"]["problems"] == 4


def test_ctrl_c_before_the_first_completion_says_nothing_was_written(
        tiny, tmp_path, monkeypatch, capsys):
    interrupt_on_call(monkeypatch, 1)
    with pytest.raises(SystemExit):
        evaluate(tiny, tmp_path, small_benchmark(tmp_path), "--k", "2")
    assert "eval: interrupted before the first completion; nothing written" in \
        capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------------------------
# --model
# ----------------------------------------------------------------------------------------------
def test_a_training_run_folder_as_model_evaluates_its_final_checkpoint_and_says_so(
        tiny, tmp_path, capsys):
    run = tmp_path / "runs" / "toy-igrpo-seed0"
    shutil.copytree(tiny / "model", run / "final")
    (run / "metrics.jsonl").write_text("")
    evaluate(tiny, tmp_path, small_benchmark(tmp_path), "--k", "1", "--model", str(run))
    said = [line for line in capsys.readouterr().out.splitlines() if "final" in line]
    assert said == [f"--model {run}: a training run folder; loading its final model, "
                    f"{run / 'final'}"]
    assert saved(tmp_path, "settings.json")["model"] == str(run / "final")


def test_a_run_folder_without_final_or_a_folder_without_a_model_is_one_line_pointing_to_final(
        tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit, match=r"--model \S*run: no config.json: not a model folder; "
                                         r"pass a model folder such as a run's final/"):
        evaluate(tiny, tmp_path, "aime24", "--model", str(run))
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"run: a training run folder without final/ \(still "):
        evaluate(tiny, tmp_path, "aime24", "--model", str(run))


def test_the_summary_names_the_algorithm_of_the_run_a_checkpoint_comes_from(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny / "model", run / "final")
    (run / "args.json").write_text(json.dumps(dict(algo="igrpo", seed=0)))
    benchmark = small_benchmark(tmp_path, count=1)
    evaluate(tiny, tmp_path, benchmark, "--k", "1", "--model", str(run / "final"))
    assert saved(tmp_path, "summary.json")["algo"] == "igrpo"
    evaluate(tiny, tmp_path, benchmark, "--k", "1", "--output-dir", str(tmp_path / "hub"))
    assert saved(tmp_path, "summary.json", folder="hub")["algo"] is None


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--benchmarks", "aime2099"], "unknown benchmark 'aime2099'"),
    (["--benchmarks", "missing.jsonl"], "no such file: missing.jsonl"),
    (["--benchmarks", "gsm8k", "--k", "-1"], "--k -1"),
    (["--benchmarks", "gsm8k", "--k", "0"], "--k 0"),
    (["--benchmarks", "gsm8k", "--limit", "0"], "--limit 0: evaluate at least 1 problem"),
])
def test_eval_bad_input_gives_one_clear_message(tiny, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run_eval(tiny, tmp_path, *args)


def test_eval_row_without_an_answer_is_named(tiny, tmp_path):
    benchmark = tmp_path / "bad.jsonl"
    rows = [{"problem": "What is 1 + 1?"}, {"problem": "2?", "answer": "2"}]
    benchmark.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit, match="row 1: empty or missing 'answer'"):
        evaluate(tiny, tmp_path, benchmark)


# ----------------------------------------------------------------------------------------------
# The generative judge
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply,score", [
    ("Score: 1", 1.0), ("score: 0.25", 0.25), ("**Score:** 0.8\n", 0.8), ("I'd say 7/10", 0.7),
    ("Reasoning... Score = 0. Actually, Score: 1", 1.0), ("0.5", 0.5),
    ("The answer is wrong.", None),
    ("Score: 7", None), ("", None), ("Score: 9/10", 0.9),
])
def test_judge_scores_are_parsed_from_messy_replies(reply, score):
    assert judge.parse_score(reply) == score


class FakeJudge(http.server.BaseHTTPRequestHandler):
    replies = []

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = request["messages"][0]["content"]
        FakeJudge.replies.append(prompt)
        right = "Reference answer: 2" in prompt and "\\boxed{2}" in prompt
        content = "Score: 1" if right else "Score: 0"
        body = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_a_judge_endpoint_scores_solutions_in_one_batch(endpoint):
    score = judge.url_judge(endpoint, "judge")
    assert score(["What is 1+1?"] * 2, ["2"] * 2, ["so \\boxed{2}", "so \\boxed{3}"]) == [1.0, 0.0]


def test_judge_rewards_replace_the_checker_or_are_averaged_with_it(endpoint):
    score = judge.url_judge(endpoint, "judge")
    texts, golds, problems = ["\\boxed{2}", "\\boxed{3}"], ["2", "2"], ["What is 1+1?"] * 2
    judged = igrpo.compute_rewards(texts, golds, igrpo.Config(reward="judge"), problems=problems,
                         judge=score)[0]
    assert judged.tolist() == [1.0, 0.0]
    mixed = igrpo.compute_rewards(texts, ["3", "3"], igrpo.Config(reward="rule+judge"),
                                  problems=problems, judge=score)[0]
    assert mixed.tolist() == [0.0, 0.5]


def test_an_unreachable_judge_is_a_clear_error_before_training():
    with pytest.raises(SystemExit, match="--judge-url http://127.0.0.1:9/v1: no usable answer"):
        judge.url_judge("http://127.0.0.1:9/v1", "judge", timeout=1, tries=1)


def test_training_with_a_tiny_local_judge_runs_end_to_end(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, reward="judge", judge_model=str(tiny / "model"), steps=1)
    igrpo.train(cfg)
    record = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert record["judge_unparsed"] >= 0 and "reward" in record


def test_training_with_a_judge_endpoint_uses_it_for_drafts_and_refinements(
        tiny, tmp_path, endpoint):
    FakeJudge.replies.clear()
    cfg = tiny_config(tiny, tmp_path, reward="judge", judge_url=endpoint, steps=1,
                      prompts_per_step=2, group_size=4, num_drafts=2)
    igrpo.train(cfg)
    graded = [r for r in FakeJudge.replies if "Solution to grade" in r]
    assert len(graded) == 2 * 4  # 2 problems x (2 drafts + 2 refinements)


def test_every_judge_reply_without_a_score_is_counted_drafts_and_refinements_alike(
        tiny, tmp_path, capsys):
    def judge_that_never_scores(problems, golds, completions):
        return [None] * len(completions)
    cfg = tiny_config(tiny, tmp_path, reward="judge", steps=2)  # 2 problems x (2 drafts + 2)
    igrpo.train(cfg, igrpo.Parts(judge=judge_that_never_scores))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["judge_unparsed"] for r in records] == [8, 8]
    assert "step 2: warning: 8 of 8 judge replies held no score" in capsys.readouterr().out


def test_a_step_where_most_judge_replies_hold_no_score_is_warned_about_and_the_run_goes_on(
        tiny, tmp_path, capsys):
    def judge_scoring_one_in_four(problems, golds, completions):
        return [1.0 if i % 4 == 0 else None for i in range(len(completions))]
    cfg = tiny_config(tiny, tmp_path, reward="rule+judge", steps=4, algo="grpo")
    igrpo.train(cfg, igrpo.Parts(judge=judge_scoring_one_in_four))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["judge_unparsed"] for r in records] == [6, 6, 6, 6]
    warnings = capsys.readouterr().out
    assert warnings.count("judge replies held no score") == 4 and "6 of 8" in warnings
    assert (tmp_path / "run" / "final").is_dir()


def test_a_judge_that_gives_no_score_for_3_steps_stops_the_run_with_a_checkpoint_to_resume(
        tiny, tmp_path):
    def judge_that_never_scores(problems, golds, completions):
        return [None] * len(completions)
    cfg = tiny_config(tiny, tmp_path, reward="judge", steps=5, save_every=0)
    with pytest.raises(SystemExit, match=r"steps 1 to 3 had no judge reply that held a score .*: "
                                         r"fix the judge, then --resume \(stopped with checkpoint "
                                         r".*step-3\)"):
        igrpo.train(cfg, igrpo.Parts(judge=judge_that_never_scores))
    run = tmp_path / "run"
    assert igrpo.checkpoints(run) == [run / "step-3"] and not (run / "final").exists()

    def judge_that_is_fixed(problems, golds, completions):
        return [1.0] * len(completions)
    igrpo.train(dataclasses.replace(cfg, resume=True), igrpo.Parts(judge=judge_that_is_fixed))
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["judge_unparsed"] for r in records] == [8, 8, 8, 0, 0]
    assert (run / "final").is_dir()


def test_a_judge_that_goes_silent_in_the_last_steps_stops_the_run_there_too_with_no_final_model(
        tiny, tmp_path):
    def judge_silent_from_step_2(problems, golds, completions):
        silent = len(judge_silent_from_step_2.calls) >= 2  # step 1: drafts, then refinements
        judge_silent_from_step_2.calls.append(1)
        return [None if silent else 1.0] * len(completions)
    judge_silent_from_step_2.calls = []
    cfg = tiny_config(tiny, tmp_path, reward="judge", steps=4)
    with pytest.raises(SystemExit, match=r"steps 2 to 4 had no judge reply that held a score .*"
                                         r"\(stopped with checkpoint .*step-4\)"):
        igrpo.train(cfg, igrpo.Parts(judge=judge_silent_from_step_2))
    assert not (tmp_path / "run" / "final").exists()

def test_a_judge_endpoint_that_goes_down_mid_run_counts_as_no_score_and_says_why(capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    score = judge.url_judge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge",
                            timeout=1, tries=1)
    server.shutdown()
    server.server_close()  # now the port refuses connections, as a judge server that died
    assert score(["What is 1+1?"] * 2, ["2"] * 2, ["\\boxed{2}", "\\boxed{3}"]) == [None, None]
    said = capsys.readouterr().out
    assert "judge: no reply to 2 of 2 requests from http://127.0.0.1:" in said
    assert "(URLError" in said and "counted as replies with no score" in said


class SlowJudge(FakeJudge):
    def do_POST(self):
        time.sleep(0.5)
        super().do_POST()


def test_a_slow_judge_endpoint_says_that_the_run_is_waiting_on_it(capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        score = judge.url_judge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge",
                                notice_every=0.2)
        assert score(["What is 1+1?"], ["2"], ["\\boxed{2}"]) == [1.0]
    finally:
        server.shutdown()
    assert "judge: waiting on http://127.0.0.1:" in capsys.readouterr().out


def test_the_first_judge_reply_without_a_score_is_printed_once(capsys):
    score = judge.model_judge(lambda prompts: ["The solution looks fine to me."] * len(prompts))
    assert score(["p"] * 2, ["2"] * 2, ["a", "b"]) == [None, None]
    assert score(["p"], ["2"], ["c"]) == [None]
    said = capsys.readouterr().out
    assert said.count("judge: a reply that holds no score, counted 0") == 1
    assert "'The solution looks fine to me.'" in said


class DownJudge(FakeJudge):
    requests = []

    def do_POST(self):
        DownJudge.requests.append(1)
        self.send_error(503, "overloaded")


def test_an_endpoint_that_is_down_costs_one_round_of_retries_per_call_not_one_per_request():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        score = judge.url_judge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge",
                                tries=3)
        server.RequestHandlerClass, DownJudge.requests = DownJudge, []  # up for the probe only
        assert score(["p"] * 40, ["2"] * 40, ["\\boxed{2}"] * 40) == [None] * 40
    finally:
        server.shutdown()
    assert 3 <= len(DownJudge.requests) <= 16 * 3  # the 16 in flight at most; 40 x 3 without


@pytest.mark.parametrize("returned,problem", [
    ([1.0], "the judge gave 1 scores for 2 completions"),
    ([1.0, 0.5, 0.0], "the judge gave 3 scores for 2 completions"),
    ([1.0, "yes"], "one of them 'yes': each must be a number in [0, 1] or None"),
    ([float("nan"), 1.0], "one of them nan"), ([2.0, None], "one of them 2.0")])
def test_a_judge_function_that_returns_what_is_not_a_score_each_is_one_line(returned, problem):
    with pytest.raises(SystemExit, match=re.escape(problem)):
        score = judge.checked(lambda *_: iter(returned))
        score(["p", "p"], ["2", "2"], ["\\boxed{2}", "\\boxed{3}"])


def test_a_judge_function_of_ones_own_is_checked_in_training_too(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, reward="judge", steps=1)
    with pytest.raises(SystemExit, match=re.escape("one of them 2.0: each must be a number")):
        igrpo.train(cfg, igrpo.Parts(judge=lambda problems, golds, texts: [2.0] * len(texts)))


def test_judge_scores_may_be_any_real_number_type_or_none():
    import numpy
    scores = [numpy.float32(0.5), 1, None, numpy.float64(0.25)]
    rewards = igrpo.compute_rewards(["a"] * 4, ["2"] * 4, igrpo.Config(reward="judge"),
                                    problems=["p"] * 4,
                                    judge=judge.checked(lambda *_: scores)).total
    assert rewards.tolist() == [0.5, 1.0, 0.0, 0.25]
