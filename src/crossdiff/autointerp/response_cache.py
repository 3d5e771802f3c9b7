"""Every request and its completion on disk, keyed by model, prompt and parameters.

The key is the SHA-256 of the canonical JSON of (model id, messages, max_tokens,
temperature, top_logprobs). Each completion is committed to SQLite the moment it
arrives, so a run killed at any point loses at most the requests in flight; the rerun
finds the rest in the cache and sends nothing twice. With ``offline=True`` no request
leaves the machine: a run is replayed from the cache alone, and since the pipeline is
deterministic given the completions, it reproduces the same table byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from crossdiff.autointerp.clients import ChatRequest, Client, Completion
from crossdiff.errors import CrossdiffError


def request_key(model_id: str, request: ChatRequest) -> str:
    canonical = json.dumps({"model": model_id, **request.key_fields()}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """A SQLite table key -> (model, request JSON, completion JSON); safe across threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, request TEXT, completion TEXT)")
        self._lock = threading.Lock()

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT completion FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else Completion.from_json(row[0])

    def put(self, key: str, model_id: str, request: ChatRequest, completion: Completion) -> None:
        with self._lock:  # autocommit: durable as soon as this returns
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                             (key, model_id, json.dumps(request.key_fields(), sort_keys=True), completion.to_json()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class CachedClient:
    """A client whose every answer goes through the cache; counts the requests it really sends."""

    def __init__(self, cache: ResponseCache, model_id: str, client: Client | None = None):
        if client is not None and client.model_id != model_id:
            raise ValueError("model_id must be the client's")
        self.cache, self.model_id, self.client = cache, model_id, client
        self.max_concurrency = client.max_concurrency if client is not None else 1
        self.sent: list[str] = []
        """Keys of the requests sent to the model (cache misses), in order."""
        self._lock = threading.Lock()

    def complete(self, request: ChatRequest) -> Completion:
        key = request_key(self.model_id, request)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if self.client is None:
            raise CrossdiffError(f"offline replay: a request to {self.model_id!r} is not in the cache {self.cache.path} "
                                 "(was the run made with other settings or another model?)")
        completion = self.client.complete(request)
        completion = Completion.from_json(completion.to_json())  # exactly what a replay will read
        self.cache.put(key, self.model_id, request, completion)
        with self._lock:
            self.sent.append(key)
        return completion
