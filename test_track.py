"""--track: toy runs of 2 steps send metrics.jsonl's numbers and completions.jsonl's texts to
TensorBoard, wandb (offline) and trackio (local); each test reads them back from the files the
tracker wrote. Also: what completions.jsonl holds, and track.py's one-line errors."""
import json
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

import igrpo
import track
from conftest import parity_reward, tiny_config


def tracked_run(tiny, folder, **overrides):
    """2 steps of 4 problems, every step's completions logged, held-out scores at steps 0 and 2;
    rewards that differ between completions, so advantages are not all 0."""
    cfg = tiny_config(tiny, folder, prompts_per_step=4, log_completions_every=1,
                      eval_dataset=str(tiny / "train.jsonl"), eval_limit=2, **overrides)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(igrpo, "math_reward", parity_reward)
        igrpo.train(cfg)
    return Path(cfg.output_dir)


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def logged_numbers(run):
    """{(field, step): value} of every number in metrics.jsonl (None is not a number)."""
    return {(key, row["step"]): value for row in jsonl(run / "metrics.jsonl")
            for key, value in row.items() if key != "step" and value is not None}


def expected_table(run):
    """completions.jsonl as a table: one row per text, drafts, best draft, then refinements."""
    table = []
    for row in jsonl(run / "completions.jsonl"):
        head = [row["step"], row["problem"], row["gold"]]
        table += [head + ["draft", d["text"], d["reward"], None] for d in row.get("drafts", [])]
        if "best_draft" in row:
            table.append(head + ["best draft", row["best_draft"], None, None])
        role = "refinement" if "refinements" in row else "completion"
        table += [head + [role, c["text"], c["reward"], c["advantage"]]
                  for c in row.get("refinements", row.get("group", []))]
    return table


def assert_same_numbers(tracked, run):
    expected = logged_numbers(run)
    assert set(tracked) == set(expected)
    assert {(key, step) for key, step in expected if key == "eval_accuracy"} == {
        ("eval_accuracy", 0), ("eval_accuracy", 2)}
    for key in expected:
        assert tracked[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-6), key


# ----------------------------------------------------------------------------------------------
# TensorBoard: event files in the output folder
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tensorboard_run(tiny, tmp_path_factory):
    return tracked_run(tiny, tmp_path_factory.mktemp("tensorboard"), track="tensorboard")


def events(folder):
    from tensorboard.backend.event_processing import event_accumulator
    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    return accumulator.Reload()


def texts(accumulator, tag):
    """{step: text} of a text summary (torch writes tag as tag/text_summary)."""
    return {event.step: event.tensor_proto.string_val[0].decode()
            for event in accumulator.Tensors(f"{tag}/text_summary")}


def test_tensorboard_holds_every_number_of_metrics_jsonl_at_its_step(tensorboard_run):
    accumulator = events(tensorboard_run)
    tracked = {(tag, event.step): event.value for tag in accumulator.Tags()["scalars"]
               for event in accumulator.Scalars(tag)}
    assert_same_numbers(tracked, tensorboard_run)


def test_tensorboard_shows_each_steps_completions_and_the_settings_as_text(tensorboard_run):
    accumulator = events(tensorboard_run)
    settings = texts(accumulator, "settings")
    assert list(settings) == [0] and "| lr | 0.001 |" in settings[0]
    assert f'| run_name | "{tensorboard_run.name}" |' in settings[0]
    shown = texts(accumulator, "completions")
    assert sorted(shown) == [1, 2]
    for step, problem, gold, role, text, reward, advantage in expected_table(tensorboard_run):
        assert f"(gold answer: `{gold}`)" in shown[step]
        assert "\n".join("    " + line for line in text.split("\n")) in shown[step]
        if advantage is not None:
            assert f"**{role}** reward {reward:.3g}, advantage {advantage:+.3g}" in shown[step]


def test_a_new_run_in_the_folder_replaces_what_tensorboard_showed_and_a_resumed_one_goes_on(
        tmp_path):
    def log(rewards):
        tracker = track.open_tracker("tensorboard", "run", {}, tmp_path)
        for step, reward in rewards.items():
            tracker.log(dict(step=step, reward=reward))
        tracker.close()
    log({1: 1.0, 2: 1.0, 3: 1.0})
    log({1: 2.0, 2: 2.0, 3: 2.0})  # --overwrite: igrpo.py has removed metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # --resume cut it back to step 1
    log({2: 3.0, 3: 3.0})
    accumulator = events(tmp_path)
    assert [(e.step, e.value) for e in accumulator.Scalars("reward")] == [(1, 2.0), (2, 3.0),
                                                                          (3, 3.0)]
    assert list(texts(accumulator, "settings")) == [0, 2]  # the new run's, the resumed part's


# ----------------------------------------------------------------------------------------------
# wandb, offline: the run's records in the .wandb file under the output folder
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wandb_run(tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_PROJECT", raising=False)
        for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            patch.setenv(variable, str(home))
        run = tracked_run(tiny, tmp_path_factory.mktemp("wandb"), track="wandb",
                          run_name="toy-wandb")
    import wandb
    wandb.teardown()  # finish() may return before wandb's service has flushed the .wandb file
    return run


def wandb_records(run):
    """The protobuf records of the run's .wandb file: a LevelDB log (32 KiB blocks, each record
    cut into chunks with a 7-byte header: crc32c, length, type) after a 7-byte W&B header.
    wandb 0.31 ships no Python reader for it, only the record types."""
    from wandb.proto import wandb_internal_pb2
    [path] = run.glob("wandb/offline-run-*/run-*.wandb")
    data, position, chunks, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header: padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunks += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def wandb_history(run):
    """{step: {key: value}} of the run's history."""
    history = {}
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return history


def test_wandb_offline_holds_every_number_of_metrics_jsonl_at_its_step(wandb_run):
    tracked = {(key, step): value for step, items in wandb_history(wandb_run).items()
               for key, value in items.items()
               if not key.startswith(("_", "completions/"))}
    assert_same_numbers(tracked, wandb_run)


def test_wandb_offline_logs_the_settings_once_and_each_steps_completions_as_a_table(wandb_run):
    [run] = [r.run for r in wandb_records(wandb_run) if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("toy-wandb", "igrpo")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 0.001 and config["track"] == "wandb" and config["steps"] == 2
    history, table = wandb_history(wandb_run), []
    assert [step for step in sorted(history) if "completions/path" in history[step]] == [1, 2]
    for step in (1, 2):
        logged = json.loads((next(wandb_run.glob("wandb/offline-run-*/files"))
                             / history[step]["completions/path"]).read_text())
        assert logged["columns"] == track.COLUMNS
        table += logged["data"]
    assert table == expected_table(wandb_run)


# ----------------------------------------------------------------------------------------------
# trackio: its local SQLite database ($TRACKIO_DIR)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trackio_run(tiny, tmp_path_factory):
    """GRPO this time (a group, no drafts). $TRACKIO_DIR is read when trackio is imported."""
    database = tmp_path_factory.mktemp("trackio-database")
    assert "trackio" not in sys.modules, "trackio was imported before $TRACKIO_DIR was set"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACKIO_DIR", str(database))
        run = tracked_run(tiny, tmp_path_factory.mktemp("trackio"), track="trackio",
                          run_name="toy-trackio", algo="grpo")
    import trackio.utils
    assert trackio.utils.TRACKIO_DIR == database and (database / "igrpo.db").is_file()
    return run


def test_trackio_holds_every_number_of_metrics_jsonl_at_its_step(trackio_run):
    from trackio.sqlite_storage import SQLiteStorage
    assert SQLiteStorage.get_runs("igrpo") == ["toy-trackio"]
    tracked = {(key, row["step"]): value for row in SQLiteStorage.get_logs("igrpo", "toy-trackio")
               for key, value in row.items() if key not in ("step", "timestamp", "completions")}
    assert_same_numbers(tracked, trackio_run)


def test_trackio_logs_the_settings_once_and_each_steps_completions_as_a_table(trackio_run):
    from trackio.sqlite_storage import SQLiteStorage
    config = SQLiteStorage.get_run_config("igrpo", "toy-trackio")
    assert config["lr"] == 0.001 and config["algo"] == "grpo" and config["track"] == "trackio"
    tables = [(row["step"], row["completions"]) for row in
              SQLiteStorage.get_logs("igrpo", "toy-trackio") if "completions" in row]
    assert [step for step, _ in tables] == [1, 2]
    assert all(table["_type"] == "trackio.table" for _, table in tables)
    shown = [[row[column] for column in track.COLUMNS] for _, table in tables
             for row in table["_value"]]
    assert shown == expected_table(trackio_run) and {row[3] for row in shown} == {"completion"}


# ----------------------------------------------------------------------------------------------
# completions.jsonl
# ----------------------------------------------------------------------------------------------
def test_completions_jsonl_holds_igrpos_drafts_best_draft_and_refinements_of_3_problems(
        tensorboard_run, tiny):
    golds = {json.loads(line)["question"]: json.loads(line)["answer"].split("#### ")[1]
             for line in (tiny / "train.jsonl").read_text().splitlines()}
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    rows = jsonl(tensorboard_run / "completions.jsonl")
    assert [row["step"] for row in rows] == [1, 1, 1, 2, 2, 2]  # 3 of each step's 4 problems
    for row in rows:
        assert set(row) == {"step", "problem", "gold", "drafts", "best_draft", "refinements"}
        assert golds[row["problem"]] == row["gold"]
        rewards = [draft["reward"] for draft in row["drafts"]]
        assert len(rewards) == 2 and set(rewards) <= {0.0, 1.0}  # --num-drafts 2, parity
        best = row["drafts"][rewards.index(max(rewards))]["text"]  # the first of the best
        assert row["best_draft"] == igrpo.cut_draft(tokenizer, best, 4)  # --max-draft-tokens
        assert len(row["refinements"]) == 2  # --group-size 4 less the 2 drafts
        assert_advantages_follow_rewards(row["refinements"])


def test_completions_jsonl_holds_grpos_whole_group_with_rewards_and_advantages(trackio_run):
    rows = jsonl(trackio_run / "completions.jsonl")
    assert [row["step"] for row in rows] == [1, 1, 1, 2, 2, 2]
    for row in rows:
        assert set(row) == {"step", "problem", "gold", "group"}
        assert len(row["group"]) == 4
        assert_advantages_follow_rewards(row["group"])


def assert_advantages_follow_rewards(completions):
    rewards = torch.tensor([c["reward"] for c in completions])
    advantages = igrpo.group_advantages(rewards, len(completions))
    assert [c["advantage"] for c in completions] == pytest.approx(advantages.tolist(), abs=1e-6)


def test_completions_jsonl_cuts_a_long_text_to_its_start_and_end_around_a_marker(tmp_path):
    long, short = "".join(f"{i:04d}" for i in range(200)), "x" * 600  # 800 and 600 characters
    cfg = igrpo.Config(output_dir=str(tmp_path), algo="grpo")
    batch = [dict(problem=long, answer="7")]
    rewards = igrpo.Rewards(torch.tensor([1.0, 0.0]), torch.zeros(2), torch.zeros(2), 0)
    rollout = igrpo.Rollout(SimpleNamespace(texts=[long, short]), rewards, 2, ["q"])
    igrpo.log_completions(3, batch, rollout, torch.tensor([0.7, -0.7]), cfg)
    [row] = jsonl(tmp_path / "completions.jsonl")
    cut = long[:300] + " [...] " + long[-300:]
    assert row == dict(step=3, problem=cut, gold="7", group=[
        dict(text=cut, reward=1.0, advantage=pytest.approx(0.7)),
        dict(text=short, reward=0.0, advantage=pytest.approx(-0.7))])


# ----------------------------------------------------------------------------------------------
# track.py alone
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", track.KINDS)
def test_a_missing_tracker_package_is_a_one_line_error_with_the_install_command(
        kind, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, kind, None)  # as if it were not installed
    with pytest.raises(SystemExit) as stop:
        track.open_tracker(kind, "run", {}, tmp_path)
    assert str(stop.value) == (f"igrpo: error: --track {kind}: the {kind} package is not "
                               f"installed (pip install {kind})")
    assert list(tmp_path.iterdir()) == []


def test_wandb_without_an_account_stops_before_anything_loads_and_leaves_the_folder_alone(
        tiny, tmp_path, monkeypatch):
    for variable in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(igrpo, "load_model", lambda *args, **kwargs: pytest.fail("it loaded"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')  # an older run
    cfg = tiny_config(tiny, tmp_path, track="wandb", overwrite=True)
    with pytest.raises(SystemExit, match="--track wandb: no wandb account here .*WANDB_MODE=off"):
        igrpo.train(cfg)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "reward": 0.5}\n'


def test_under_torchrun_ranks_other_than_0_log_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tracker = track.open_tracker("tensorboard", "run", {"lr": 1.0}, tmp_path)
    tracker.log(dict(step=1, reward=0.5))
    tracker.log_completions(1, [dict(step=1, problem="p", gold="1", group=[])])
    tracker.close()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    track.open_tracker("tensorboard", "run", {"lr": 1.0}, tmp_path).close()
    assert list(tmp_path.glob("events.out.tfevents.*"))  # rank 0 does write


def test_igrpo_trains_without_track_py_when_no_tracker_is_asked_for(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "track", None)  # igrpo.py copied alone
    igrpo.train(tiny_config(tiny, tmp_path, steps=1, log_completions_every=1))
    assert len(jsonl(tmp_path / "run" / "metrics.jsonl")) == 1
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
