"""Who may call ``longctx serve``, and how often.

* **Keys.** ``--api-keys FILE``: one key a line. A line ``sha256:HEX [name]``
  is a key's SHA-256 (what ``longctx serve-key FILE`` appends, printing the key
  once); any other line is a key in plain text, hashed on reading (and the
  server warns: the file should not hold keys). A request's key
  (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) is hashed and compared
  with every stored hash by ``hmac.compare_digest``, all of them, so neither
  the time nor the answer says how close a guess came. Keys are random 256-bit
  tokens, so a plain SHA-256 is enough (a slow password hash guards guessable
  secrets).
* **A key's id** is the first 16 hex digits of its hash: documents are filed
  under it, and another key sees ``404`` for them.
* **Rate limit.** A token bucket per key: ``burst`` requests at once, refilled
  at ``rate`` a minute; an empty bucket answers ``429`` with ``Retry-After``
  (whole seconds until the next token).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
import warnings
from pathlib import Path

from longctx.checks import check_positive_int

PREFIX = "sha256:"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path) -> dict[str, str]:
    """``{hash: name}`` from a keys file (see the module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"api_keys: no file at {str(path)!r}")
    keys, plain = {}, 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(PREFIX):
            digest, _, name = line[len(PREFIX):].partition(" ")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"api_keys: line {n} of {str(path)!r} is not 'sha256:<64 hex digits> [name]'")
            keys[digest] = name.strip() or digest[:16]
        else:
            plain += 1
            keys[key_hash(line)] = f"key-{n}"
    if plain:
        warnings.warn(f"{path} holds {plain} key(s) in plain text; store hashes instead (`longctx serve-key`)",
                      stacklevel=2)
    if not keys:
        raise ValueError(f"api_keys: {str(path)!r} holds no keys")
    return keys


def new_key(path, name: str = "") -> str:
    """Append a new key's hash (and ``name``) to the keys file at ``path``; returns the key."""
    key = "lc-" + secrets.token_urlsafe(32)
    with open(path, "a") as f:
        f.write(f"{PREFIX}{key_hash(key)}{' ' + name if name else ''}\n")
    return key


class Keys:
    """The keys a server accepts; ``None`` (no file): every request is let in, as ``"local"``."""

    def __init__(self, hashes: dict[str, str] | None):
        self.hashes = hashes

    def identify(self, presented: str | None) -> str | None:
        """The key's id, or None when it is missing or wrong."""
        if self.hashes is None:
            return "local"
        if not presented:
            return None
        digest = key_hash(presented)
        match = None
        for stored in self.hashes:  # every one, whatever matches: constant work
            if hmac.compare_digest(digest, stored):
                match = stored
        return None if match is None else match[:16]


class RateLimiter:
    """A token bucket per key: ``burst`` at once, ``rate`` a minute."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of requests a minute, got {rate!r}")
        self.rate, self.burst = rate / 60.0, check_positive_int("burst", burst)
        self.clock, self.buckets, self.lock = clock, {}, threading.Lock()

    def take(self, key: str) -> float:
        """0 when ``key`` may go now (and a token is spent), else the seconds until it may."""
        with self.lock:
            now = self.clock()
            tokens, then = self.buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate


__all__ = ["Keys", "RateLimiter", "key_hash", "new_key", "read_keys"]
