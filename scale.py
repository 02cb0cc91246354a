"""
scale.py: igrpo.py's training, bigger, faster and longer. It runs igrpo.py's own loop, handing it
engineered parts through igrpo.Parts (scale_parts(), at the end):

  memory-lean log-probs  the output layer a block of vocabulary columns at a time, so no
                         (tokens x vocabulary) float32 tensor exists; a bf16 output layer's
                         gradient goes straight into its fp32 master weights (always on here)
  compiled sampling      a static KV cache, so generate compiles its decoding step (CUDA; flag)
  LoRA                   adapters on a frozen base (--lora-rank), saved in peft's format
  torchrun               data parallelism: start it with torchrun, no flag
  long runs              an update with a non-finite gradient norm (a NaN loss makes one) is
                         skipped, and 3 in a row stop the run with a checkpoint; a collapsed policy
                         is warned about; running out of GPU memory names the flags that fix it

    python scale.py --model Qwen/Qwen2.5-Math-1.5B --dataset ... --lora-rank 16
    torchrun --nproc-per-node 8 scale.py --model Qwen/Qwen2.5-Math-1.5B --dataset ...

Every flag of igrpo.py works here too; the method is igrpo.py's, unchanged.
"""
import atexit
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import igrpo
from igrpo import fail, setting


@dataclass
class ScaleConfig(igrpo.Config):
    compile_generation: str = setting("auto", "a static KV cache, so generate compiles its "
                                              "decoding step (auto: on with CUDA)",
                                      "auto | on | off", resumable=True)
    lora_rank: int = setting(0, "LoRA adapters of this rank on a frozen base (0: all weights)",
                             ">= 0")
    lora_alpha: float = setting(32.0, "LoRA scale: adapters add (alpha / rank) * B A x", "> 0")
    lora_targets: str = setting("all-linear", "modules with adapters (or e.g. q_proj,v_proj)")
    save_merged: bool = setting(False, "with --lora-rank: also save the merged model")



# ----------------------------------------------------------------------------------------------
# Memory-lean log-probs: the same numbers as igrpo.token_logprobs (a test pins it), without the
# (tokens x vocabulary) float32 log-softmax: only the hidden states that predict completion tokens
# meet the output layer, a block of its columns at a time.
# ----------------------------------------------------------------------------------------------
def lean_token_logprobs(model, input_ids, attention_mask, prompt_length, completion_mask,
                        temperature, with_entropy=True):
    """igrpo.token_logprobs's (logp, entropy or None), each (b, T), zero off the mask. A LoRA run's
    reference (AdaptersOff) is its policy with the adapters off, on this same lean path."""
    if isinstance(model, AdaptersOff):
        with adapters_disabled(model.policy[0]):
            return lean_token_logprobs(model.policy[0], input_ids, attention_mask, prompt_length,
                                       completion_mask, temperature, with_entropy)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding shifts no position
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False)
    head = None
    if getattr(model, "scored_by_forward", True):  # check_scoring: a forward that does more
        hidden, (scale, softcap) = model(**inputs).logits, (1.0, None)           # (b, P+T, V)
    else:
        hidden = model.base_model(**inputs).last_hidden_state                   # (b, P+T, H)
        head, (scale, softcap) = model.get_output_embeddings(), logit_transform(model)
    hidden = hidden[:, prompt_length - 1:-1][completion_mask]            # (n, H), or (n, V) logits
    targets = input_ids[:, prompt_length:][completion_mask]                      # (n,)
    transform = (scale, softcap, temperature)
    if head is None or type(head) is torch.nn.Linear:  # exactly: a subclass may do more
        weight, bias = (None, None) if head is None else (head.weight, head.bias)
        logp, entropy = OutputLayerLogprobs.apply(hidden, weight, bias, targets, transform,
                                                  with_entropy)                     # (n,) each
    else:  # a LoRA adapter on the output layer: its own forward, chunk by chunk
        logp, entropy = through_own_output_layer(head, hidden, targets, transform, with_entropy)
    zeros = torch.zeros(completion_mask.shape, device=hidden.device)
    entropy = zeros.masked_scatter(completion_mask, entropy) if with_entropy else None
    return zeros.masked_scatter(completion_mask, logp), entropy


def logit_transform(model):
    """(scale, softcap): what a model's forward does to the output layer's logits before sampling:
    Cohere's logit_scale, Falcon-H1's lm_head_multiplier, Granite's 1 / logits_scaling, Gemma's
    soft-capping."""
    config = model.config.get_text_config()

    def factor(name):  # unset or None: no scaling
        return getattr(config, name, None) or 1.0
    scale = factor("logit_scale") * factor("lm_head_multiplier") / factor("logits_scaling")
    return scale, getattr(config, "final_logit_softcapping", None)


LOGITS_BLOCK_BYTES = 2**26  # a block's (tokens, columns) float32 logits: 64 MiB


class OutputLayerLogprobs(torch.autograd.Function):
    """log p(target) = z[target] - log Z, z = the logits / T, of n hidden states, and the entropy
    (a metric, no gradient). Both passes take the output layer a block of vocabulary columns at a
    time and keep no logits: forward sums Z block by block (online log-sum-exp); backward recomputes
    each block and uses d log p / dz = onehot(target) - softmax(z). So memory holds about two blocks
    of float32 logits, whatever the vocabulary, and each row of the output layer's gradient comes
    from one matrix product over all n tokens, rounded once."""

    @staticmethod
    def forward(ctx, features, weight, bias, targets, transform, with_entropy):
        # features: (n, H) hidden states, or (n, V) logits when weight is None; targets (n,)
        n = len(targets)
        log_normalizer = features.new_full((n,), -math.inf, dtype=torch.float32)   # log Z (n,)
        target_logit = features.new_zeros(n, dtype=torch.float32)                   # z[target]
        negative_entropy = torch.zeros_like(target_logit)       # sum_v p_v log p_v, blocks so far
        for columns in vocabulary_blocks(features, weight):
            logits = block_logits(features, weight, bias, columns, transform)       # (n, c)
            inside, offsets = target_in_block(targets, columns)
            picked = logits.gather(-1, offsets[:, None]).squeeze(-1)
            target_logit += torch.where(inside, picked, 0.0)  # not * inside: -inf * 0 is NaN
            total = torch.logaddexp(log_normalizer, logits.logsumexp(-1))           # log Z so far
            if with_entropy:
                # Z grew, so the earlier blocks' p (which summed to 1) shrink by w = Z_before /
                # Z_now: their sum of p log p becomes w * (that sum) + w log w
                shrink = (log_normalizer - total).exp_()                            # w (n,)
                negative_entropy.mul_(shrink).sub_(torch.special.entr(shrink))  # entr(w) = -w log w
                logits.sub_(total[:, None])                      # now log p of the block (n, c)
                # -p log p, in place (a third block would not fit the budget); p = 0 adds 0
                negative_entropy -= torch.special.entr(logits.exp_(), out=logits).sum(-1)
            log_normalizer = total
            del logits  # before the next block's logits exist
        ctx.save_for_backward(features, weight, bias, targets, log_normalizer)
        ctx.transform = transform
        entropy = -negative_entropy if with_entropy else features.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return target_logit - log_normalizer, entropy

    @staticmethod
    def backward(ctx, grad_logp, _):                                             # grad_logp (n,)
        features, weight, bias, targets, log_normalizer = ctx.saved_tensors
        wants_features, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_features = None
        if wants_features and weight is None:  # logits given: each block is its own columns
            grad_features = torch.empty_like(features)                              # (n, V)
        elif wants_features:  # summed over blocks in float32; (n, H) is small beside (V, H)
            grad_features = torch.zeros_like(features, dtype=torch.float32)         # (n, H)
        # bf16 weights with fp32 master weights (tagged_master_weights): the output layer's
        # gradient goes straight into its master's, a block at a time. Through autograd it would be
        # a whole bf16 (V, H) tensor; tied to the input embedding, held to the end of backward.
        master = getattr(weight, "master", None) if wants_weight else None
        if master is not None and master.grad is None:
            master.grad = torch.zeros_like(master)
        grad_weight = torch.empty_like(weight) if wants_weight and master is None else None
        grad_bias = torch.empty_like(bias) if wants_bias else None
        for columns in vocabulary_blocks(features, weight):
            logits = block_logits(features, weight, bias, columns, ctx.transform)   # (n, c)
            slope = logit_slope(logits, ctx.transform)                 # dz/dx, before z is reused
            # in place: the block's logits become d log p / dz, then d loss / d raw logits
            grad = logits.sub_(log_normalizer[:, None]).exp_().neg_()              # -softmax(z)
            del logits  # grad is that tensor now
            inside, offsets = target_in_block(targets, columns)
            grad.scatter_add_(-1, offsets[:, None], inside[:, None].float())  # + onehot(target)
            grad.mul_(grad_logp[:, None])                                       # d loss / dz
            grad = grad.mul_(slope).to(features.dtype)  # times dz/dx (n, c); bf16: float32 freed
            del slope
            if wants_features and weight is None:
                grad_features[:, columns] = grad
            elif wants_features:
                grad_features += grad @ weight[columns]
            if master is not None:
                master.grad[columns].add_(grad.T @ features)
            elif wants_weight:
                torch.mm(grad.T, features, out=grad_weight[columns])
            if wants_bias:
                grad_bias[columns] = grad.sum(0, dtype=torch.float32)
            del grad  # before the next block's logits exist
        grad_features = grad_features.to(features.dtype) if wants_features else None
        return grad_features, grad_weight, grad_bias, None, None, None


def vocabulary_blocks(features, weight):
    """Column slices of the vocabulary, c columns each: a block's float32 logits (n, c) fit in
    LOGITS_BLOCK_BYTES, and so do its rows of the output layer's gradient (c, H) when n < H."""
    vocabulary = features.shape[-1] if weight is None else weight.shape[0]
    width = 0 if weight is None else weight.shape[1]
    float32_bytes, longer_side = 4, max(1, len(features), width)  # 1: n = 0 must not divide by 0
    size = max(1, LOGITS_BLOCK_BYTES // (float32_bytes * longer_side))
    return [slice(start, min(start + size, vocabulary)) for start in range(0, vocabulary, size)]


def target_in_block(targets, columns):
    """(whether each target is in this block, its column there or 0), (n,) each: masks rather
    than indexing, so a GPU never waits for the host."""
    inside = (targets >= columns.start) & (targets < columns.stop)
    return inside, torch.where(inside, targets - columns.start, 0)


def block_logits(features, weight, bias, columns, transform):
    """z of one block of columns, (n, c) float32: the logits the model samples from, over T, from
    the raw logits x = hidden W^T + b (or the given logits)."""
    scale, softcap, temperature = transform
    if weight is None:  # the model's own logits: a copy, which the in-place steps below may change
        logits = features[:, columns].to(torch.float32, copy=True)                # (n, c)
    else:
        block_bias = None if bias is None else bias[columns]
        logits = torch.nn.functional.linear(features, weight[columns], block_bias).float()
    if not softcap:
        return logits.mul_(scale / temperature)
    capped = logits.mul_(scale / softcap).tanh_()        # z = softcap tanh(scale x / softcap) / T
    return capped.mul_(softcap / temperature)


def logit_slope(logits, transform):
    """dz/dx of a block, read off z itself: scale / T, or with a soft-cap (1 - tanh^2) scale / T,
    where tanh = z T / softcap: a number, or (n, c)."""
    scale, softcap, temperature = transform
    if not softcap:
        return scale / temperature
    tanh = logits * (temperature / softcap)
    return tanh.square_().neg_().add_(1).mul_(scale / temperature)


def through_own_output_layer(head, hidden, targets, transform, with_entropy):
    """(logp, entropy) through an output layer that is not a plain Linear (a LoRA adapter on it):
    its own forward, a chunk of tokens at a time, recomputed in backward, so one chunk's (tokens,
    V) logits exist at a time."""
    def chunk_logprobs(hidden, targets):  # the chunk's logits (c, V) come from head's forward
        return OutputLayerLogprobs.apply(head(hidden), None, None, targets, transform, with_entropy)
    size = max(1, LOGITS_BLOCK_BYTES // (4 * head.out_features))                 # tokens a chunk
    pieces = []
    for start in range(0, max(1, len(hidden)), size):
        rows = slice(start, start + size)
        if torch.is_grad_enabled():  # backward recomputes the chunk's logits rather than keep them
            pieces.append(checkpoint(chunk_logprobs, hidden[rows], targets[rows],
                                     use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(hidden[rows], targets[rows]))
    return tuple(torch.cat(parts) for parts in zip(*pieces))


@torch.no_grad()
def check_scoring(model, what):
    """One small forward at load time decides how lean_token_logprobs scores this model: through
    the output layer, a block at a time, when that reproduces model(...).logits; else (a forward
    that does more to its logits) through the model's own forward, (tokens x vocabulary)."""
    model.eval()
    vocabulary = getattr(model.config.get_text_config(), "vocab_size", None) or 256
    draws = torch.Generator().manual_seed(0)
    ids = torch.randint(1, min(256, vocabulary), (16, 8), generator=draws).to(model.device)
    # 16 contexts of 8 tokens (16, 8)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                  position_ids=torch.arange(8, device=model.device).expand(16, -1))
    try:
        logits = model(**inputs).logits                                         # (16, 8, V)
    except Exception as error:  # any library error here means: we cannot score this model
        fail(f"{what}: its forward pass fails on a plain token sequence, so its completions cannot "
             f"be scored ({igrpo.first_line(error)})")
    reference = torch.log_softmax(logits.float(), -1)                           # (16, 8, V)
    model.scored_by_forward = False
    try:
        ours = lean_token_logprobs(model, ids, inputs["attention_mask"], 1,
                                   inputs["attention_mask"][:, 1:].bool(), 1.0,
                                   with_entropy=False)[0]                       # (16, 7)
        targets = reference[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (16, 7)
        # bf16 rounds each step of the model's own logit arithmetic (scale, soft-cap) at about 0.4%
        tolerance = 1e-3 if model.dtype == torch.float32 else 1e-2 * (1 + logits.abs().max().item())
        matches = (torch.allclose(ours, targets, atol=tolerance)
                   and not systematically_off(model, inputs, reference))
    except (AttributeError, TypeError, ValueError, RuntimeError):  # no base model or hidden states
        matches = False
    if not matches:
        model.scored_by_forward = True
        print(f"{what}: log-probs come from the model's own forward (its logits are not the output "
              "layer's alone), which needs more memory per micro-batch")


def systematically_off(model, inputs, reference):
    """Whether some vocabulary entry's log-prob from the output layer alone differs from the model's
    own (reference, (16, 8, V)) the same way at every position, as a logit bias or a step of the
    forward that the output layer lacks makes it. Rounding differs too, but by chance: its mean
    over the 128 positions stays within a few standard errors of 0, so a mean over 8 standard
    errors is systematic. Except for the model's own arithmetic after the output layer (a scale, a
    soft-cap), in bf16 where ours is float32: on a logit that barely changes between positions
    its up to 3 roundings can be off the same way each time, so there the mean must also pass 3
    rounding steps of the logit itself."""
    hidden = model.base_model(**inputs).last_hidden_state.flatten(0, 1)         # (128, H)
    logits = model.get_output_embeddings()(hidden)                              # (128, V)
    scale, softcap = logit_transform(model)
    ours = block_logits(logits, None, None, slice(None), (scale, softcap, 1.0))
    difference = reference.flatten(0, 1) - torch.log_softmax(ours, -1)          # (128, V)
    mean = difference.mean(0)                                                   # (V,)
    standard_error = difference.std(0) / math.sqrt(len(difference))             # (V,)
    roundings = 0 if scale == 1 and not softcap else 3
    rounding_step = torch.finfo(model.dtype).eps * ours.abs().mean(0)           # (V,)
    floor = (roundings * rounding_step).clamp(min=1e-3)                         # (V,) nats
    return bool(((mean.abs() > floor) & (mean.abs() > 8 * standard_error)).any())


def load_model(name, cfg, dtype, device, flag="model"):
    """igrpo.load_model, or a LoRA checkpoint's base with its adapter merged."""
    name = igrpo.model_source(name, flag)
    if (Path(name) / "adapter_config.json").is_file():  # saved with --lora-rank: base + adapter
        return load_lora_checkpoint(name, cfg, dtype, device, flag)
    return igrpo.load_model(name, cfg, dtype, device, flag)


def lean_load_model(name, cfg, dtype, device, flag="model"):
    """load_model, and check_scoring: how lean_token_logprobs scores this model."""
    model, tokenizer = load_model(name, cfg, dtype, device, flag)
    check_scoring(model, f"--{flag} {name}")
    return model, tokenizer


def tagged_master_weights_and_optimizer(model, cfg):
    """igrpo.master_weights_and_optimizer, each bf16 parameter tagged with its master, so that
    OutputLayerLogprobs adds the output layer's gradient to it. With master weights, gradients
    come from loss.backward(), never torch.autograd.grad."""
    master, optimizer = igrpo.master_weights_and_optimizer(model, cfg)
    for p, m in zip([p for p in model.parameters() if p.requires_grad], master):
        if p is not m:
            p.master = m
    return master, optimizer


# ----------------------------------------------------------------------------------------------
# Compiled sampling: generate with a static KV cache compiles its decoding step per (sequences,
# cache length), so every call here has the same number of rows and a cache length in steps of 256
# ----------------------------------------------------------------------------------------------
def compiles_generation(cfg, device):
    """--compile-generation: auto is on for CUDA (transformers compiles on CUDA only; elsewhere the
    static cache runs uncompiled)."""
    return cfg.compile_generation == "on" or (cfg.compile_generation == "auto" and
                                              torch.device(device).type == "cuda")


def compiled_sample(model, tokenizer, prompts, cfg, *, per_prompt, max_new_tokens=None,
                    **options):
    """igrpo.sample's Sequences, from fixed-shape generate calls: one prompt a row, the rows padded
    to a power of two (at most --generation-batch-size) by copies of the first, dropped after."""
    rows = igrpo.repeat(prompts, per_prompt)
    per_call = min(cfg.generation_batch_size, 2 ** math.ceil(math.log2(max(1, len(rows)))))
    padded = rows + rows[:1] * (-len(rows) % per_call)
    longest = igrpo.encode(tokenizer, rows, cfg).input_ids.shape[1]
    budget = max_new_tokens or cfg.max_completion_tokens
    context = igrpo.max_positions(model)
    cache = 256 * math.ceil((longest + budget) / 256)
    # never past the model's positions, and never shrinking: transformers keeps the longest cache
    cache = max([min(cache, context or cache), *getattr(model, "cache_lengths", [0])])
    started, first = time.time(), (per_call, cache) not in getattr(model, "compiled_shapes", set())
    samples = igrpo.sample(model, tokenizer, padded, dataclasses.replace(
        cfg, generation_batch_size=per_call), per_prompt=1, max_new_tokens=max_new_tokens,
        cache_implementation="static", max_cache_len=cache, **options)
    model.compiled_shapes = getattr(model, "compiled_shapes", set()) | {(per_call, cache)}
    model.cache_lengths = [cache]
    if first and model.device.type == "cuda":
        tqdm.write(f"compiled decoding for {per_call} sequences x {cache} cache positions: "
                   f"{time.time() - started:.1f} s with the first calls")
    return samples.subset(slice(0, len(rows)))


# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / rank) B A x, the base W frozen in the model's dtype; only
# A (r x d_in) and B (d_out x r) train, in fp32, so gradients and Adam state exist for the adapters
# alone. B starts at zero: at step 0 the policy is the base model, which (adapters off) is also the
# KL reference.
# ----------------------------------------------------------------------------------------------
def import_peft():
    try:
        import peft
    except ImportError:
        fail("--lora-rank: LoRA needs the optional peft package (pip install peft)")
    return peft


@contextlib.contextmanager
def peft_quietly():
    """peft reads a property that transformers 5 deprecates: a warning a user can do nothing
    about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        yield


def apply_lora(model, cfg):
    """--lora-rank > 0: the same model, weights frozen, fp32 adapters inside to train."""
    peft = import_peft()
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else \
        [name.strip() for name in cfg.lora_targets.split(",") if name.strip()]
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                             target_modules=targets)
    try:  # peft freezes the base, adds the adapters and keeps them fp32 over a bf16 base
        with peft_quietly(), torch.random.fork_rng():  # A is random: the same on every rank
            torch.manual_seed(cfg.seed)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as error:  # e.g. no module of the model has the given name
        fail(f"--lora-targets {cfg.lora_targets!r}: {str(error).splitlines()[0]}")
    local = cfg.model and Path(cfg.model).is_dir()  # a saved adapter names a local base absolutely
    base = str(Path(cfg.model).resolve()) if local else cfg.model
    wrapped.peft_config["default"].base_model_name_or_path = base
    return wrapped.get_base_model()  # the original model object, adapters inside: the rest as is


def is_lora(model):
    return hasattr(model, "peft_config")


class AdaptersOff(torch.nn.Module):
    """The reference policy of a LoRA run: the policy with its adapters off, no second copy."""

    def __init__(self, policy):
        super().__init__()
        self.policy = [policy]  # in a list: not a submodule, so its weights are not counted twice

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0):
        with adapters_disabled(self.policy[0]):
            return self.policy[0](input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep)


@contextlib.contextmanager
def adapters_disabled(policy):
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_policy(cfg, resume_from, device, dtype, load=None):
    """igrpo.load_policy with adapters: (policy, tokenizer, its adapters-off self or None). A
    resumed run's adapters are those its checkpoint saved, on the same base."""
    # beta 0: igrpo.load_policy loads no second model; the reference is the adapters-off policy
    model, tokenizer, _ = igrpo.load_policy(dataclasses.replace(cfg, beta=0.0), None, device,
                                            dtype, load=load or lean_load_model)
    model = apply_lora(model, cfg)
    if resume_from is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        saved = load_file(Path(resume_from) / "adapter_model.safetensors", device=str(device))
        loaded = set_peft_model_state_dict(model, {name.removeprefix("base_model.model."): tensor
                                                   for name, tensor in saved.items()})
        if loaded.unexpected_keys:  # adapters of another rank or on other modules
            fail(f"--resume: {resume_from} holds adapters this model does not have (e.g. "
                 f"{loaded.unexpected_keys[0]}): resume with the run's --lora-rank and "
                 "--lora-targets")
    return model, tokenizer, AdaptersOff(model) if cfg.beta > 0 else None


def save_model(model, folder):
    """What igrpo.save writes of the model: the whole of it, or a LoRA policy's adapter alone.
    Under torchrun rank 0 alone writes."""
    if process_rank() == 0:
        (AdapterOnly(model) if is_lora(model) else model).save_pretrained(folder)


class AdapterOnly:
    """What igrpo.save writes for a LoRA policy: its adapter alone, in peft's format, which
    peft.PeftModel.from_pretrained(base, folder) and lean_load_model read."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, folder, state_dict=None):  # state_dict: a sharded model's, gathered
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        adapter = get_peft_model_state_dict(self.model, state_dict=state_dict)
        weights = {f"base_model.model.{name}": tensor.detach().contiguous().cpu()  # peft's prefix
                   for name, tensor in adapter.items()}
        save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        self.model.peft_config["default"].save_pretrained(folder)


def load_lora_checkpoint(folder, cfg, dtype, device, flag="model"):
    """A folder saved with --lora-rank: its base (from adapter_config.json), adapter merged in."""
    peft = import_peft()
    adapter_config = json.loads((Path(folder) / "adapter_config.json").read_text())
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        fail(f"--{flag} {folder}: adapter_config.json names no base model "
             "(base_model_name_or_path)")
    model, tokenizer = igrpo.load_model(base, cfg, dtype, device, flag)
    with peft_quietly():
        adapted = peft.PeftModel.from_pretrained(model, str(folder))
    return adapted.merge_and_unload(), tokenizer


def save_merged(cfg):
    """--save-merged: final/'s adapter merged into its base, as a plain checkpoint (for vLLM, or
    AutoModelForCausalLM), in final-merged/. Merged on the CPU: the GPU holds no second copy."""
    out = Path(cfg.output_dir)
    if cfg.save_merged and process_rank() == 0:
        model, tokenizer = load_lora_checkpoint(out / "final", cfg, torch.float32, "cpu")
        igrpo.save(out / "final-merged", igrpo.Policy(model, tokenizer, None, []), igrpo.Parts())


# ----------------------------------------------------------------------------------------------
# Many GPUs and nodes: torchrun, with PyTorch's FSDP2. Each process (rank) holds 1/N of every
# parameter, of its gradient and of AdamW's state, in fp32: the shards are the master weights, and
# bf16 is only what a layer computes in once FSDP2 has gathered it. Rank k samples and scores
# problems k, k+N, ... of the step (a group lives on one rank: advantages need no communication).
# Every normalizer of the loss counts the whole step (igrpo.World sums them), so each rank's loss
# is its share of the one-process loss, and the gradient FSDP2 sums (reduce-scatter, in fp32) is
# the one-process gradient:
#   grad L = sum_k grad L_k,   L_k = sum over rank k's tokens of w_jt * loss_jt
# ----------------------------------------------------------------------------------------------
def setup_distributed(cfg=None):
    """Under torchrun: join the process group (once) and return this process's igrpo.World; ranks
    other than 0 print nothing. Without torchrun: None."""
    if "LOCAL_RANK" not in os.environ:  # torchrun sets it
        return None
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(torch.distributed.destroy_process_group)
    if process_rank() != 0:  # progress bars: igrpo.py's and gathered_once draw them on rank 0
        sys.stdout = open(os.devnull, "w")
    if cfg and cfg.prompts_per_step % process_count():
        fail(f"--prompts-per-step {cfg.prompts_per_step} counts a step's problems over all "
             f"{process_count()} ranks: make it a multiple of {process_count()}")
    return igrpo.World(process_rank(), process_count(), sum=summed_over_ranks, gather=every_ranks)


def process_count():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def process_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def summed_over_ranks(*values):
    """Each number (int, float or one-element tensor) summed over all ranks, as floats."""
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu()
                         for v in values])
    total = total.to(device)
    torch.distributed.all_reduce(total)
    return tuple(total.tolist())


def every_ranks(own):
    """[rank 0's value, rank 1's, ...] of a picklable value on each rank."""
    ranks = [None] * process_count()
    torch.distributed.all_gather_object(ranks, own)
    return ranks


def sharded_policy(cfg, resume_from, device, dtype):
    """igrpo.load_policy's policy (and reference), or LoRA's, read in fp32 on the CPU, then each
    decoder layer and the root sharded over the ranks onto the device."""
    policy = lora_policy if cfg.lora_rank else igrpo.load_policy
    # fp32: the master weights; FSDP2 scores through the model's own forward (no check_scoring)
    model, tokenizer, reference = policy(cfg, resume_from, "cpu", torch.float32, load=load_model)
    for shardable in [model] + ([reference] if isinstance(reference, torch.nn.Module) and
                                not isinstance(reference, AdaptersOff) else []):
        shard(shardable, dtype, device)
    return model, tokenizer, reference


def shard(model, dtype, device):
    """FSDP2 on each decoder layer (the model's own _no_split_modules), then on the root (the
    embeddings, final norm and output layer): compute in dtype, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    precision = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in layers] + [model]:
        fully_shard(module, mp_policy=precision)  # moves each shard to this rank's device
        module.set_gradient_divide_factor(1.0)  # a sum, not FSDP2's mean: each loss is a share
        module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-scaled one)
    for module in model.modules():  # buffers (rotary frequencies) are not sharded: moved whole
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    return model


def sharded_optimizer(model, cfg):
    """(master weights, AdamW): the trainable fp32 shards themselves, no copies. Rank 0 says what
    each rank holds."""
    master = [p for p in model.parameters() if p.requires_grad]
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    trained = sum(p.to_local().numel() for p in master)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"torchrun: {process_count()} ranks, FSDP2; parameters, gradients and AdamW state per "
          f"rank: {(local + 12 * trained) / 2**20:.0f} MB (one process would hold "
          f"{(whole + 12 * trained * process_count()) / 2**20:.0f} MB)")
    return master, torch.optim.AdamW(master, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def gathered_once(sample):
    """sample on a sharded model: its weights gathered once for the call (not at each token), so
    ranks whose completions stop at different lengths never wait on each other; rank 0 alone shows
    progress."""
    def sample_whole(model, tokenizer, prompts, cfg, **options):
        from torch.distributed.fsdp import FSDPModule
        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for module in sharded:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        try:
            options.update(progress=options.get("progress") if process_rank() == 0 else None)
            return sample(model, tokenizer, prompts, cfg, synced_gpus=False, **options)
        finally:
            for module in sharded:  # FSDP2's default back: the root keeps its weights after forward
                module.reshard()
                module.set_reshard_after_forward(module is not model, recurse=False)
    return sample_whole


def save_gathered(model, folder):
    """The sharded model gathered on rank 0, in its CPU memory, and saved there as an ordinary
    Hugging Face folder (fp32: the master weights); LoRA: its adapter alone."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    unique = dict(model.named_parameters())
    for name, _ in model.named_parameters(remove_duplicate=False):  # a tied output layer: once
        if name not in unique:
            whole.pop(name, None)
    if process_rank() == 0:
        if is_lora(model):
            AdapterOnly(model).save_pretrained(folder, whole)
        else:
            model.save_pretrained(folder, state_dict=whole)


def save_optimizer_shards(policy, folder):
    """optimizer/: AdamW's state, each rank writing its shard (torch.distributed.checkpoint). Its
    failures (a full disk on any rank) reach igrpo.save as the RuntimeError it explains."""
    import torch.distributed.checkpoint as checkpoint
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(policy.model, policy.optimizer)
    try:
        checkpoint.save(state, checkpoint_id=folder / "optimizer")
    except CheckpointException as error:  # a BaseException: no handler for errors would see it
        raise RuntimeError(f"torch.distributed.checkpoint: {igrpo.first_line(error)}") from None


def load_optimizer_shards(policy, folder, processes):
    """AdamW's state from optimizer/, resharded over this run's ranks (their number may differ
    from the processes that wrote it)."""
    import torch.distributed.checkpoint as checkpoint
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    if not (folder / "optimizer").is_dir():
        fail(f"--resume: {folder} was written by {processes} process without torchrun (its "
             f"optimizer in optimizer.pt); this run has {process_count()} ranks: resume it "
             "without torchrun")
    from torch.distributed.checkpoint.api import CheckpointException
    state = get_optimizer_state_dict(policy.model, policy.optimizer)  # the layout to fill
    try:
        checkpoint.load(state, checkpoint_id=folder / "optimizer")
    except CheckpointException as error:
        fail(f"--resume: {folder / 'optimizer'} is damaged ({igrpo.first_line(error)}); delete "
             f"{folder} to resume from the checkpoint before it")
    set_optimizer_state_dict(policy.model, policy.optimizer, state)


def whole_norm(norm):
    """A gradient norm as one number on every rank (FSDP2's is a DTensor of the shards')."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ----------------------------------------------------------------------------------------------
# Long runs: non-finite updates, collapse warnings, running out of memory (Ctrl-C: igrpo.py's)
# ----------------------------------------------------------------------------------------------
MAX_SKIPPED_IN_A_ROW = 3  # steps in a row with a skipped (non-finite) update: the run stops
COLLAPSE_STEPS = 5        # steps in a row with ~0 entropy, or no right answer, before a warning
ENTROPY_FLOOR = 0.01      # nats per token: below it, sampling at temperature > 0 is all but greedy


def skipping_non_finite(optimizer_step, run):
    """An optimizer step that skips an update whose gradient norm is NaN or infinite (a NaN loss
    makes one): it would poison the weights and Adam's moments. Counts them in run.skipped."""
    def step(policy, cfg):
        norm = whole_norm(torch.nn.utils.get_total_norm([m.grad for m in policy.master
                                                         if m.grad is not None]))
        if torch.isfinite(norm):  # the whole step's norm: every rank decides alike
            return whole_norm(optimizer_step(policy, cfg))
        policy.optimizer.zero_grad(set_to_none=True)
        run.skipped += 1
        return norm
    return step


def long_run_watch(run, cfg):
    """A watch of each step's record (igrpo.Parts.watches): its skipped updates logged, a warning
    once a policy looks collapsed, and a stop after MAX_SKIPPED_IN_A_ROW steps that skipped one."""
    def watch(record):
        record["skipped_updates"] = run.skipped
        # steps, not updates: with --ppo-epochs 3 one bad batch skips 3 updates of one step
        run.skipped_in_a_row = run.skipped_in_a_row + 1 if run.skipped else 0
        run.skipped = 0
        run.history.append(record)
        warning = collapse_warning(run.history)
        if warning and warning != collapse_warning(run.history[:-1]):  # once, when it starts
            tqdm.write(f"step {record['step']}: warning: {warning}")
        if run.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            return (f"{MAX_SKIPPED_IN_A_ROW} steps in a row had an update with a non-finite loss "
                    f"or gradient norm, skipped: the learning rate (--lr {cfg.lr}) is likely too "
                    "high, or the precision too low (try --dtype fp32); the checkpoint holds the "
                    "last good weights")
        return None
    return watch


def collapse_warning(history):
    """Why the last COLLAPSE_STEPS step records look like a collapsed or stuck policy, or None."""
    recent = history[-COLLAPSE_STEPS:]
    if len(recent) < COLLAPSE_STEPS:
        return None
    if all(r["entropy"] is not None and r["entropy"] < ENTROPY_FLOOR for r in recent):
        return (f"entropy below {ENTROPY_FLOOR} nats per token for {COLLAPSE_STEPS} steps: the "
                "policy writes one fixed answer per prompt; if the reward is low, it has collapsed "
                "(lower --lr)")
    if all(r["accuracy"] == 0 for r in recent):
        return (f"no completion was right for {COLLAPSE_STEPS} steps, so no group carries a "
                "learning signal: the problems may be too hard for the model, or the policy has "
                "collapsed (lower --lr)")
    return None


@contextlib.contextmanager
def explained_failures(cfg):
    """Running out of GPU memory, or sampling inf/NaN probabilities, ends the run naming a fix."""
    try:
        yield
    except torch.OutOfMemoryError:
        fail(f"out of GPU memory: lower --micro-batch-size ({cfg.micro_batch_size}), "
             f"--generation-batch-size ({cfg.generation_batch_size}) or --max-completion-tokens "
             f"({cfg.max_completion_tokens}); the first two may change on --resume")
    except RuntimeError as error:
        if "inf" not in str(error) or "nan" not in str(error):
            raise
        fail(f"the policy's probabilities became inf/NaN: the learning rate (--lr {cfg.lr}) is "
             "likely too high, or the precision too low (try --dtype fp32); the newest step-N "
             "checkpoint, if any, holds earlier weights")


# ----------------------------------------------------------------------------------------------
# The parts: igrpo.train runs its own loop with these, as cfg asks for them
# ----------------------------------------------------------------------------------------------
def lean_policy(cfg, resume_from, device, dtype):
    """igrpo.load_policy, each model loaded by lean_load_model (check_scoring; LoRA folders)."""
    return igrpo.load_policy(cfg, resume_from, device, dtype, load=lean_load_model)


def scale_parts(cfg, world=None):
    """igrpo.Parts with scale.py's engineering: the long-run watch and the non-finite skip always;
    under torchrun (world) FSDP2, else lean log-probs with master-weight tags, and compiled sampling
    and LoRA as cfg asks."""
    run = SimpleNamespace(skipped=0, skipped_in_a_row=0, history=[])
    common = dict(optimizer_step=skipping_non_finite(igrpo.optimizer_step, run),
                  watches=(long_run_watch(run, cfg),))
    if world is not None:  # FSDP2 reads the output layer only in its forward: the plain path
        if cfg.compile_generation == "on":
            print("--compile-generation on: not under torchrun (FSDP2 samples uncompiled)")
        return igrpo.Parts(load_policy=sharded_policy, make_optimizer=sharded_optimizer,
                           sample=gathered_once(igrpo.sample), save_model=save_gathered,
                           save_optimizer=save_optimizer_shards,
                           load_optimizer=load_optimizer_shards, world=world, **common)
    device = igrpo.device_and_dtype(cfg.dtype)[0]
    return igrpo.Parts(
        load_policy=lora_policy if cfg.lora_rank else lean_policy,
        make_optimizer=tagged_master_weights_and_optimizer,
        sample=compiled_sample if compiles_generation(cfg, device) else igrpo.sample,
        token_logprobs=lean_token_logprobs, save_model=save_model, **common)


def check_scale_config(cfg, judge=None):
    igrpo.check_config(cfg, judge)
    if cfg.save_merged and not cfg.lora_rank:
        fail("--save-merged: only with --lora-rank (a full fine-tune is saved whole anyway)")
    if cfg.lora_rank:
        import_peft()


def train(cfg, judge=None):
    """igrpo.train with scale.py's parts (judge: as igrpo.Parts's)."""
    check_scale_config(cfg, judge)
    world = setup_distributed(cfg)
    with explained_failures(cfg):
        results = igrpo.train(cfg, dataclasses.replace(scale_parts(cfg, world), judge=judge))
    save_merged(cfg)
    return results


def main(argv=None):
    parser = igrpo.config_parser(ScaleConfig, description="igrpo.py's training, bigger, faster "
                                 "and longer: LoRA, torchrun, lean log-probs, compiled sampling.")
    cfg = ScaleConfig(**vars(parser.parse_args(argv)))
    if not cfg.model:
        fail("--model: name a causal LM to train")
    return train(cfg)


if __name__ == "__main__":
    main()
