"""LLM judges for MT-Bench: a local HF causal LM, or any OpenAI-compatible chat-completions endpoint.

A `Judge` answers `complete(system, user) -> str` and says what it is with `describe()`.

Guarantees:
- `LocalJudge` decodes greedily (the judge's temperature is 0 in FastChat), renders [system, user] through the
  judge's chat template when it has one (folding the system text into the user turn when the template refuses a
  system role) and as plain text otherwise; a prompt longer than the judge's context is cut from the left and
  counted, and the count is part of `describe()`.
- `OpenAICompatibleJudge` POSTs `{base_url}/chat/completions` with messages [system, user], temperature 0 and
  `max_tokens` (2048, FastChat's value). The API key is read from the named environment variable at each request
  and is never stored on the object, logged, or put into an error message. Transient failures (HTTP 429/5xx,
  connection errors, timeouts) are retried `max_retries` times; any remaining failure raises `JudgeError` naming
  the URL, the status and the start of the response body.
- `describe()` always says which judge it is, that scores are only comparable under the same judge, and, unless an
  endpoint's model name says gpt-4, that the scores are not GPT-4-judged (a local model never is). A local judge's
  description also carries its parameter count and the caveat that a small model's judgments say little.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Protocol, Sequence, runtime_checkable

from ..data.tokenize import has_chat_template
from .generation import encode_context, generate_until

COMPARABLE = "MT-Bench scores are only comparable under the same judge"
NOT_GPT4 = "not GPT-4-judged: absolute numbers are not comparable to published MT-Bench scores"
LOCAL_JUDGE_CAVEAT = ("ratings are only as informative as the judge; a small local model's judgments say little "
                      "about answer quality, and a tiny model's scores show only that the machinery runs")


class JudgeError(RuntimeError):
    """The judge could not be asked (endpoint unreachable, HTTP error, malformed response)."""


@runtime_checkable
class Judge(Protocol):
    def complete(self, system: str, user: str) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def complete_all(judge: Judge, requests: Sequence[tuple[str, str]]) -> list[str]:
    """Every (system, user) request answered, in order; batched when the judge can batch."""
    batch = getattr(judge, "complete_batch", None)
    if callable(batch):
        return list(batch(requests))
    return [judge.complete(system, user) for system, user in requests]


def _description(kind: str, model: str, gpt4: bool, extra: dict[str, Any] | None = None,
                 notes: Sequence[str] = ()) -> dict[str, Any]:
    lines = [f"judge: {kind} {model}", COMPARABLE]
    if not gpt4:
        lines.append(NOT_GPT4)
    lines.extend(notes)
    return {"kind": kind, "model": model, "gpt4_judged": gpt4, **(extra or {}), "notes": lines}


class LocalJudge:
    """A local causal LM as the judge (greedy). `name` is what reports call it."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 2048, *, max_length: int | None = None,
                 batch_size: int = 8, name: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        config = getattr(model, "config", None)
        self.max_length = max_length or int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.batch_size = batch_size
        self.name = name or str(getattr(config, "_name_or_path", "") or type(model).__name__)
        self.truncated = 0
        self.calls = 0

    def render(self, system: str, user: str) -> str:
        if not has_chat_template(self.tokenizer):
            return f"{system}\n\n{user}\n\n"
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                add_generation_prompt=True, tokenize=False)
        except Exception:  # jinja raises TemplateError for templates without a system role (e.g. Gemma's)
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{system}\n\n{user}"}], add_generation_prompt=True, tokenize=False)

    def complete_batch(self, requests: Sequence[tuple[str, str]]) -> list[str]:
        texts = [self.render(s, u) for s, u in requests]
        special = not has_chat_template(self.tokenizer)  # a rendered template already holds its special tokens
        new_tokens = min(self.max_new_tokens, self.max_length - 1)
        budget = self.max_length - new_tokens
        self.truncated += sum(len(encode_context(self.tokenizer, t, special)) > budget for t in texts)
        self.calls += len(texts)
        outs = generate_until(self.model, self.tokenizer, texts, until=[], max_new_tokens=new_tokens,
                              max_length=self.max_length, batch_size=self.batch_size, add_special_tokens=special)
        return [o[0] for o in outs]

    def complete(self, system: str, user: str) -> str:
        return self.complete_batch([(system, user)])[0]

    def describe(self) -> dict[str, Any]:
        params = _parameter_count(self.model)
        # The size is measured, not judged: the reader decides what it means, with the caveat beside it.
        notes = [f"local judge with {params:,} parameters: {LOCAL_JUDGE_CAVEAT}" if params is not None
                 else f"local judge: {LOCAL_JUDGE_CAVEAT}"]
        if self.truncated:
            notes.append(f"{self.truncated} of {self.calls} judge prompts were cut from the left to fit the judge's "
                         f"context of {self.max_length} tokens")
        return _description("local", self.name, False,
                            {"max_new_tokens": self.max_new_tokens, "max_length": self.max_length,
                             "prompts_truncated": self.truncated, "decoding": "greedy", "parameters": params},
                            notes)


def _parameter_count(model: Any) -> int | None:
    parameters = getattr(model, "parameters", None)
    return sum(p.numel() for p in parameters()) if callable(parameters) else None


_TRANSIENT = {408, 429, 500, 502, 503, 504}


class OpenAICompatibleJudge:
    """A chat-completions endpoint as the judge (OpenAI, vLLM, llama.cpp server, ...)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, *,
                 max_tokens: int = 2048, max_retries: int = 3, retry_wait: float = 2.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.retry_wait = retry_wait

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _scrub(self, text: str) -> str:
        # An echoing server must not make the key appear in an exception or a log.
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text

    def _request(self, payload: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:  # local servers often need none; a missing key then shows up as a 401 from the server
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=payload, headers=headers, method="POST")

    def complete(self, system: str, user: str) -> str:
        payload = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                              "messages": [{"role": "system", "content": system},
                                           {"role": "user", "content": user}]}).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                with urllib.request.urlopen(self._request(payload), timeout=self.timeout) as response:
                    body = response.read().decode("utf-8", errors="replace")
                break
            except urllib.error.HTTPError as exc:
                detail = self._scrub(exc.read().decode("utf-8", errors="replace")[:500])
                if exc.code in _TRANSIENT and not last:
                    time.sleep(self.retry_wait * (attempt + 1))
                    continue
                hint = f" (is ${self.api_key_env} set to a valid key?)" if exc.code in (401, 403) else ""
                raise JudgeError(f"judge endpoint {self.url} returned HTTP {exc.code}{hint}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if not last:
                    time.sleep(self.retry_wait * (attempt + 1))
                    continue
                reason = getattr(exc, "reason", exc)
                raise JudgeError(f"judge endpoint {self.url} could not be reached after {attempt + 1} tries: "
                                 f"{self._scrub(str(reason))}") from None
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.url} sent no choices[0].message.content: "
                             f"{self._scrub(body[:500])}") from None
        return content if isinstance(content, str) else ""

    def describe(self) -> dict[str, Any]:
        return _description("openai-compatible", self.model, "gpt-4" in self.model.lower(),
                            {"base_url": self.base_url, "temperature": 0, "max_tokens": self.max_tokens})


DEFAULT_BASE_URL = "https://api.openai.com/v1"


def judge_from_options(options: dict[str, Any], model: Any, tokenizer: Any,
                       max_length: int | None = None) -> Judge | None:
    """The judge `options["judge"]` names, or None when none is named.

    "self": the evaluated model judges itself; "local:<path>": a local HF model (loaded on the evaluated model's
    device); "openai:<model>": the endpoint at `options["judge_base_url"]` (default the OpenAI API), key from
    `options.get("judge_api_key_env", "OPENAI_API_KEY")`. `judge_max_new_tokens` (2048) and `judge_timeout` (120 s)
    apply where they mean something.
    """
    spec = options.get("judge")
    if not spec:
        return None
    max_new = int(options.get("judge_max_new_tokens", 2048))
    if spec == "self":
        return LocalJudge(model, tokenizer, max_new, max_length=max_length, name="self (the evaluated model)")
    if spec.startswith("local:"):
        from ..models.loading import load_model, load_tokenizer

        path = spec[len("local:"):]
        device = next(model.parameters()).device if hasattr(model, "parameters") else None
        judge_model = load_model(path, device=None if device is None else str(device))
        return LocalJudge(judge_model, load_tokenizer(path), max_new, name=path)
    if spec.startswith("openai:"):
        return OpenAICompatibleJudge(options.get("judge_base_url") or DEFAULT_BASE_URL, spec[len("openai:"):],
                                     options.get("judge_api_key_env", "OPENAI_API_KEY"),
                                     float(options.get("judge_timeout", 120.0)),
                                     max_retries=int(options.get("judge_max_retries", 3)))
    raise ValueError(f"unknown judge {spec!r}; use 'self', 'local:<path>' or 'openai:<model>'")
