"""The model side of ``longctx serve``: one model, one strategy, its documents and their caches.

* **One worker thread.** Generation is not re-entrant (a ``LongContextQwen3``
  swaps the model's attention while it runs), so every model call is a job on
  one thread, in arrival order; the web side awaits its job and is never
  blocked (``/health`` answers while a job runs).
* **A document** is prefilled once (``LongContextQwen3.prefill``). A question
  continues from a *copy* of its cache (``longctx.caches.copy_cache``), so it
  costs only its own tokens, and the document's cache is never touched.
* **Nothing lost.** A document is written to ``data/tmp/`` (its token ids, its
  cache, its record) and renamed into ``data/documents/<id>`` only when
  complete: a crash leaves a whole document or none, and ``data/tmp`` is
  cleared at start. Its token ids are kept beside the cache, so a server
  restarted with another strategy prefills again instead of failing.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from longctx.caches import copy_cache, load_cache, save_cache
from longctx.checks import check_choice

FORMATS = ("raw", "chat")


class DocumentGone(LookupError):
    """The document was deleted while a job for it waited (the API answers 404)."""


@dataclass
class Document:
    id: str
    owner: str  # the uploading key's id (a prefix of its hash)
    name: str
    tokens: int
    format: str  # "raw": question tokens follow the document's; "chat": inside one user turn
    strategy: dict  # what the saved cache was made with
    created: float
    prefill_seconds: float
    cache: object = field(default=None, repr=False)  # in memory once loaded
    ids: list | None = field(default=None, repr=False)  # the token ids (ids.json on disk)

    def record(self) -> dict:
        """What ``document.json`` holds."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("cache", "ids")}

    def public(self) -> dict:
        """What the API shows."""
        return {k: v for k, v in self.record().items() if k not in ("owner", "strategy")}


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" (end of turn, or a stop string) or "length"
    prompt_tokens: int  # processed for this request
    cached_tokens: int  # reused from a document's cache
    completion_tokens: int
    seconds: float


class StreamingDecoder:
    """Text deltas of a token stream. With mlx-lm's tokenizer, its streaming detokenizer (so the
    text is what ``mlx_lm.generate`` prints: it drops the first token's leading space); else
    (transformers) decode everything so far, emit what is new, and hold back a trailing partial
    UTF-8 character ("\ufffd") until its next bytes arrive."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0
        self.detokenizer = getattr(tokenizer, "detokenizer", None)
        if self.detokenizer is not None:
            self.detokenizer.reset()

    def add(self, token: int) -> str:
        if self.detokenizer is not None:
            self.detokenizer.add_token(token)
            return self.detokenizer.last_segment
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta

    def finish(self) -> str:
        if self.detokenizer is None:
            return self.tokenizer.decode(self.ids)[self.sent:]
        self.detokenizer.finalize()
        return self.detokenizer.last_segment


class Engine:
    """``LongContextQwen3`` over the model at ``path``, with the documents under ``data``."""

    def __init__(self, path, strategy: str = "full", options: dict | None = None, *, backend: str = "mlx",
                 data: str | os.PathLike | None = None):
        from longctx.models import load_trained
        self.backend = check_choice("backend", backend, ("mlx", "torch"))
        self.module = importlib.import_module(f"longctx.{backend}")  # LongContextQwen3, AdaptiveContextManager
        self.path = Path(path)
        self.model, self.tokenizer = load_trained(backend, self.path)
        self.long = self.module.LongContextQwen3(self.model, strategy, **(options or {}))
        self.strategy = json.loads(json.dumps({"strategy": self.long.strategy, "chunk_size": self.long.chunk_size,
                                               "options": self.long.options}))  # as document.json holds it
        config = self.model.args if backend == "mlx" else self.model.config
        self.max_position_embeddings = config.max_position_embeddings
        eos = self.tokenizer.eos_token_ids if backend == "mlx" else self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple, set)) else [eos]) - {None}  # what each library stops at
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="longctx-model")
        self._jobs: set[concurrent.futures.Future] = set()  # submitted, not done (close cancels the queued)
        self._closed = False
        self.queued = 0
        self.documents: dict[str, Document] = {}
        self._lock = threading.Lock()  # the documents dict (the worker and the web side both read it)
        self.data = None if data is None else Path(data)
        if self.data is not None:
            self._open_store()

    # ----- jobs on the model's thread -----------------------------------------------------------
    async def run(self, job: Callable, *args):
        """``job(*args)`` on the model's thread, awaited."""
        self._count(1)
        try:
            return await asyncio.wrap_future(self._submit(job, *args))
        finally:
            self._count(-1)

    def _count(self, n: int) -> None:
        with self._lock:
            self.queued += n

    def stream(self, job: Callable[..., Iterator], *args) -> asyncio.Queue:
        """Items of ``job(*args)`` as they come, through a queue (``None`` ends it; an exception
        is put as itself). Setting ``queue.cancelled`` stops the job at its next item."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        queue.cancelled = threading.Event()
        self._count(1)

        def work():
            try:
                for item in job(*args):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                    if queue.cancelled.is_set():
                        break
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as e:  # noqa: BLE001  (handed to the web side, which answers without a trace)
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                self._count(-1)
        self._submit(work)
        return queue

    def close(self) -> None:
        """Finish the running job, drop the queued ones, and end the model's thread. MLX (0.32+)
        wants a thread that ran it to free its streams itself before it ends (else the process
        may abort at exit: ``terminate called without an active exception``), so that is its
        last job."""
        for job in list(self._jobs):
            job.cancel()  # the queued ones (the running one finishes)
        if self.backend == "mlx" and not self._closed:
            import mlx.core as mx
            self._worker.submit(getattr(mx, "clear_streams", lambda: None))
        self._closed = True
        self._worker.shutdown(wait=True)

    def _submit(self, job: Callable, *args) -> concurrent.futures.Future:
        future = self._worker.submit(job, *args)
        self._jobs.add(future)
        future.add_done_callback(self._jobs.discard)
        return future

    # ----- tokens ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def document_ids(self, text: str, fmt: str) -> list[int]:
        return self.encode(f"<|im_start|>user\n{text}\n\n" if fmt == "chat" else text)

    def question_ids(self, question: str, fmt: str) -> list[int]:
        return self.encode(f"{question}<|im_end|>\n<|im_start|>assistant\n" if fmt == "chat" else question)

    def chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # ----- generation (model thread) --------------------------------------------------------------
    def tokens(self, ids: list[int], max_tokens: int, sampling: dict, cache=None) -> Iterator[int]:
        """Generated ids until an end-of-turn id (not yielded) or ``max_tokens``."""
        if sampling.get("seed") is not None:
            self._seed(sampling["seed"])
        options = {k: v for k, v in sampling.items() if k != "seed" and v is not None}
        if not options.get("temperature"):
            options = {}  # greedy
        for token in self.long.generate(ids, max_tokens, cache=cache, **options):
            if token in self.eos:
                return
            yield token

    def texts(self, ids: list[int], max_tokens: int, sampling: dict, stop: list[str], cache=None,
              cached: int = 0) -> Iterator[str | Answer]:
        """Text deltas, then the ``Answer`` (its ``text`` left empty: the deltas are the text). A stop
        string ends the text before it; text that may be the start of one is held back until it is not."""
        start, decoder, finish, n, held = time.perf_counter(), StreamingDecoder(self.tokenizer), "length", 0, ""
        for token in self.tokens(ids, max_tokens, sampling, cache):
            n += 1
            held += decoder.add(token)
            cut = min((held.find(s) for s in stop if s in held), default=-1)
            if cut >= 0:
                held, finish = held[:cut], "stop"
                break
            keep = max((len(s) - 1 for s in stop), default=0)  # a stop string may be starting
            emit, held = held[:len(held) - keep], held[len(held) - keep:]
            if emit:
                yield emit
        else:
            finish = "stop" if n < max_tokens else "length"
            held += decoder.finish()
        if held:
            yield held
        yield Answer("", finish, len(ids), cached, n, time.perf_counter() - start)

    def answer(self, ids, max_tokens, sampling, stop=(), cache=None, cached: int = 0) -> Answer:
        parts, answer = [], None
        for item in self.texts(ids, max_tokens, sampling, list(stop), cache, cached):
            if isinstance(item, Answer):
                answer = item
            else:
                parts.append(item)
        answer.text = "".join(parts)
        return answer

    def _seed(self, seed: int) -> None:
        if self.backend == "mlx":
            import mlx.core as mx
            mx.random.seed(seed)
        else:
            import torch
            torch.manual_seed(seed)

    # ----- documents (model thread) ---------------------------------------------------------------
    def add_document(self, owner: str, name: str, ids: list[int], fmt: str) -> Document:
        start = time.perf_counter()
        cache = self.long.prefill(ids)
        doc = Document(f"doc-{secrets.token_hex(8)}", owner, name, len(ids), fmt, self.strategy, time.time(),
                       time.perf_counter() - start, cache, ids)
        if self.data is not None:
            self._write(doc)
        with self._lock:
            self.documents[doc.id] = doc
        return doc

    def query(self, doc: Document, question: list[int], max_tokens: int, sampling: dict, stop=(),
              reuse: bool = True) -> Answer:
        """Continue a copy of the document's cache with the question (``reuse=False``: prefill
        the document and the question from scratch, what a server without documents does)."""
        if doc.id not in self.documents:  # deleted while this job waited
            raise DocumentGone(f"no document {doc.id!r}")
        if not reuse:
            return self.answer(self._ids(doc) + question, max_tokens, sampling, stop)
        cache = copy_cache(self._cache(doc), self.long.make_cache())
        return self.answer(question, max_tokens, sampling, stop, cache=cache, cached=doc.tokens)

    def delete_document(self, doc: Document) -> None:
        with self._lock:
            self.documents.pop(doc.id, None)
        if self.data is not None:
            gone = self.data / "tmp" / f"deleted-{doc.id}"
            os.replace(self.data / "documents" / doc.id, gone)  # atomic: whole or not at all
            shutil.rmtree(gone)

    def _cache(self, doc: Document):
        if doc.cache is None:  # saved by an earlier run of the server
            folder = self.data / "documents" / doc.id
            if doc.strategy == self.strategy:
                doc.cache = self.long.make_cache()
                load_cache(folder / "cache.safetensors", doc.cache)
            else:  # another strategy made it: prefill again from the kept ids, and keep that
                doc.cache = self.long.prefill(self._ids(doc))
                doc.strategy = self.strategy
                save_cache(folder / "cache.new.safetensors", doc.cache)
                os.replace(folder / "cache.new.safetensors", folder / "cache.safetensors")
                _write_json(folder / "document.json", doc.record())
        return doc.cache

    def _ids(self, doc: Document) -> list[int]:
        if doc.ids is None:  # saved by an earlier run of the server
            doc.ids = json.loads((self.data / "documents" / doc.id / "ids.json").read_text())
        return doc.ids

    # ----- the store ------------------------------------------------------------------------------
    def _open_store(self) -> None:
        shutil.rmtree(self.data / "tmp", ignore_errors=True)  # half-written uploads of a crashed run
        (self.data / "tmp").mkdir(parents=True)
        (self.data / "documents").mkdir(exist_ok=True)
        for folder in sorted((self.data / "documents").iterdir()):
            record = json.loads((folder / "document.json").read_text())
            self.documents[record["id"]] = Document(**record)

    def _write(self, doc: Document) -> None:
        tmp = self.data / "tmp" / doc.id
        tmp.mkdir()
        (tmp / "ids.json").write_text(json.dumps(doc.ids))
        save_cache(tmp / "cache.safetensors", doc.cache, {"document": doc.id})
        _write_json(tmp / "document.json", doc.record())
        for f in tmp.iterdir():
            _fsync(f)
        os.replace(tmp, self.data / "documents" / doc.id)  # the document appears whole
        _fsync(self.data / "documents")


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["Answer", "Document", "DocumentGone", "Engine", "FORMATS", "StreamingDecoder"]
