"""`python toy.py explain` as a specification: what it prints is what the trainer computes and
logs for the same step. Offline, CPU, a tiny toy (a 2-step warm start), a few seconds a test."""
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import igrpo
import toy

# A small step: 3 problems, groups of 4 (iGRPO: 2 drafts + 2 refinements), short completions.
# A warm start of 2 steps gets no sum right, so a judge of our own gives rewards that differ.
# The run scores 2 held-out problems first, as `python toy.py` does, and logs step 1's samples.
SMALL = ["--prompts-per-step", "3", "--group-size", "4", "--num-drafts", "2",
         "--max-completion-tokens", "10", "--max-draft-tokens", "6", "--steps", "1",
         "--reward", "judge", "--judge-url", "http://judge.invalid", "--eval-limit", "2",
         "--eval-samples", "1", "--log-completions-every", "1"]
TINY_MODEL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=512)
LOGGED = ("reward", "accuracy", "draft_reward", "best_draft_reward", "loss", "grad_norm", "lr",
          "clip_frac", "kl", "entropy", "dropped_groups")


def flat(text):
    """The printout with its wrapped lines joined: phrases are found whatever the wrapping."""
    return " ".join(text.split())


def judge(problems, golds, completions):
    """Deterministic scores in {0, 0.5, 1} from the text: the same in explain and in train."""
    return [sum(map(ord, completion)) % 3 / 2 for completion in completions]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A real toy build, of a tiny model, whose band is met at the first check (2 steps)."""
    folder = tmp_path_factory.mktemp("cache") / "toy-test-seed0"
    cfg = toy.ToyConfig(**toy.SETTINGS | dict(max_completion_tokens=8))  # a short calibration
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(toy, "CALIBRATION_PROBLEMS", 8)
        patch.setattr(toy, "MODEL_SIZE", TINY_MODEL)
        toy.build(folder, cfg, seed=0, band=(0.0, 1.0), check_every=2)
    return folder


def logged_step_one(flags, out):
    """(metrics.jsonl's line for step 1, completions.jsonl's lines) of `python toy.py flags`, the
    run whose step 1 explain shows, held-out scoring included."""
    cfg = toy.explain_settings(flags)[0]
    igrpo.train(dataclasses.replace(cfg, output_dir=str(out)), igrpo.Parts(judge=judge))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    completions = [json.loads(line) for line in (out / "completions.jsonl").open()]
    return next(row for row in rows if row.get("step") == 1 and "reward" in row), completions


def assert_same_samples(shown, completions, group_size, drafts):
    """Each logged problem's drafts, d*, and group (texts, rewards, advantages) are explain's."""
    for i, logged in enumerate(completions):
        rows = range(i * group_size, (i + 1) * group_size)
        assert logged["refinements" if drafts else "group"] == [
            dict(text=shown["texts"][j], reward=pytest.approx(shown["rewards"][j]),
                 advantage=pytest.approx(shown["advantages"][j])) for j in rows]
        if drafts:
            assert logged["best_draft"] == shown["best_drafts"][i]
            assert logged["drafts"] == [
                dict(text=text, reward=pytest.approx(reward)) for text, reward in
                zip(shown["drafts"][i * drafts:(i + 1) * drafts], shown["draft_rewards"][i])]


def printed_members(text, group_size):
    """{row: (printed reward, printed advantage)} of each group member the printout shows."""
    members, problem = {}, None
    for line in text.splitlines():
        if found := re.match(r"\u2500\u2500 Problem (\d+) of", line):
            problem = int(found[1]) - 1
        if found := re.match(r" +(?:refinement|completion) (\d+) +reward (\S+) .* A ([+-][\d.]+)",
                             line):
            members[problem * group_size + int(found[1]) - 1] = (found[2], found[3])
    return members


@pytest.mark.parametrize("extra", [[], ["--algo", "grpo", "--beta", "0.04", "--ppo-epochs", "2"],
                                   ["--loss", "dapo"]], ids=["igrpo", "grpo-beta-2-epochs", "dapo"])
def test_explain_prints_the_numbers_the_trainer_logs_for_the_same_step(
        tiny_cache, tmp_path, monkeypatch, capsys, extra):
    monkeypatch.setattr(toy, "cache_folder", lambda *args, **kwargs: tiny_cache)
    monkeypatch.chdir(tmp_path)
    flags = SMALL + extra
    [shown] = toy.explain(flags, judge=judge)
    text = capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # explain trains nothing to disk
    logged, completions = logged_step_one(flags, tmp_path / "run")
    for name in LOGGED:
        expected = logged[name] if logged[name] is None else pytest.approx(logged[name], 1e-6)
        assert shown[name] == expected, name
    assert f"{logged['loss']:+.6g}" in text and f"{logged['grad_norm']:.6g}" in text
    assert f"{logged['lr']:.6g}" in text and f"reward {toy.number(logged['reward'])} " in text
    group_size = 4 if "grpo" in extra else 2
    assert len(shown["rewards"]) == 3 * group_size and len(completions) == 3
    assert_same_samples(shown, completions, group_size, drafts=0 if "grpo" in extra else 2)
    advantages = igrpo.group_advantages(torch.tensor(shown["rewards"]), group_size,
                                        scale_by_std="dr_grpo" not in extra)
    assert shown["advantages"] == pytest.approx(advantages.tolist())
    if "--beta" in extra:  # the reference model is loaded, the KL shown, and r moves in epoch 2
        assert "KL after" in text and "KL: the reference is the warm start" in flat(text)
        assert "r = 1 in epoch 1" in flat(text) and "the mean over 2 epochs" in flat(text)
    members = printed_members(text, group_size)
    assert len(members) >= 2 * group_size  # two or three problems, every member of each group
    for row, (reward, advantage) in members.items():
        assert (reward, advantage) == (toy.number(shown["rewards"][row]),
                                       f"{shown['advantages'][row]:+.3f}")


def test_explain_names_the_first_best_draft_as_d_star_and_shows_q_prime(
        tiny_cache, monkeypatch, capsys):
    monkeypatch.setattr(toy, "cache_folder", lambda *args, **kwargs: tiny_cache)
    toy.explain(SMALL, judge=judge)
    text = capsys.readouterr().out
    problems = text.split("\u2500\u2500 Problem ")[1:]
    assert problems
    for problem in problems:
        rewards = [float(r) for r in re.findall(r"    draft \d+  reward (\S+)", problem)]
        chosen = int(re.search(r"d\* = draft (\d+), the first of the best", problem)[1])
        assert len(rewards) == 2 and chosen == rewards.index(max(rewards)) + 1
        assert "Previous draft (may contain mistakes):" in problem and "Solution:" in problem
    assert "over --max-draft-tokens 6: it lost its first" in text  # q' holds the cut d*
    assert igrpo.SYSTEM_PROMPT[:60] in text.replace("\n    \u250a ", "")  # in full, once
    assert "r = 1 exactly: with one PPO epoch" in flat(text) and "no KL: --beta 0" in flat(text)


def test_explain_builds_a_missing_warm_start_and_writes_both_algorithms_as_markdown(
        tiny_cache, tmp_path, monkeypatch):
    missing, built = tmp_path / "cache" / "toy-missing-seed0", []
    monkeypatch.setattr(toy, "cache_folder", lambda *args, **kwargs: missing)
    monkeypatch.setattr(toy, "build", lambda folder, cfg, seed: built.append(
        shutil.copytree(tiny_cache, folder)))
    page = tmp_path / "docs" / "one-step.md"
    records = toy.explain(SMALL + ["--markdown", str(page)], judge=judge)
    assert built == [missing] and [r["algo"] for r in records] == ["igrpo", "grpo"]
    text = page.read_text()
    assert text.startswith("# One iGRPO and one GRPO step, every number")
    assert f"Written by `python toy.py explain {' '.join(SMALL)} --markdown {page}`" in flat(text)
    assert "## iGRPO\n\n```text\n" in text and "## GRPO\n\n```text\n" in text
    assert "step 1 of `python toy.py " + " ".join(SMALL) + " --algo grpo`" in flat(text)
    blocks = re.findall(r"```text\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.splitlines() if missing.name not in line]
    assert max(map(len, lines)) <= 100  # but the model's path, here a long temporary one


def test_docs_one_step_is_the_commands_output_and_reads_in_100_columns():
    page = Path(__file__).parent / "docs" / "one-step.md"
    text = page.read_text()
    assert "Written by `python toy.py explain --markdown docs/one-step.md`" in flat(text)
    blocks = re.findall(r"```text\n(.*?)```", text, re.S)
    assert len(blocks) == 2 and all(len(line) <= 100 for b in blocks for line in b.splitlines())


def test_toy_help_describes_the_toy_its_subcommands_and_its_own_defaults(capsys):
    with pytest.raises(SystemExit):
        toy.parse_flags(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "offline toy world" in shown and "explain" in shown and "compare" in shown
    assert "(>= 1; default: 60)" in shown  # --steps: the toy's, not igrpo.py's 100
    assert "runs/toy-<algo>-seed<seed>" in shown and "runs/igrpo" not in shown
    assert not re.search(r"\(default: [^)]*\) \(default", shown)  # one default a flag
    with pytest.raises(SystemExit, match="^toy: error: --model m: the toy world trains its own"):
        toy.main(["--model", "m"])
