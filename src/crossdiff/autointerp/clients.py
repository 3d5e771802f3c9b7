"""Language-model clients behind one interface: a chat request in, a completion out.

Two clients:

- :class:`HttpClient` talks to any OpenAI-compatible ``/chat/completions`` endpoint
  (OpenAI, vLLM, SGLang, llama.cpp's server, ``transformers serve``, ...), with a timeout
  per request, retries with exponential backoff on connection errors, 429 and 5xx, and a
  concurrency limit the pipeline respects.
- :class:`LocalClient` runs a transformers model in this process (a model folder, a hub
  id, or a GGUF file: any model spec of model_sources), greedy decoding.

Both return the text and, when asked for ``top_logprobs``, the log-probabilities of the
most likely tokens at every generated position (the local model always can; an HTTP
endpoint may ignore the request, and then the completion has none). Requests and
completions are plain data so the response cache can key and store them.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from crossdiff import model_sources
from crossdiff.devices import DEFAULT_DEVICE
from crossdiff.errors import CrossdiffError, first_line


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion; every field is part of the cache key."""

    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs."""
    max_tokens: int
    temperature: float = 0.0
    top_logprobs: int = 0
    """Ask for the log-probabilities of this many most likely tokens per position (0: none)."""

    def key_fields(self) -> dict:
        data = asdict(self)
        data["messages"] = [list(m) for m in self.messages]
        return data


@dataclass
class Completion:
    text: str
    logprobs: list[dict[str, float]] | None = None
    """Per generated position: {token text: log-probability} of the most likely tokens,
    the generated token included. None when the client returned none."""

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "logprobs": self.logprobs}, ensure_ascii=False, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Completion":
        data = json.loads(text)
        return Completion(data["text"], data["logprobs"])


class Client(Protocol):
    model_id: str
    """Names the model in the cache key: the same id must mean the same model."""
    max_concurrency: int

    def complete(self, request: ChatRequest) -> Completion: ...


# --------------------------------------------------------------------------- HTTP


@dataclass
class HttpClient:
    """An OpenAI-compatible chat completions endpoint.

    ``base_url`` is the API root (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``);
    the key is read from the environment variable ``api_key_env`` when it is set.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    retries: int = 4
    """Attempts after the first one, for connection errors, timeouts, 429 and 5xx."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled for each next one."""
    max_concurrency: int = 4
    sleep: object = field(default=time.sleep, repr=False)

    @property
    def model_id(self) -> str:
        return self.model

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = self.base_url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers=self._headers(), method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code == 429 or err.code >= 500:
                    last_error = f"HTTP {err.code}: {detail}"
                    continue
                raise CrossdiffError(f"{url} refused the request (HTTP {err.code}): {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last_error = first_line(getattr(err, "reason", None) or err) if not isinstance(err, TimeoutError) \
                    else f"no answer within {self.timeout:g} s"
            except json.JSONDecodeError:
                raise CrossdiffError(f"{url} answered with something that is not JSON") from None
        raise CrossdiffError(f"cannot reach {url} after {self.retries + 1} attempts: {last_error}")

    def check_model(self) -> None:
        """Fail early, in one line, when the endpoint lists its models and ours is not among them."""
        try:
            listing = self._call("GET", "/models")
        except CrossdiffError as err:
            if "refused the request" in str(err):
                return  # an endpoint without a model list: let the first request tell
            raise
        served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if served and self.model not in served:
            raise CrossdiffError(f"{self.base_url} does not serve model {self.model!r} (it serves: {', '.join(served[:5])})")

    def complete(self, request: ChatRequest) -> Completion:
        body = {
            "model": self.model,
            "messages": [{"role": role, "content": content} for role, content in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.top_logprobs:
            body.update(logprobs=True, top_logprobs=request.top_logprobs)
        answer = self._call("POST", "/chat/completions", body)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise CrossdiffError(f"{self.base_url} answered without a completion: {json.dumps(answer)[:200]}") from None
        content = (choice.get("logprobs") or {}).get("content") if request.top_logprobs else None
        logprobs = None
        if content:
            logprobs = []
            for position in content:
                top = {alt["token"]: float(alt["logprob"]) for alt in position.get("top_logprobs") or []}
                top.setdefault(position["token"], float(position["logprob"]))
                logprobs.append(top)
        return Completion(text, logprobs)


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read().decode("utf-8"))
    except Exception:  # noqa: BLE001 - any unreadable body: fall back to the reason
        return str(err.reason)
    detail = body.get("detail") or body.get("error") or body
    if isinstance(detail, dict):
        detail = detail.get("message") or json.dumps(detail)
    return first_line(Exception(str(detail)))


# --------------------------------------------------------------------------- local

def local_model_id(spec: str) -> str:
    """The cache's name for a local model: its GGUF file or folder name (not the path, so a
    cache made on one machine replays on another)."""
    parsed = model_sources.parse(spec)
    gguf = parsed.gguf
    return "local:" + (gguf.name if gguf is not None else Path(parsed.model).name or parsed.model)


class LocalClient:
    """A transformers causal LM in this process; greedy decoding, one request at a time."""

    max_concurrency = 1

    def __init__(self, spec: str, *, device: str = DEFAULT_DEVICE, model_id: str | None = None):
        # deferred: torch, for the local model only; HttpClient and `crossdiff explain --help` do without
        import torch

        from crossdiff.models import load_model, load_tokenizer_of  # deferred: imports torch, as above

        self.model_id = model_id or local_model_id(spec)
        try:
            self.tokenizer = load_tokenizer_of(spec, "local")
            self.model = load_model(spec, "local", torch.float32, device)
        except (OSError, ValueError) as err:
            raise CrossdiffError(f"cannot load local model {spec!r}: {first_line(err)}") from None
        if not self.tokenizer.chat_template:
            raise CrossdiffError(f"local model {spec!r} has no chat template; use an instruction-tuned model")
        self._lock = threading.Lock()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the loaded weights and tokenizer as a plain model folder (float32 safetensors),
        which loads in seconds where a GGUF file is parsed and dequantized again each time."""
        model, config = self.model, self.model.config
        # GGUF weights are dequantized on load; transformers still tags the model as quantized and refuses to save it.
        quantizer, quantization = getattr(model, "hf_quantizer", None), getattr(config, "quantization_config", None)
        model.hf_quantizer = None
        if quantization is not None:
            del config.quantization_config
        try:
            model.save_pretrained(folder)
        finally:
            model.hf_quantizer = quantizer
            if quantization is not None:
                config.quantization_config = quantization
        self.tokenizer.save_pretrained(folder)
        return Path(folder)

    def complete(self, request: ChatRequest) -> Completion:
        import torch  # deferred: as in __init__

        if request.temperature != 0:
            raise CrossdiffError("the local client decodes greedily; use temperature 0")
        messages = [{"role": role, "content": content} for role, content in request.messages]
        with self._lock, torch.no_grad():
            inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                        return_tensors="pt").to(self.model.device)
            out = self.model.generate(**inputs, max_new_tokens=request.max_tokens, do_sample=False,
                                      output_logits=bool(request.top_logprobs), return_dict_in_generate=True,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            new_ids = out.sequences[0, inputs["input_ids"].shape[1]:]
            text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
            logprobs = None
            if request.top_logprobs:
                logprobs = []
                for step in out.logits[: len(new_ids)]:
                    values, ids = torch.log_softmax(step[0].float(), dim=-1).topk(request.top_logprobs)
                    top: dict[str, float] = {}
                    for value, token in zip(values.tolist(), ids.tolist()):  # two ids may read the same: keep the likelier
                        top.setdefault(self.tokenizer.decode([token]), round(value, 6))
                    logprobs.append(top)
        return Completion(text, logprobs)
