"""
Benchmarks, not tests: numbers to report, with the command that produced them.

    python bench.py checker             # the answer checker's median and worst time per call
    python bench.py step                # one training step's time and peak memory, per phase
    python bench.py step --hidden 896 --layers 24 --vocab 151936 --completion 1024
                                        # ~0.5B, Qwen2-like, on a GPU
    python bench.py logprobs            # peak memory: scale.py's blockwise log-probs vs
                                        # igrpo.py's full float32 log-softmax
    python bench.py step --lora-rank 32 # the same step training LoRA adapters only
    python bench.py step --path plain   # the step with igrpo.py's own parts
    python bench.py fsdp-sampling       # 2 CPU processes: sampling from an FSDP2-sharded model,
                                        # its weights gathered once per call vs at every token

On a CPU, memory comes from torch's profiler (every tensor allocation and free), which also slows
the measured phases: compare CPU times only with other runs of this script.
The step benchmark runs scale.py's parts (as `python scale.py` trains; --path plain: igrpo.py's
own, as `python igrpo.py` trains) and builds a randomly
initialized Llama-style model from a config (no download), so a random model writes to the full
--completion budget: the worst case for time and memory.
"""
import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import igrpo
import scale

HERE = Path(__file__).resolve().parent


def peak_memory(run, device):
    """(run(), peak bytes allocated while it ran, above what was allocated when it started). CUDA:
    the allocator's own counter. CPU: the profiler's record of every tensor allocation and free
    (tensors only, like CUDA's counter; not the process's resident size)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = run()
    changes = sorted((event.start_ns(), event.nbytes())
                     for event in profiler.profiler.kineto_results.events()
                     if event.name() == "[memory]" and event.device_type().name == "CPU")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return result, peak


def bench_checker(args):
    from checker_cases import CHECKER_CASES, DATA, rewrites
    suites = {"case table": [(completion, gold, verdict)
                             for completion, gold, verdict, _ in CHECKER_CASES],
              "shipped golds": []}
    for name in ("math500", "minerva_math", "aime24", "aime25", "amc23", "gsm8k_test"):
        if (DATA / f"{name}.jsonl").exists():
            golds = [json.loads(line)["answer"] for line in open(DATA / f"{name}.jsonl")]
            suites["shipped golds"] += [(f"\\boxed{{{g}}}", g, True) for g in golds]
            suites["shipped golds"] += [(f"\\boxed{{{r}}}", g, True)
                                        for g in golds for r in rewrites(g)]
    # untimed: sympy imports parts of itself on first use
    for completion, gold, _ in suites["case table"]:
        igrpo.math_reward(completion, gold)
    for suite, calls in suites.items():
        if not calls:
            print(f"checker, {suite}: none (no benchmark files in {DATA})")
            continue
        times, right = [], 0
        for completion, gold, verdict in calls:
            started = time.perf_counter()
            reward = igrpo.math_reward(completion, gold)
            times.append((time.perf_counter() - started, completion[:50]))
            right += (reward == 1.0) is verdict
        seconds = sorted(t for t, _ in times)
        worst = max(times)
        p99 = seconds[int(0.99 * len(seconds))]
        print(f"checker, {suite}: {len(calls)} calls, {right} graded right, "
              f"median {statistics.median(seconds) * 1e3:.2f} ms, p99 {p99 * 1e3:.1f} ms, "
              f"worst {worst[0] * 1e3:.1f} ms ({worst[1]!r})")


def random_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    import toy
    texts = [igrpo.build_prompt(None, f"What is {a} + {a}?", igrpo.Config(chat_template="off"))
             for a in range(50)]
    tokenizer = toy.build_tokenizer(texts)
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=heads,
                         intermediate_size=args.hidden * 4, max_position_embeddings=8192,
                         tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return model, tokenizer


def bench_step(args):
    device, dtype = igrpo.device_and_dtype(args.dtype)
    model, tokenizer = random_model(args, device, dtype)
    cfg = scale.ScaleConfig(algo=args.algo, group_size=args.group_size,
                            num_drafts=args.group_size // 2, prompts_per_step=args.prompts,
                            max_completion_tokens=args.completion,
                            max_draft_tokens=args.completion,
                            micro_batch_size=args.micro_batch_size,
                            gradient_checkpointing=args.gradient_checkpointing,
                            chat_template="off", lr=1e-6, lora_rank=args.lora_rank)
    parts = igrpo.Parts()  # --path plain: igrpo.py's own
    if args.path == "scale":
        scale.check_scoring(model, "bench")
        parts = scale.scale_parts(cfg)
    model = scale.apply_lora(model, cfg) if cfg.lora_rank else model
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    step_loop(args, cfg, parts, model, tokenizer, device, dtype)


def step_loop(args, cfg, parts, model, tokenizer, device, dtype):
    master, optimizer = parts.make_optimizer(model, cfg)
    policy = igrpo.Policy(model, tokenizer, optimizer, master)
    params, trained = sum(p.numel() for p in model.parameters()), sum(m.numel() for m in master)
    batch = [{"problem": f"What is {a} + {a}?", "answer": str(2 * a)}
             for a in range(cfg.prompts_per_step)]
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {device} ({device_name}), dtype {dtype}, "
          f"{params / 1e6:.0f}M parameters ({trained / 1e6:.1f}M trained), algo {cfg.algo}, "
          f"{cfg.prompts_per_step} prompts x {cfg.group_size}, "
          f"completion budget {cfg.max_completion_tokens}, "
          f"micro-batch {cfg.micro_batch_size}, "
          f"gradient checkpointing {cfg.gradient_checkpointing}, {args.path} path")
    def live_state_bytes():  # weights, master weights and their gradients, Adam's moments
        tensors = {id(t): t for t in [*model.parameters(), *master]}
        tensors.update({id(m.grad): m.grad for m in master if m.grad is not None})
        tensors.update({id(t): t for state in optimizer.state.values() for t in state.values()
                        if torch.is_tensor(t) and t.dim() > 0})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def allocated_bytes():  # CUDA: every tensor; CPU: the state above (the rest is small)
        return torch.cuda.memory_allocated() if device == "cuda" else live_state_bytes()
    for step in range(args.steps):
        before_sampling = allocated_bytes()
        started = time.time()
        rollout, sample_peak = peak_memory(
            lambda: igrpo.sample_and_score(batch, policy, cfg, parts), device)
        sampled = time.time()
        # random rewards so that every group carries gradient, as in real training
        samples, count = rollout.sequences, len(rollout.sequences.texts)
        advantages = igrpo.group_advantages(torch.rand(count), rollout.per_group)
        keep = torch.ones(count, dtype=torch.bool)
        before_update = allocated_bytes()
        _, update_peak = peak_memory(lambda: igrpo.policy_update(
            policy, samples, advantages, keep, cfg, parts), device)
        done = time.time()
        # the fp32 gradients are freed after each optimizer step; at the update's peak they exist
        state = live_state_bytes() + sum(m.numel() * 4 for m in master)
        # KiB on Linux; the process's peak
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        sample_seconds, update_seconds = sampled - started, done - sampled
        update_tokens = int(samples.lengths.sum())
        generated_tokens = update_tokens + (int(rollout.drafts.lengths.sum()) if rollout.drafts
                                            else 0)
        print(f"step {step}: sampling {sample_seconds:.1f}s ({generated_tokens} tokens, "
              f"{generated_tokens / sample_seconds:.0f} tok/s, "
              f"peak {(before_sampling + sample_peak) / 2**30:.2f} GiB), "
              f"update {update_seconds:.1f}s ({update_tokens} tokens, "
              f"{update_tokens / update_seconds:.0f} tok/s, "
              f"peak {(before_update + update_peak) / 2**30:.2f} GiB, of which state "
              f"{state / 2**30:.2f} GiB = {state / params:.1f} bytes/parameter), "
              f"peak CPU RSS so far {rss:.2f} GiB")


def bench_logprobs(args):
    """Peak memory of the log-prob pass (forward + backward) by vocabulary blocks vs a naive full
    log-softmax."""
    device, dtype = igrpo.device_and_dtype(args.dtype)
    model, _ = random_model(args, device, dtype)
    scale.check_scoring(model, "bench")
    if args.gradient_checkpointing:  # as in training, so the output layer's share of memory shows
        model.activation_checkpointing_enable({"use_reentrant": False})
    B, T = args.micro_batch_size, args.completion
    input_ids = torch.randint(0, args.vocab, (B, 16 + T), device=device)
    attention = torch.ones_like(input_ids)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)

    def lean():
        return scale.lean_token_logprobs(model, input_ids, attention, 16, mask, 0.7)[0].sum()

    def plain():
        return igrpo.token_logprobs(model, input_ids, attention, 16, mask, 0.7)[0].sum()
    for name, fn in (("warm-up", lean), ("warm-up", plain),
                     ("blockwise (scale.py)", lean), ("full (igrpo.py)", plain)):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        started = time.time()
        _, peak = peak_memory(lambda: fn().backward(), device)
        if name != "warm-up":
            print(f"{name:>20}: {B} x {T} tokens, vocab {args.vocab}, {dtype}: peak above the "
                  f"weights {peak / 2**30:.3f} GiB (gradients included), "
                  f"{time.time() - started:.2f}s")


def bench_fsdp_sampling(args):
    """Two gloo processes on the CPU (a file rendezvous): the same sampling call on one rank's
    whole model, on the FSDP2-sharded model with its weights gathered once (scale.gathered_once),
    and with generate's synced_gpus (every rank steps together, the weights regathered per
    token)."""
    import tempfile
    import uuid
    folder = Path(tempfile.mkdtemp())
    torch.multiprocessing.spawn(fsdp_sampling_rank, args=(folder / uuid.uuid4().hex, args),
                                nprocs=2)


def fsdp_sampling_rank(rank, rendezvous, args):
    import os
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                         world_size=2)
    model, tokenizer = random_model(args, "cpu", torch.float32)
    cfg = igrpo.Config(chat_template="off", max_completion_tokens=args.completion)
    prompts = [igrpo.build_prompt(None, f"What is {a} + {rank}?", cfg) for a in range(args.prompts)]

    def timed(name, sample, model, **options):
        torch.manual_seed(rank)
        torch.distributed.barrier()
        started = time.time()
        samples = sample(model, tokenizer, prompts, cfg, per_prompt=args.group_size, **options)
        torch.distributed.barrier()
        if rank == 0:
            print(f"{name:>40}: {time.time() - started:6.2f} s, "
                  f"{int(samples.lengths.sum())} tokens on rank 0")
    for repeat in range(2):
        timed("unsharded generate (the whole model)", igrpo.sample, model)
    sharded = scale.shard(model, torch.float32, "cpu")
    for repeat in range(2):
        timed("FSDP2, weights gathered once", scale.gathered_once(igrpo.sample), sharded)
        timed("FSDP2, synced_gpus (gathered per token)", igrpo.sample, sharded, synced_gpus=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["checker", "step", "logprobs", "fsdp-sampling"])
    parser.add_argument("--algo", default="igrpo", choices=["igrpo", "grpo"])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="as igrpo.py's --dtype (bf16 on a CPU is slow)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train LoRA adapters of this rank (0: all)")
    parser.add_argument("--path", default="scale", choices=["scale", "plain"],
                        help="step: scale.py's parts, or igrpo.py's own (plain)")
    args = parser.parse_args()
    {"checker": bench_checker, "step": bench_step, "logprobs": bench_logprobs,
     "fsdp-sampling": bench_fsdp_sampling}[args.what](args)
