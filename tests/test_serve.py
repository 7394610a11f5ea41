"""`longctx serve`: a real uvicorn in a subprocess, driven by httpx and the openai client.

The answers are checked against mlx-lm's own `generate` (and transformers' for
the torch backend) on the same full prompt; the load test checks every answer
under 32 concurrent clients against the answer the server gave when idle.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx.models import TRAINED
from longctx.serve.load import QUESTION, passkey_document, run_load
from longctx.serve.security import new_key

LOAD_SECONDS = float(os.environ.get("LONGCTX_LOAD_SECONDS", "60"))  # the issue: 32 clients for a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Url(str):
    proc: subprocess.Popen


@contextlib.contextmanager
def server(*args: str, port: int | None = None, cwd=None):
    """``longctx serve ARGS`` (in ``cwd``) on a free port until the block ends; yields its URL."""
    port = port or free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"longctx-serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "longctx.cli", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    url = Url(f"http://127.0.0.1:{port}")
    url.proc = proc
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError("the server did not answer /health in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys"
    return path, {name: new_key(path, name) for name in ("alice", "bob", "carol", "dave")}


@pytest.fixture(scope="module")
def mlx_model():
    from longctx.models import load_trained
    return load_trained("mlx")


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def mlx_lm_answer(mlx_model, ids: list[int], n: int) -> str:
    from mlx_lm import generate
    model, tokenizer = mlx_model
    return generate(model, tokenizer, ids, max_tokens=n, verbose=False)


def test_keys_file_holds_only_hashes(keys):
    path, issued = keys
    text = path.read_text()
    assert all(key not in text for key in issued.values())
    assert len(text.splitlines()) == 4 and all(line.startswith("sha256:") for line in text.splitlines())


def test_documents_are_answered_as_mlx_lm_would_and_survive_a_restart(tmp_path, keys, mlx_model):
    path, k = keys
    _, tokenizer = mlx_model
    text, passkey = passkey_document(3)
    doc_ids = tokenizer.encode(text, add_special_tokens=False)
    q_ids = tokenizer.encode(QUESTION, add_special_tokens=False)
    expected = mlx_lm_answer(mlx_model, doc_ids + q_ids, 12)
    assert expected.strip().startswith(passkey)  # the shipped model retrieves this one
    args = ("--api-keys", str(path), "--data", str(tmp_path / "data"))
    with server(*args) as url:
        r = httpx.post(url + "/v1/documents", json={"text": text, "format": "raw", "name": "passkey"},
                       headers=auth(k["alice"]))
        assert r.status_code == 201, r.text
        doc = r.json()
        assert doc["tokens"] == len(doc_ids) and doc["name"] == "passkey"
        ask = {"question": QUESTION, "max_tokens": 12}
        for _ in range(2):  # the second question starts from the same, untouched document cache
            r = httpx.post(f"{url}/v1/documents/{doc['id']}/query", json=ask, headers=auth(k["alice"]))
            assert r.status_code == 200, r.text
            assert r.json()["answer"] == expected
            assert r.json()["usage"] == {"prompt_tokens": len(q_ids), "cached_tokens": len(doc_ids),
                                         "completion_tokens": 12}
            assert r.json()["finish_reason"] == "length"  # no end-of-turn token within 12
        cold = httpx.post(f"{url}/v1/documents/{doc['id']}/query", json={**ask, "reuse_cache": False},
                          headers=auth(k["alice"])).json()
        assert cold["answer"] == expected and cold["usage"]["prompt_tokens"] == len(doc_ids) + len(q_ids)
        # A file upload of the same text: the same tokens.
        r = httpx.post(url + "/v1/documents", files={"file": ("doc.txt", text.encode())}, data={"format": "raw"},
                       headers=auth(k["alice"]))
        assert r.status_code == 201 and r.json()["tokens"] == len(doc_ids) and r.json()["name"] == "doc.txt"
        second = r.json()["id"]
        r = httpx.post(url + "/v1/documents", json={"text": text}, headers=auth(k["alice"]))
        assert r.json()["format"] == "chat"  # the default when the tokenizer has a chat template
        assert r.json()["tokens"] == len(tokenizer.encode(f"<|im_start|>user\n{text}\n\n"))
        assert httpx.delete(f"{url}/v1/documents/{r.json()['id']}", headers=auth(k["alice"])).status_code == 200
        listed = httpx.get(url + "/v1/documents", headers=auth(k["alice"])).json()["data"]
        assert [d["id"] for d in listed] == [doc["id"], second]
    with server(*args) as url:  # a new process: the documents and their caches come back from --data
        assert httpx.get(f"{url}/v1/documents/{doc['id']}", headers=auth(k["alice"])).json() == doc
        r = httpx.post(f"{url}/v1/documents/{doc['id']}/query", json=ask, headers=auth(k["alice"]))
        assert r.json()["answer"] == expected and r.json()["usage"]["prompt_tokens"] == len(q_ids)
        assert httpx.delete(f"{url}/v1/documents/{second}", headers=auth(k["alice"])).json()["deleted"]
        assert httpx.get(f"{url}/v1/documents/{second}", headers=auth(k["alice"])).status_code == 404
    assert sorted(p.name for p in (tmp_path / "data" / "documents").iterdir()) == [doc["id"]]
    # Another strategy on the same data: the document is prefilled again from its kept ids.
    with server(*args, "--strategy", "sliding", "-o", "window_size=1024") as url:
        r = httpx.post(f"{url}/v1/documents/{doc['id']}/query", json=ask, headers=auth(k["alice"]))
        assert r.json()["answer"] == expected  # the window holds the whole document: exact


def test_keys_limits_and_errors(tmp_path, keys):
    path, k = keys
    args = ("--api-keys", str(path), "--burst", "6", "--rate", "20", "--max-body-mb", "1",
            "--max-document-tokens", "400", "--max-new-tokens", "16")
    with server(*args) as url:
        text, _ = passkey_document(0)
        doc = httpx.post(url + "/v1/documents", json={"text": text, "format": "raw"}, headers=auth(k["alice"]))
        assert doc.status_code == 201, doc.text
        query = f"{url}/v1/documents/{doc.json()['id']}/query"
        # 401: no key, a wrong key, in either header; /health needs none.
        for headers in ({}, auth("lc-wrong"), {"X-API-Key": "lc-wrong"}, {"Authorization": k["alice"]}):
            r = httpx.post(query, json={"question": "?"}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/health").json()["status"] == "ok"
        assert httpx.post(query, json={"question": " Hi", "max_tokens": 2}, headers={"X-API-Key": k["alice"]}
                          ).status_code == 200
        # 404: another key's document is not there, for reading, asking or deleting.
        for method in ("GET", "DELETE"):
            assert httpx.request(method, query[:-len("/query")], headers=auth(k["bob"])).status_code == 404
        assert httpx.post(query, json={"question": "?"}, headers=auth(k["bob"])).status_code == 404
        assert httpx.get(url + "/v1/documents", headers=auth(k["bob"])).json()["data"] == []
        # 413: a body over 1 MiB, a document over 400 tokens, max_tokens over 16; 422: malformed or missing.
        d = auth(k["dave"])
        big = httpx.post(url + "/v1/documents", content=b'{"text": "' + b"a" * (1 << 20) + b'"}',
                         headers={**d, "content-type": "application/json"})
        assert big.status_code == 413
        chunked = httpx.post(url + "/v1/documents", content=iter([b'{"text": "', b"a" * (1 << 20), b'"}']),
                             headers={**d, "content-type": "application/json"})
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives
        r = httpx.post(url + "/v1/documents", json={"text": "The grass is green. " * 100}, headers=d)
        assert r.status_code == 413 and "400" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 17}, headers=d).status_code == 413
        r = httpx.post(url + "/v1/documents", content=b'{"text": ', headers={**d, "content-type": "application/json"})
        assert r.status_code == 422 and "Traceback" not in r.text
        assert httpx.post(url + "/v1/chat/completions", json={"messages": []}, headers=d).status_code == 422
        # 429 once carol's burst of 6 is spent, with Retry-After; after it, carol may go again. (20 a
        # minute: one token back every 3 s, so a slow machine's 8 requests still find the bucket empty.)
        codes = [httpx.get(url + "/v1/documents", headers=auth(k["carol"])).status_code for _ in range(7)]
        assert codes == [200] * 6 + [429]
        r = httpx.get(url + "/v1/documents", headers=auth(k["carol"]))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        time.sleep(int(r.headers["retry-after"]))
        assert httpx.get(url + "/v1/documents", headers=auth(k["carol"])).status_code == 200
        assert httpx.get(url + "/v1/documents", headers=auth(k["alice"])).status_code == 200  # its own bucket


def test_the_openai_client_works_unchanged(keys, mlx_model):
    from openai import OpenAI
    path, k = keys
    _, tokenizer = mlx_model
    messages = [{"role": "system", "content": "Copy the text."}, {"role": "user", "content": "Copy this: qwe Again:"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = mlx_lm_answer(mlx_model, tokenizer.encode(prompt, add_special_tokens=False), 10)
    with server("--api-keys", str(path), "--burst", "100") as url:
        client = OpenAI(base_url=url + "/v1", api_key=k["alice"], max_retries=0)
        assert [m.id for m in client.models.list()] == ["qwen3-tiny-longctx"]
        reply = client.chat.completions.create(model="qwen3-tiny-longctx", messages=messages, max_tokens=10)
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
        stream = client.chat.completions.create(model="qwen3-tiny-longctx", messages=messages, max_tokens=10,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        # A conversation over the budget (512 tokens) is fitted by Task 6's manager, not refused.
        history = [{"role": ("user", "assistant")[i % 2], "content": f"Turn {i}: the grass is green. " * 4}
                   for i in range(40)]
        long = client.chat.completions.create(model="m", messages=[*history, {"role": "user", "content": "Hi"}],
                                              max_tokens=8)
        assert long.usage.prompt_tokens <= 512 - 8 < len(tokenizer.apply_chat_template(history, tokenize=True))
        # Stop strings end the answer before them.
        stopped = client.chat.completions.create(model="m", messages=messages, max_tokens=10, stop=[expected[2:4]])
        assert stopped.choices[0].message.content == expected[:expected.index(expected[2:4])]
        assert stopped.choices[0].finish_reason == "stop"
        with pytest.raises(Exception) as e:
            OpenAI(base_url=url + "/v1", api_key="lc-wrong", max_retries=0).models.list()
        assert getattr(e.value, "status_code", None) == 401


def test_health_answers_while_the_model_works_and_32_clients_get_every_answer(keys):
    path, k = keys
    with server("--api-keys", str(path), "--rate", "1000000", "--burst", "100000") as url:
        long_job = threading.Thread(target=lambda: httpx.post(
            url + "/v1/chat/completions", headers=auth(k["bob"]), timeout=300,
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400}))
        long_job.start()
        seen = []
        while long_job.is_alive() and not any(seen):
            seen.append(httpx.get(url + "/health", timeout=30).json()["queued"])
        long_job.join()
        assert any(seen), "/health never answered while a job was queued"
        out = asyncio.run(run_load(url, k["alice"], clients=32, seconds=LOAD_SECONDS))
        assert out["failures"] == []
        assert out["query"]["requests"] >= 32 and out["chat"]["requests"] >= 32
        assert out["passkeys_retrieved"] >= 0.75
        print(json.dumps({key: out[key] for key in ("requests_per_second", "query", "chat")}))


def test_the_torch_backend_answers_as_transformers_would(tmp_path, mlx_model):
    import torch
    from transformers import AutoModelForCausalLM
    _, tokenizer = mlx_model
    text, passkey = passkey_document(1)
    ids = tokenizer.encode(text + QUESTION, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(TRAINED).float().eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    expected = tokenizer.decode(out[:out.index(2)] if 2 in out else out)  # the server stops before <|im_end|>
    with server("--backend", "torch", "--strategy", "streaming", "-o", "window=1024", "--data",
                str(tmp_path)) as url:
        doc = httpx.post(url + "/v1/documents", json={"text": text, "format": "raw"}).json()
        for _ in range(2):
            r = httpx.post(f"{url}/v1/documents/{doc['id']}/query", json={"question": QUESTION, "max_tokens": 8})
            assert r.json()["answer"] == expected, r.text
    with server("--backend", "torch", "--strategy", "streaming", "-o", "window=1024", "--data",
                str(tmp_path)) as url:  # the torch cache, saved and loaded
        r = httpx.post(f"{url}/v1/documents/{doc['id']}/query", json={"question": QUESTION, "max_tokens": 8})
        assert r.json()["answer"] == expected


def test_health_answers_in_100_ms_during_an_8_mib_upload_and_sigterm_stops_the_prefill(tmp_path):
    """The upload is tokenised off the event loop in pieces (5M tokens; one call held the GIL for
    18 s) and prefilled on the model's thread; SIGTERM then stops the server within seconds and
    the unfinished document is not kept."""
    words = "green blue yellow grass sky sun pass key remember quiz hidden text important".split()
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(1_200_000))[: (8 << 20) - 4096]
    data = tmp_path / "data"
    with server("--strategy", "sliding", "-o", "window_size=64", "--max-document-tokens", "100000000",
                "--data", str(data)) as url, httpx.Client(base_url=url, timeout=30) as client:
        upload = threading.Thread(target=lambda: httpx.post(url + "/v1/documents", timeout=600,
                                                            json={"text": text, "format": "raw"}))
        upload.start()
        latencies, prefilling = [], None
        while upload.is_alive() and (prefilling is None or time.perf_counter() - prefilling < 3):
            start = time.perf_counter()
            queued = client.get("/health").json()["queued"]
            latencies.append(time.perf_counter() - start)
            if queued and prefilling is None:  # tokenised: the prefill is the model's job now
                prefilling = time.perf_counter()
            time.sleep(0.02)
        assert prefilling is not None, "the upload ended before its prefill was seen"
        latencies.sort()
        print(f"/health: {len(latencies)} answers, median {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
              f"max {latencies[-1] * 1e3:.1f} ms")
        # 99 in 100 within 100 ms and every one within 0.5 s (before: up to 10.9 s); the client shares 2 cores
        # with the tokenizer's threads, the prefill and maybe another test, so one slow answer is not the server's
        assert latencies[len(latencies) * 99 // 100 - 1] < 0.1 and latencies[-1] < 0.5
        start = time.perf_counter()
        url.proc.terminate()
        url.proc.wait(30)
        assert time.perf_counter() - start < 6
        upload.join(30)
    assert not list((data / "documents").iterdir())  # dropped, as a crash would drop it


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_long_text_tokenised_in_pieces_has_the_ids_of_one_call(monkeypatch, backend):
    from longctx.serve import engine as serving
    monkeypatch.setattr(serving, "PIECE", 40)  # many cuts
    engine = serving.Engine(TRAINED, "sliding", {"window_size": 64}, backend=backend)
    rng = random.Random(1)
    parts = ["word", " ", "  ", "\n", "\n\n", "It's", "71432", "naïve", "日本語", "🙂", "<|endoftext|>", ",", "'ll",
             "don't", "\t", "A", "z"]
    cuts = 0
    for _ in range(20):
        text = "".join(rng.choice(parts) for _ in range(rng.randrange(1, 300)))
        cuts += len(serving.word_pieces(text, 40)) - 1
        assert engine.encode(text) == list(engine.tokenizer.encode(text, add_special_tokens=False)), text
    assert cuts > 10
    engine.close()


def test_close_frees_mlx_streams_on_the_model_thread(monkeypatch):
    """MLX 0.32 aborts at exit now and then ("terminate called without an active exception")
    unless the thread that ran it calls ``mx.clear_streams()`` before it ends."""
    import mlx.core as mx

    from longctx.serve.engine import Engine
    engine = Engine(TRAINED, "sliding", {"window_size": 64})
    assert asyncio.run(engine.run(lambda: mx.sum(mx.arange(4)).item())) == 6  # the model thread has run MLX
    cleared = []
    monkeypatch.setattr(mx, "clear_streams", lambda: cleared.append(threading.current_thread().name))
    engine.close()
    engine.close()  # twice is fine
    assert len(cleared) == 1 and cleared[0].startswith("longctx-model"), cleared


def test_refuses_a_public_address_without_keys():
    r = subprocess.run([sys.executable, "-m", "longctx.cli", "serve", "--host", "0.0.0.0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--api-keys" in r.stderr


def test_the_readme_example_answers_with_curl_and_the_openai_client(tmp_path):
    """The README's serving section, run as written (its port swapped for a free one)."""
    import re
    import shutil
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Serving long documents"):readme.index("## Layout")]
    shell, curls, python = re.findall(r"```(?:sh|python)\n(.*?)```", section, re.S)
    make_key, serve = [line.split("#")[0].split() for line in shell.strip().splitlines()]
    assert make_key[:2] == ["longctx", "serve-key"] and serve[:2] == ["longctx", "serve"]
    made = subprocess.run([sys.executable, "-m", "longctx.cli", *make_key[1:]], cwd=tmp_path, capture_output=True,
                          text=True, check=True)
    key = made.stdout.strip().splitlines()[-1]
    port = free_port()
    with server(*serve[2:], port=port, cwd=tmp_path):
        upload, query = [line.replace("localhost:8000", f"localhost:{port}")
                         for line in curls.splitlines() if line.startswith("curl")]
        env = {**os.environ, "KEY": key}
        if shutil.which("curl"):
            doc = json.loads(subprocess.run(["bash", "-c", upload], env=env, capture_output=True, text=True,
                                            check=True).stdout)
            reply = json.loads(subprocess.run(["bash", "-c", query.replace("doc-…", doc["id"])], env=env,
                                              capture_output=True, text=True, check=True).stdout)
        else:  # the same requests without curl
            body = lambda line: json.loads(re.search(r"-d '(.*)'$", line).group(1))  # noqa: E731
            headers = {"Authorization": f"Bearer {key}"}
            doc = httpx.post(f"http://localhost:{port}/v1/documents", json=body(upload), headers=headers).json()
            reply = httpx.post(f"http://localhost:{port}/v1/documents/{doc['id']}/query", json=body(query),
                               headers=headers).json()
        assert doc["tokens"] == 224 and reply["answer"] == "71432" and reply["usage"]["cached_tokens"] == 224
        out = subprocess.run([sys.executable, "-c", f"KEY = {key!r}\n" + python.replace(":8000", f":{port}")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "completion_tokens=8" in out.stdout, out.stdout + out.stderr
    assert len(list((tmp_path / "served" / "documents").iterdir())) == 1
