"""A load test for ``longctx serve``: ``python -m longctx.serve.load URL --key KEY``.

``clients`` concurrent clients (32) for ``seconds`` (60), each with its own
passkey document, asking it through the documents API and the chat API in
turn. Every answer is checked against the answer the same request got when
the server was idle (greedy decoding is deterministic), and every request must
succeed: a wrong answer or a failed request is counted, never dropped. Prints
requests/s and p50/p99 latency per route, and how many passkeys the model
retrieved; returns them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

QUESTION = " What is the pass key? The pass key is"


def passkey_document(i: int, fillers: int | None = None) -> tuple[str, str]:
    """A passkey prompt for the shipped model (raw format), and its key: ``fillers`` filler
    sentences (51 tokens each, in the shipped tokenizer) on each side of the key (default: a short prompt, 2-4)."""
    from longctx.data.tasks import FILLER, PASSKEY_NEEDLE, PASSKEY_PREFIX
    key = str(10_000 + (7919 * i) % 90_000)
    filler = FILLER * (2 + i % 3 if fillers is None else fillers)
    return f"<|endoftext|>{PASSKEY_PREFIX}{filler}{PASSKEY_NEEDLE.format(key, key)}{filler}", key


async def cold_warm(url: str, key: str | None, lengths=(1024, 4096, 16384), max_tokens: int = 8) -> list[dict]:
    """For a document of about each length: its upload (the prefill), then one question warm
    (continuing the kept cache) and one cold (``reuse_cache: false``: document and question
    prefilled from scratch): tokens processed and seconds, as the server reports them."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    rows = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600) as http:
        for length in lengths:
            text, passkey = passkey_document(0, max(1, (length - 120) // 102))  # 51 tokens a filler
            start = time.perf_counter()
            r = await http.post("/v1/documents", json={"text": text, "format": "raw"})
            r.raise_for_status()
            doc = r.json()
            row = {"document_tokens": doc["tokens"], "upload_seconds": time.perf_counter() - start,
                   "prefill_seconds": doc["prefill_seconds"]}
            for mode, reuse in (("warm", True), ("cold", False)):
                q = await http.post(f"/v1/documents/{doc['id']}/query",
                                    json={"question": QUESTION, "max_tokens": max_tokens, "reuse_cache": reuse})
                q.raise_for_status()
                answer = q.json()
                row[mode] = {"prompt_tokens": answer["usage"]["prompt_tokens"], "seconds": answer["seconds"],
                             "answer": answer["answer"], "retrieved": answer["answer"].strip().startswith(passkey)}
            await http.delete(f"/v1/documents/{doc['id']}")
            rows.append(row)
    return rows


async def run_load(url: str, key: str | None, clients: int = 32, seconds: float = 60.0,
                   max_tokens: int = 8) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timings: dict[str, list[float]] = {"query": [], "chat": []}
    failures: list[str] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
        async def ask(i: int, route: str, doc: str) -> str | None:
            path, body = ((f"/v1/documents/{doc}/query", {"question": QUESTION, "max_tokens": max_tokens})
                          if route == "query" else
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Copy this: {i}{i} "
                                                                                             "Again:"}],
                                                    "max_tokens": max_tokens}))
            r = await http.post(path, json=body)
            if r.status_code != 200:
                failures.append(f"client {i}: {route} {r.status_code} {r.text[:200]}")
                return None
            data = r.json()
            return data["answer"] if route == "query" else data["choices"][0]["message"]["content"]

        # Idle: each client's document, and the answers its requests must get under load.
        docs, expected, retrieved = [], [], 0
        for i in range(clients):
            text, passkey = passkey_document(i)
            r = await http.post("/v1/documents", json={"text": text, "format": "raw", "name": f"load-{i}"})
            if r.status_code != 201:
                raise RuntimeError(f"upload failed: {r.status_code} {r.text[:200]}")
            docs.append(r.json()["id"])
            expected.append({route: await ask(i, route, docs[i]) for route in ("query", "chat")})
            retrieved += (expected[i]["query"] or "").strip().startswith(passkey)

        async def client(i: int) -> None:
            end, turn = time.perf_counter() + seconds, 0
            while turn < 2 or time.perf_counter() < end:
                route = ("query", "chat")[turn % 2]
                start = time.perf_counter()
                answer = await ask(i, route, docs[i])
                timings[route].append(time.perf_counter() - start)
                if answer is not None and answer != expected[i][route]:
                    failures.append(f"client {i}: {route} answered {answer!r} under load, {expected[i][route]!r} "
                                    "idle")
                turn += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
        for doc in docs:
            await http.delete(f"/v1/documents/{doc}")
    out = {"clients": clients, "seconds": wall, "failures": failures, "passkeys_retrieved": retrieved / clients,
           "requests": sum(map(len, timings.values()))}
    out["requests_per_second"] = out["requests"] / wall
    for route, t in timings.items():
        q = statistics.quantiles(t, n=100) if len(t) > 1 else t * 99
        out[route] = {"requests": len(t), "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98]}
    return out


def figure(result: dict, path) -> None:
    """What a question costs with and without the kept cache (a picture, then the measured
    seconds by document length), and the load test's latencies."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    rows = result["cold_warm"]
    # The picture: what each request runs through the model.
    lanes = [("upload", [(0, 10, "C0", "document: prefilled once, cache kept")]),
             ("question 1", [(0, 10, "0.85", None), (10, 1.2, "C1", "question: on a copy of the cache")]),
             ("question 2", [(0, 10, "0.85", "reused, not recomputed"), (10, 1.2, "C1", None)]),
             ("cold question", [(0, 10, "C3", "without the document API: all again"), (10, 1.2, "C3", None)])]
    for y, (label, spans) in enumerate(reversed(lanes)):
        for start, width, color, legend in spans:
            ax0.barh(y, width, left=start, color=color, edgecolor="white", label=legend)
    ax0.set_yticks(range(len(lanes)), [label for label, _ in reversed(lanes)])
    ax0.set(xticks=[], title="reusing a document's cache: tokens through the model")
    ax0.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, frameon=False)
    n = [r["document_tokens"] for r in rows]
    ax1.plot(n, [r["cold"]["seconds"] for r in rows], "o-", color="C3", label="cold: document + question")
    ax1.plot(n, [r["warm"]["seconds"] for r in rows], "s-", color="C1", label="warm: the question only")
    ax1.set(xscale="log", yscale="log", xlabel="document tokens", ylabel="seconds per question",
            title=f"one question of {rows[0]['warm']['prompt_tokens']} tokens")
    ax1.legend(fontsize=8)
    load = result["load"]
    routes = ["query", "chat"]
    x = np.arange(len(routes))
    ax2.bar(x - 0.2, [load[r]["p50_ms"] for r in routes], 0.4, label="p50")
    ax2.bar(x + 0.2, [load[r]["p99_ms"] for r in routes], 0.4, label="p99")
    ax2.set_xticks(x, ["document query", "chat completion"])
    ax2.set(ylabel="latency (ms)", title=f"{load['clients']} clients, {load['seconds']:.0f} s: "
                                         f"{load['requests_per_second']:.1f} req/s, {len(load['failures'])} wrong")
    ax2.legend(fontsize=8)
    fig.suptitle(f"longctx serve: {result['server']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longctx.serve.load", description=__doc__.split("\n\n")[0])
    p.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=None)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--cold-warm", default=None, help="also time cold and warm questions on documents of about "
                                                     "these lengths, e.g. 1024,4096,16384")
    p.add_argument("--out", type=Path, default=None, help="write serve.json and serve.png here (with --cold-warm)")
    args = p.parse_args(argv)
    health = httpx.get(args.url + "/health").json()
    server = f"{health['model']}, {health['strategy']} {health['options'] or ''} ({health['backend']})"
    result = {"server": server}
    if args.cold_warm:
        result["cold_warm"] = asyncio.run(cold_warm(args.url, args.key, [int(x) for x in args.cold_warm.split(",")]))
        print(f"{server}: a question of {result['cold_warm'][0]['warm']['prompt_tokens']} tokens")
        for r in result["cold_warm"]:
            print(f"  document {r['document_tokens']:>7,} tokens: upload {r['upload_seconds']:.2f} s; cold "
                  f"{r['cold']['prompt_tokens']:,} tokens {r['cold']['seconds']:.3f} s, warm "
                  f"{r['warm']['prompt_tokens']} tokens {r['warm']['seconds']:.3f} s "
                  f"({r['cold']['seconds'] / r['warm']['seconds']:.1f}x)")
    out = result["load"] = asyncio.run(run_load(args.url, args.key, args.clients, args.seconds))
    print(f"{out['clients']} clients, {out['seconds']:.1f} s: {out['requests']} requests, "
          f"{out['requests_per_second']:.1f} requests/s, {len(out['failures'])} failed or wrong; passkeys "
          f"retrieved {out['passkeys_retrieved']:.0%}")
    for route in ("query", "chat"):
        r = out[route]
        print(f"  {route:5s}: {r['requests']} requests, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms")
    for f in out["failures"][:10]:
        print("  " + f)
    if args.out and args.cold_warm:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve.json").write_text(json.dumps(result, indent=1))
        figure(result, args.out / "serve.png")
        print(f"wrote {args.out / 'serve.json'} and serve.png")
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
