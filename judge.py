"""
The generative judge of the paper's ablation (--reward judge | rule+judge): a second language model
reads the problem, the reference answer and a solution, and replies with a score in [0, 1].

Kept out of igrpo.py because the method does not need it; it imports nothing from igrpo.py, whose
load_judge builds a judge from these parts. Two ways to run the judge:
  --judge-model NAME_OR_PATH   a Hugging Face causal LM on the training device, no gradients,
                               greedy, one batched generate call per scoring
  --judge-url URL              an OpenAI-compatible chat-completions endpoint (what vLLM and SGLang
                               serve), through the standard library's HTTP client, with retries
A reply with no parsable score counts as 0 and is counted in metrics.jsonl (judge_unparsed).
"""
import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

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


# A judge is a function (problems, golds, completions) -> list of scores in [0, 1], or None where
# unparsed.
def model_judge(reply):
    """A judge around a local model: reply(grading prompts) -> its replies (igrpo.load_judge
    supplies it)."""
    def judge(problems, golds, completions):
        replies = reply(grading_prompts(problems, golds, completions))
        return [parse_score(text) for text in replies]
    return judge


def url_judge(url, model_name, timeout=120, tries=3):
    base = url.rstrip("/")
    endpoint = url if base.endswith("chat/completions") else \
        base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")

    def ask(prompt):
        body = json.dumps({"model": model_name or "judge", "temperature": 0, "max_tokens": 64,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        error = None
        for attempt in range(tries):
            try:
                request = urllib.request.Request(endpoint, data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.load(response)["choices"][0]["message"]["content"]
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError,
                    ValueError) as caught:
                error = caught
                time.sleep(0.5 * 2 ** attempt)
        raise SystemExit(f"igrpo: error: --judge-url {url}: no usable answer from {endpoint} "
                         f"after {tries} tries ({type(error).__name__}: {error})")

    def judge(problems, golds, completions):
        with ThreadPoolExecutor(max_workers=16) as pool:
            replies = pool.map(ask, grading_prompts(problems, golds, completions))
            return [parse_score(reply) for reply in replies]
    # fail before training, not in the middle of it, if the judge is unreachable
    ask("Reply with: Score: 1")
    return judge
