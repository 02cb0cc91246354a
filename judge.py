"""
The generative judge of the paper's ablation (--reward judge | rule+judge): a second language model
reads the problem, the reference answer and a solution, and replies with a score in [0, 1].

Kept out of igrpo.py because the method does not need it; it imports nothing from igrpo.py, which
calls from_settings (handing it its own load_model and sample), checked and silence_watch. Two ways
to run the judge:
  --judge-model NAME_OR_PATH   a Hugging Face causal LM on the training device, no gradients,
                               greedy, one batched generate call per scoring
  --judge-url URL              an OpenAI-compatible chat-completions endpoint (what vLLM and SGLang
                               serve), through the standard library's HTTP client, with retries
A reply with no parsable score counts as 0 and is counted in metrics.jsonl (judge_unparsed); the
first such reply is printed, and an endpoint that gives no reply after its tries counts the same,
with a line naming the error. A step where most replies hold no score is warned about, and 3 steps
in a row where none does stop the run with a checkpoint (silence_watch). While the run waits on a
slow endpoint, a line says so every 30 s.
"""
import concurrent.futures
import dataclasses
import http.client
import json
import numbers
import re
import time
import urllib.error
import urllib.request

from tqdm import tqdm

JUDGE_PROMPT = """You are grading a solution to a math problem.

Problem:
{problem}

Reference answer: {answer}

Solution to grade:
{solution}

Is the solution's final answer equivalent to the reference answer, and is its reasoning sound?
Reply with a single line "Score: X", where X is a number from 0 (wrong) to 1 (right)."""

SCORE = re.compile(r"score\W{0,3}(\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?(?![\w.])")


def parse_score(reply):
    """The last "Score: X" (or, failing that, the last number) as a value in [0, 1]; None if there
    is none. X may be a fraction of a scale ("8/10"). Out-of-range values are unparsable, not
    clipped."""
    found = SCORE.findall(reply or "") or NUMBER.findall(reply or "")
    if not found:
        return None
    value, scale = found[-1]
    score = float(value) / float(scale) if scale and float(scale) > 0 else float(value)
    return score if 0.0 <= score <= 1.0 else None


def grading_prompts(problems, golds, completions):
    return [JUDGE_PROMPT.format(problem=p, answer=g, solution=c)
            for p, g, c in zip(problems, golds, completions)]


def scores_of(replies, shown):
    """parse_score of each reply (None where there was no reply). The first reply that holds no
    score is printed, once per judge (shown holds it), so a judge that answers in another format is
    seen at once rather than as rewards of 0."""
    scores = [parse_score(reply) if isinstance(reply, str) else None for reply in replies]
    if not shown:
        shown += [r for r, s in zip(replies, scores) if s is None and isinstance(r, str)][:1]
        if shown:
            tqdm.write(f"judge: a reply that holds no score, counted 0 (the first; others are "
                       f"counted in judge_unparsed): {shown[0][:300]!r}")
    return scores


# A judge is a function (problems, golds, completions) -> list of scores in [0, 1], or None where
# unparsed.
def from_settings(cfg, device, dtype, load_model, sample):
    """The judge of --judge-url, or of --judge-model: a local model that replies greedily, without
    gradients, on the training device, loaded and sampled by igrpo.py's load_model and sample."""
    if cfg.judge_url:
        return url_judge(cfg.judge_url, cfg.judge_model)
    model, tokenizer = load_model(cfg.judge_model, cfg, dtype, device, flag="judge-model")
    model.requires_grad_(False)
    as_written = dataclasses.replace(cfg, chat_template="auto")  # templated here, or not at all

    def reply(texts):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
                   if tokenizer.chat_template else text + "\n" for text in texts]
        return sample(model, tokenizer, prompts, as_written, per_prompt=1, max_new_tokens=32,
                      temperature=0.0, progress="judge").texts  # greedy
    return model_judge(reply)


def checked(judge):
    """The judge, with what it returns checked: one score per completion, each in [0, 1] or None.
    Anything else (a judge function of one's own gone wrong) stops the run rather than turn into
    rewards."""
    def judge_checked(problems, golds, completions):
        scores = list(judge(problems, golds, completions))
        wrong = [s for s in scores if s is not None
                 and not (isinstance(s, numbers.Real) and 0 <= s <= 1)]  # NaN fails 0 <= s too
        if len(scores) != len(completions) or wrong:
            raise SystemExit(
                f"igrpo: error: the judge gave {len(scores)} scores for {len(completions)} "
                "completions" + (f", one of them {wrong[0]!r}: each must be a number in [0, 1] or "
                                 "None" if wrong else ""))
        return scores
    return judge_checked


SILENT_STEPS = 3  # steps in a row in which no judge reply held a score: the run stops


def silence_watch(cfg):
    """A watch of each step's record (igrpo.Parts.watches): a warning when most of the step's judge
    replies held no score, and after SILENT_STEPS steps in a row in which none did, why the run
    stops (with a checkpoint: the judge is fixed, then the run resumed)."""
    silent = []  # the steps of the current streak

    def watch(record):
        replies, unparsed = cfg.prompts_per_step * cfg.group_size, record["judge_unparsed"]
        if unparsed > replies / 2:
            tqdm.write(f"step {record['step']}: warning: {unparsed} of {replies} judge replies "
                       "held no score, so they counted 0 in the rewards")
        silent[:] = silent + [record["step"]] if unparsed == replies else []
        if len(silent) >= SILENT_STEPS:
            return (f"steps {silent[0]} to {silent[-1]} had no judge reply that held a score (each "
                    "counted 0; the judge's lines above say why): fix the judge, then --resume")
        return None
    return watch


def model_judge(reply):
    """A judge around a local model: reply(grading prompts) -> its replies."""
    shown = []

    def judge(problems, golds, completions):
        return scores_of(reply(grading_prompts(problems, golds, completions)), shown)
    return judge


def url_judge(url, model_name, timeout=120, tries=3, notice_every=30.0):
    base = url.rstrip("/")
    endpoint = url if base.endswith("chat/completions") else \
        base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
    shown, down = [], []  # down: this call's first error that says the endpoint itself is down

    def ask(prompt):
        """The endpoint's reply, or the error of its last try. Once one request has used up its
        tries on an endpoint that is down, the call's other requests stop trying: an outage costs
        one round of retries per call, not one per request."""
        body = json.dumps({"model": model_name or "judge", "temperature": 0, "max_tokens": 64,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        for attempt in range(tries):
            if down:
                return down[0]
            try:
                request = urllib.request.Request(endpoint, data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.load(response)["choices"][0]["message"]["content"]
            except (OSError, http.client.HTTPException, KeyError, IndexError, TypeError,
                    ValueError) as caught:  # OSError: refused, timed out, HTTP errors, SSL
                error = caught
                if attempt + 1 < tries:
                    time.sleep(0.5 * 2 ** attempt)
        if is_outage(error):
            down.append(error)
        return error

    def judge(problems, golds, completions):
        prompts = grading_prompts(problems, golds, completions)
        down.clear()  # each call tries the endpoint afresh
        replies = asked_all(ask, prompts, endpoint, notice_every)
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors:  # an outage mid-run: counted as unparsed, so the run goes on or stops saved
            tqdm.write(f"judge: no reply to {len(errors)} of {len(prompts)} requests from "
                       f"{endpoint} ({type(errors[-1]).__name__}: {errors[-1]}, up to {tries} "
                       "tries each): counted as replies with no score")
        return scores_of([None if isinstance(r, Exception) else r for r in replies], shown)
    # fail before training, not in the middle of it, if the judge is unreachable
    probe = ask("Reply with: Score: 1")
    if isinstance(probe, Exception):
        raise SystemExit(f"igrpo: error: --judge-url {url}: no usable answer from {endpoint} "
                         f"after {tries} tries ({type(probe).__name__}: {probe})")
    return judge


def is_outage(error):
    """An error that says the endpoint is down or overloaded (no connection, a timeout, a 5xx),
    not that this one request or its reply was odd (a 4xx, a reply without choices)."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500
    return isinstance(error, (OSError, http.client.HTTPException))


def asked_all(ask, prompts, endpoint, notice_every):
    """ask(prompt) for every prompt, 16 at a time, in order; every notice_every seconds without
    all replies, a line says the run is waiting on the judge."""
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(ask, prompt) for prompt in prompts]
        while True:
            done, waiting = concurrent.futures.wait(futures, timeout=notice_every)
            if not waiting:
                return [future.result() for future in futures]
            tqdm.write(f"judge: waiting on {endpoint}: {len(done)} of {len(futures)} replies "
                       f"after {time.time() - started:.0f} s")
