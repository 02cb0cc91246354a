"""The specification of igrpo.py's scaling out: LoRA adapters, and torchrun data parallelism (gloo, CPU)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

import functools
import json
import re
import socket
import sys

import pytest
import torch
import torch.multiprocessing

import igrpo
from test_igrpo import tiny, tiny_config  # noqa: F401  (tiny is a fixture)

PROMPTS = ["Problem: What is 1 + 1?\n\nSolution:", "Problem: What is 7 + 1?\n\nSolution:"]
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.25, -0.25])  # 2 problems x 4 completions


def lora_model(tiny, tmp_path, dtype=torch.float32, **overrides):
    cfg = tiny_config(tiny, tmp_path, lora_rank=4, lora_alpha=8.0, **overrides)
    model, tokenizer = igrpo.load_model(cfg.model, cfg, dtype, "cpu")
    return igrpo.apply_lora(model, cfg), tokenizer, cfg


def fixed_samples(model, tokenizer, cfg):
    torch.manual_seed(0)
    return igrpo.sample(model, tokenizer, PROMPTS, cfg, per_prompt=4, temperature=1.0)


def update(model, samples, cfg, ref_model=None, advantages=ADVANTAGES, optimizer=None):
    master = igrpo.master_weights(model)
    optimizer = optimizer or torch.optim.AdamW(master, lr=cfg.lr)
    keep = torch.ones(len(advantages), dtype=torch.bool)
    return igrpo.policy_update(model, optimizer, master, samples, advantages, keep, cfg, ref_model)


def logprobs(model, samples):
    with torch.no_grad():
        return igrpo.token_logprobs(model, samples.input_ids, samples.attention_mask, samples.prompt_length,
                                    samples.completion_mask, 1.0)[0]


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------
def test_lora_trains_only_fp32_adapters_over_a_frozen_bf16_base(tiny, tmp_path):
    model, _, _ = lora_model(tiny, tmp_path, torch.bfloat16)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and p.dtype == torch.float32 for name, p in trainable.items())
    assert all(p.dtype == torch.bfloat16 for name, p in model.named_parameters() if not p.requires_grad)
    master = igrpo.master_weights(model)  # fp32 adapters are their own master weights: no copies
    assert len(master) == len(trainable) and all(any(m is p for p in trainable.values()) for m in master)


def test_a_lora_adapter_on_the_output_layer_shapes_the_log_probs_and_gets_gradients(tiny, tmp_path):
    model, tokenizer, cfg = lora_model(tiny, tmp_path, lora_targets="q_proj,v_proj,lm_head")
    with torch.no_grad():  # as after some updates: the adapters' B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([tokenizer("What is 3 + 1? It is 4, so 4.").input_ids])
    mask = torch.ones(1, 6, dtype=torch.bool)
    logp = igrpo.token_logprobs(model, ids, torch.ones_like(ids), ids.shape[1] - 6, mask, 0.7)[0]
    reference = torch.log_softmax(model(input_ids=ids).logits[:, -7:-1] / 0.7, -1)
    assert torch.allclose(logp, reference.gather(-1, ids[:, -6:, None]).squeeze(-1), atol=1e-5)
    logp.sum().backward()
    head_adapters = [p for name, p in model.named_parameters() if "lm_head" in name and p.requires_grad]
    assert head_adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_adapters)


def test_a_lora_update_changes_only_adapters_and_the_frozen_base_stays_bit_identical(tiny, tmp_path):
    model, tokenizer, cfg = lora_model(tiny, tmp_path, lr=0.05)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    samples = fixed_samples(model, tokenizer, cfg)
    for _ in range(2):
        update(model, samples, cfg)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # B starts at zero; it must have moved


def test_k3_kl_to_the_adapter_disabled_reference_is_zero_at_step_zero_and_not_after(tiny, tmp_path):
    model, tokenizer, cfg = lora_model(tiny, tmp_path, lr=0.05, beta=0.1)
    base, _ = igrpo.load_model(cfg.model, cfg, torch.float32, "cpu")
    samples = fixed_samples(model, tokenizer, cfg)
    master = igrpo.master_weights(model)
    optimizer = torch.optim.AdamW(master, lr=cfg.lr)
    kls = [update(model, samples, cfg, model, optimizer=optimizer)["kl"] for _ in range(3)]
    assert kls[0] == 0.0 and kls[2] > 0.0
    with igrpo.reference_policy(model, model):  # the reference is the base model exactly, with no copy
        assert torch.allclose(logprobs(model, samples), logprobs(base, samples), atol=1e-6)
    assert not torch.allclose(logprobs(model, samples), logprobs(base, samples), atol=1e-3)  # back on


def test_saved_adapter_and_merged_model_reload_with_the_trained_log_probs(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model, tokenizer, cfg = lora_model(tiny, tmp_path, lr=0.05, save_merged=True)
    samples = fixed_samples(model, tokenizer, cfg)
    for _ in range(2):
        update(model, samples, cfg)
    trained = logprobs(model, samples)
    igrpo.save(model, tokenizer, tmp_path / "adapter")
    igrpo.save_merged(tmp_path / "adapter", tmp_path / "merged", cfg, torch.float32)
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the adapter alone, not the base again
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model), tmp_path / "adapter")
    by_igrpo, _ = igrpo.load_model(str(tmp_path / "adapter"), cfg, torch.float32, "cpu")  # what eval.py calls
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(cfg.model)
    assert not torch.allclose(logprobs(base, samples), trained, atol=1e-3)
    for reloaded in (by_peft.get_base_model(), by_igrpo, merged):
        assert torch.allclose(logprobs(reloaded, samples), trained, atol=1e-5)


def test_a_short_one_process_lora_run_with_kl_saves_the_adapter_and_the_merged_model(tiny, tmp_path):
    igrpo.train(tiny_config(tiny, tmp_path, lora_rank=4, beta=0.01, save_merged=True,
                            gradient_checkpointing=True))
    assert not torch.distributed.is_initialized()  # without torchrun no process group is created
    steps = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(steps) == 2 and all(step["kl"] is not None for step in steps)
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "final-merged" / "config.json").is_file()


@pytest.mark.parametrize("overrides,message", [
    (dict(lora_rank=-1), "--lora-rank -1"),
    (dict(save_merged=True), "--save-merged: only with --lora-rank"),
    (dict(lora_rank=4, lora_targets="no_such_proj"), "--lora-targets 'no_such_proj'"),
    (dict(lora_rank=4, resume=True), "--resume with --lora-rank: not supported yet"),
])
def test_bad_lora_settings_stop_with_a_clear_message(tiny, tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        igrpo.train(tiny_config(tiny, tmp_path, **overrides))


def test_lora_without_peft_installed_is_a_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(SystemExit, match=re.escape("--lora-rank: LoRA needs the optional peft package")):
        igrpo.train(tiny_config(tiny, tmp_path, lora_rank=4))


# ----------------------------------------------------------------------------------------------
# torchrun: two gloo processes on the CPU
# ----------------------------------------------------------------------------------------------
def spawn_two_ranks(worker, *args):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(port, *args), nprocs=2, join=True)


def join_as(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def train_on_rank(rank, port, tiny, tmp_path):
    join_as(rank, port)
    real_save = igrpo.save

    def save_and_record(model, tokenizer, folder, *state):  # every rank's weights, for the test to compare
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                   tmp_path / f"weights-{folder.name}-rank{rank}.pt")
        real_save(model, tokenizer, folder, *state)
    igrpo.save = save_and_record
    alternate = lambda completions, *_: igrpo.Scores(*(torch.arange(len(completions)) % 2.0,) * 2,
                                                     torch.zeros(0), 0)
    igrpo.score = alternate  # every group's rewards differ, so every step has a gradient
    cfg = tiny_config(tiny, tmp_path, lora_rank=4, beta=0.01, lr=0.05, save_every=1, eval_limit=3,
                      eval_dataset=str(tiny / "train.jsonl"), output_dir=str(tmp_path / f"run-rank{rank}"))
    igrpo.train(cfg)


def test_two_ranks_train_end_to_end_hold_identical_weights_and_only_rank_0_writes(tiny, tmp_path):
    spawn_two_ranks(train_on_rank, tiny, tmp_path)
    assert not (tmp_path / "run-rank1").exists()
    run = tmp_path / "run-rank0"
    assert (run / "args.json").is_file() and (run / "final" / "adapter_config.json").is_file()
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2, 2] and "eval_accuracy" in records[0]
    for folder in ("step-1", "step-2", "final"):
        rank0, rank1 = (torch.load(tmp_path / f"weights-{folder}-rank{r}.pt") for r in (0, 1))
        assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert any(p.abs().max() > 0 for name, p in rank0.items() if "lora_B" in name)  # it trained


def checkpoint_on_rank(rank, port, tiny, tmp_path):
    join_as(rank, port)
    igrpo.setup_distributed()
    cfg = tiny_config(tiny, tmp_path)
    model, tokenizer = igrpo.load_model(cfg.model, cfg, torch.float32, "cpu")
    master = igrpo.master_weights(model)
    optimizer, out = torch.optim.AdamW(master), tmp_path / "run"
    out.mkdir(exist_ok=True)
    metrics = open(out / "metrics.jsonl" if rank == 0 else os.devnull, "a")
    torch.manual_seed(rank)  # as train() seeds: each rank its own stream
    igrpo.save_checkpoint(out, 1, model, tokenizer, optimizer, master, [], metrics, cfg)
    metrics.close()
    after_save = torch.rand(4)
    igrpo.barrier()  # rank 0 has written step-1
    torch.manual_seed(1234)
    igrpo.load_checkpoint(out / "step-1", model, optimizer, master, out / "metrics.jsonl")
    torch.save((after_save, torch.rand(4)), tmp_path / f"draws-rank{rank}.pt")


def test_a_resumed_torchrun_run_gives_each_rank_back_its_own_random_stream(tiny, tmp_path):
    spawn_two_ranks(checkpoint_on_rank, tiny, tmp_path)
    draws = [torch.load(tmp_path / f"draws-rank{rank}.pt") for rank in (0, 1)]
    for expected, resumed in draws:
        assert torch.equal(expected, resumed)
    assert not torch.equal(draws[0][1], draws[1][1])


def test_the_resume_command_printed_under_torchrun_starts_with_torchrun(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["igrpo.py", "--model", "m", "--overwrite"])
    monkeypatch.setattr(igrpo, "process_count", lambda: 2)
    assert igrpo.resume_command() == "torchrun --nproc-per-node=2 igrpo.py --model m --resume"


def build_toy_on_rank(rank, port, tmp_path):
    join_as(rank, port)
    import toy
    toy.CALIBRATION_PROBLEMS = 8
    toy.warm_start = functools.partial(toy.warm_start, band=(0.0, 1.0), check_every=2)  # met at the first check
    toy.cache_folder = lambda seed=0: tmp_path / "toy-seed0"
    with igrpo.main_process_first():  # as toy.main: rank 0 builds, the others wait
        toy.prepare(igrpo.Config(max_completion_tokens=8), given={"max_completion_tokens"})


def test_under_torchrun_rank_0_builds_the_toy_world_alone_while_the_other_ranks_wait(tmp_path):
    import toy
    spawn_two_ranks(build_toy_on_rank, tmp_path)
    assert toy.is_complete(tmp_path / "toy-seed0")


LOSSES = ("grpo", "dapo", "dr_grpo")  # per-completion mean, global token mean, constant normalizer


def sgd_step(tiny, tmp_path, loss, samples, advantages):
    """SGD with lr 1 and no clipping: the weight change is minus the step's gradient."""
    cfg = tiny_config(tiny, tmp_path, loss=loss, max_grad_norm=1e9)
    model, _ = igrpo.load_model(cfg.model, cfg, torch.float32, "cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    update(model, samples, cfg, advantages=advantages, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def update_on_rank(rank, port, tiny, tmp_path):
    join_as(rank, port)
    igrpo.setup_distributed()
    batch = torch.load(tmp_path / "batch.pt", weights_only=False)
    rows = torch.arange(4 * rank, 4 * rank + 4)  # this rank's problem: one group
    samples = igrpo.Samples(batch.input_ids[rows], batch.attention_mask[rows], batch.prompt_length,
                            batch.completion_mask[rows], [batch.texts[i] for i in rows])
    changes = {loss: sgd_step(tiny, tmp_path, loss, samples, ADVANTAGES[rows]) for loss in LOSSES}
    torch.save(changes, tmp_path / f"changes-rank{rank}.pt")


def test_two_process_gradient_equals_the_one_process_gradient_over_the_same_problems(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path)
    model, tokenizer = igrpo.load_model(cfg.model, cfg, torch.float32, "cpu")
    batch = fixed_samples(model, tokenizer, cfg)
    lengths = torch.tensor([8, 5, 3, 8, 8, 8, 6, 8])  # some stopped early: the ranks hold 24 and 30 tokens
    batch.completion_mask = torch.arange(batch.completion_mask.shape[1])[None] < lengths[:, None]
    batch.attention_mask[:, batch.prompt_length:] = batch.completion_mask
    torch.save(batch, tmp_path / "batch.pt")
    spawn_two_ranks(update_on_rank, tiny, tmp_path)
    for loss in LOSSES:
        one_process = sgd_step(tiny, tmp_path, loss, batch, ADVANTAGES)
        assert any(change.abs().max() > 0 for change in one_process.values())
        for rank in (0, 1):
            two_processes = torch.load(tmp_path / f"changes-rank{rank}.pt")[loss]
            for name, change in one_process.items():
                assert torch.allclose(two_processes[name], change, atol=1e-7, rtol=1e-4), (loss, rank, name)


def overlapped_run_on_rank(rank, port, tiny, tmp_path):
    join_as(rank, port)
    calls, real_sample = [], igrpo.sample

    def sample(model, tokenizer, prompts, cfg, **options):
        calls.append([re.search(r"What is \d+ \+ 1\?", prompt).group() for prompt in prompts])
        return real_sample(model, tokenizer, prompts, cfg, **options)
    igrpo.sample = sample
    igrpo.train(tiny_config(tiny, tmp_path, steps=2, prompts_per_step=4, overlap_drafts=True,
                            save_every=1, output_dir=str(tmp_path / "run")))
    torch.save(calls, tmp_path / f"calls-rank{rank}.pt")


def test_under_torchrun_each_rank_drafts_its_own_share_of_the_next_steps_problems(tiny, tmp_path):
    spawn_two_ranks(overlapped_run_on_rank, tiny, tmp_path)
    calls = [torch.load(tmp_path / f"calls-rank{rank}.pt") for rank in (0, 1)]
    for drafts, both, refinements in calls:  # step 1: drafts, then one call; step 2: one call
        assert len(both) == 2 * 4 and set(both[:4]) == set(drafts)  # 2 problems x (2 + 2) rows
        assert set(refinements) == set(both[4:]) != set(drafts)  # step 2 refines what step 1 drafted
    assert not set(calls[0][2]) & set(calls[1][2])  # the ranks' shares differ
    state = torch.load(tmp_path / "run" / "step-1" / "trainer_state.pt")
    assert [len(drafted["best"]) for drafted in state["drafted"]] == [2, 2]  # one entry per rank
