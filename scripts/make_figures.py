"""Draw the book's figures from the oracles: ``python scripts/make_figures.py``.

Writes to book/src/figures/:
* sliding-mask.png: the Task 1 mask for a prefill (Lq = Lk = 16) and a decode
  chunk (Lq = 4 queries at the end of Lk = 16 keys), window 5;
* dilated-pattern.png: which keys each query sees, per head and per level, for
  LongNet levels (4, 1), (8, 2), (16, 4) with 4 heads, and the union count;
* ring-schedule.png: which kv shard each rank holds at each ring step, and the
  causal work per rank for the contiguous and zigzag layouts;
* compression-survivors.png: which of 128 cached positions each Task 4 method
  keeps at ratio 0.75 (random keys with planted heavy hitters), with SnapKV's
  pooled scores;
* attention-sinks.png: the attention mass the shipped trained model (and, for
  contrast, the seeded untrained tiny Qwen3) puts on its first 4 tokens, and
  what StreamingLLM's cache holds as a stream goes by;
* adaptive-context.png: what the Task 6 manager keeps verbatim and folds into
  its summary, for one 24-message conversation under shrinking budgets;
* qwen3-strategies.png: cache entries each strategy holds inside the tiny
  Qwen3 as the input grows, and how far its logits are from the full model's;
* rope-factors.png: PI, NTK, YaRN (exact and as a linear blend of factors),
  Llama 3 and the searched LongRoPE as per-pair rescale factors, beside each
  pair's wavelength;
* sparse-patterns.png: Longformer's mask (bidirectional and causal, with global
  tokens) and BigBird's per-key counts (seeded random blocks, and HF's
  evaluation mode where the "random" blocks are all block 0);
* linear-chunks.png: where a row of chunked linear attention gets each key
  from (the state before its chunk, or the masked product inside it), and
  the three forms' outputs against the float64 oracle.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from longctx.testing.inputs import make_qkv  # noqa: E402
from longctx.testing.oracles import (causal_mask, compression_scores, dilated_pairs, kept_indices,  # noqa: E402
                                     n_kept, sliding_mask)

OUT = Path(__file__).resolve().parents[1] / "book" / "src" / "figures"


def sliding_mask_figure(path: Path, L: int = 16, window: int = 5) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1, 1]})
    panels = [(causal_mask(L, L), f"causal, Lq = Lk = {L}"),
              (sliding_mask(L, L, window), f"sliding, window = {window}"),
              (sliding_mask(4, L, window), f"decode chunk: Lq = 4, Lk = {L}")]
    for ax, (mask, title) in zip(axes, panels):
        ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4, aspect="equal")
        lq, lk = mask.shape
        ax.set_xticks(range(lk))
        ax.set_yticks(range(lq), [str(lk - lq + i) for i in range(lq)])
        ax.set_xticks([x - 0.5 for x in range(lk + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(lq + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(labelsize=6, which="both", length=0)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position p")
        ax.set_title(title, fontsize=10)
    fig.suptitle("Query p sees keys p - W < j <= p (bottom-right aligned when Lq < Lk)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dilated_figure(path: Path, L: int = 16, heads: int = 4, levels=((4, 1), (8, 2), (16, 4))) -> None:
    fig, axes = plt.subplots(len(levels) + 1, heads, figsize=(2.3 * heads, 2.4 * (len(levels) + 1)))
    count = np.zeros((heads, L, L))
    for row, (w, r) in enumerate(levels):
        pairs = dilated_pairs(heads, L, L, w, r)
        count += pairs
        for h in range(heads):
            axes[row, h].imshow(pairs[h], cmap="Blues", vmin=0, vmax=1.3)
            axes[row, h].set_title(f"level w={w}, r={r}: head {h}", fontsize=8)
    for h in range(heads):
        axes[-1, h].imshow(count[h], cmap="Purples", vmin=0, vmax=len(levels))
        axes[-1, h].set_title(f"union, head {h} (darker = more levels)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.supxlabel("key position j")
    fig.supylabel("query position p")
    fig.suptitle(f"LongNet dilated attention, L = {L}, {heads} heads: head h keeps offset h // ceil(H / r)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ring_figure(path: Path, P: int = 4) -> None:
    fig, (ax_s, ax_c, ax_z) = plt.subplots(1, 3, figsize=(13, 3.8))
    held = np.array([[(r - t) % P for r in range(P)] for t in range(P)])  # (step, rank) -> kv shard held
    ax_s.imshow(held, cmap="tab10", vmin=0, vmax=9)
    for t in range(P):
        for r in range(P):
            ax_s.text(r, t, f"kv{held[t, r]}", ha="center", va="center", fontsize=9, color="white")
    ax_s.set_xticks(range(P), [f"rank {r}" for r in range(P)])
    ax_s.set_yticks(range(P), [f"step {t}" for t in range(P)])
    ax_s.set_title("who holds which kv shard (q shard r stays on rank r)", fontsize=9)
    L = 8 * P
    chunk = L // (2 * P)
    for ax, layout in ((ax_c, "contiguous"), (ax_z, "zigzag")):
        owner = np.zeros(L, dtype=int)
        for r in range(P):
            if layout == "contiguous":
                owner[r * 2 * chunk:(r + 1) * 2 * chunk] = r
            else:
                owner[r * chunk:(r + 1) * chunk] = r
                owner[(2 * P - 1 - r) * chunk:(2 * P - r) * chunk] = r
        image = np.where(causal_mask(L, L), owner[:, None], np.nan)
        ax.imshow(image, cmap="tab10", vmin=0, vmax=9)
        work = [int(causal_mask(L, L)[owner == r].sum()) for r in range(P)]
        ax.set_title(f"{layout}: causal work per rank {work}", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position (colour = rank)")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compression_figure(path: Path, L: int = 128, ratio: float = 0.75) -> None:
    q, k, _ = make_qkv(5, 1, 2, 1, 32, L, 16)
    k[:, :, 50:56] += 1.5 * q[:, :, -8:].mean(axis=(1, 2))[:, None]  # heavy hitters in the middle
    methods = ["h2o", "snapkv", "knorm", "streaming"]
    fig, (ax_k, ax_s) = plt.subplots(2, 1, figsize=(11, 4.6), gridspec_kw={"height_ratios": [1.4, 1]}, sharex=True)
    grid = np.zeros((len(methods), L))
    for row, method in enumerate(methods):
        keep = kept_indices(compression_scores(method, k, q, observation_window=8), n_kept(L, ratio), 4, 8)
        grid[row, keep[0, 0]] = 1
    ax_k.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest")
    ax_k.set_yticks(range(len(methods)), methods)
    ax_k.set_title(f"kept positions (black) of L = {L} at ratio {ratio}: 4 sinks + 8 recent always; "
                   f"heavy hitters planted at 50..55")
    snap = compression_scores("snapkv", k, q, observation_window=8)[0, 0]
    raw = compression_scores("snapkv", k, q, observation_window=8, pool_kernel=1)[0, 0]
    ax_s.plot(np.where(np.isinf(raw), np.nan, raw), lw=0.8, label="attention from the last 8 queries")
    ax_s.plot(np.where(np.isinf(snap), np.nan, snap), lw=1.6, label="pooled (kernel 5): SnapKV's score")
    ax_s.axvspan(L - 8, L - 1, color="C2", alpha=0.2, label="observation window (always kept)")
    ax_s.set_xlabel("cached position")
    ax_s.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sink_mass(model, ids: list[int], sinks: int = 4) -> np.ndarray:
    """Mean attention mass on the first ``sinks`` keys, per query position (a transformers model)."""
    import torch
    with torch.no_grad():
        attentions = model(torch.tensor(ids)[None], output_attentions=True).attentions  # layers x (1, H, L, L)
    return torch.stack([a[0, :, :, :sinks].sum(-1) for a in attentions]).mean(dim=(0, 1)).numpy()


def sinks_figure(path: Path, sinks: int = 4, window: int = 24, chunk: int = 8, stream: int = 64) -> None:
    from longctx.data import tasks
    from longctx.models import TINY_QWEN3, load_trained, torch_qwen3
    trained, tokenizer = load_trained("torch")
    trained.config._attn_implementation = "eager"  # returns the attention weights
    text = tasks.text(tokenizer, 512)  # the shipped text, <|endoftext|> first, as in training
    random = np.random.default_rng(0).integers(0, TINY_QWEN3["vocab_size"], 512).tolist()
    positions = np.arange(1, 513)
    fig, (ax_m, ax_c) = plt.subplots(1, 2, figsize=(12, 3.8))
    ax_m.loglog(positions, sink_mass(trained, text, sinks), label="trained (shipped model), the shipped text")
    ax_m.loglog(positions, sink_mass(torch_qwen3(0), random, sinks), label="seeded, untrained, random ids")
    ax_m.loglog(positions, np.minimum(sinks, positions) / positions, "--", label="uniform over the visible keys")
    ax_m.set_xlabel("query position + 1")
    ax_m.set_ylabel(f"attention on the first {sinks} tokens")
    ax_m.legend(fontsize=8)
    ax_m.set_title("attention mass on the sinks (mean over layers and heads)")
    held = np.zeros((stream // chunk, stream))
    for t in range(stream // chunk):
        end = (t + 1) * chunk
        held[t, :min(sinks, end)] = 1
        held[t, max(sinks, end - chunk - window):end - chunk] = 1
        held[t, end - chunk:end] = 2
    ax_c.imshow(held, aspect="auto", cmap="Blues", interpolation="nearest")
    ax_c.set_xlabel("stream position")
    ax_c.set_ylabel("chunk")
    ax_c.set_title(f"what chunk t attends to: {sinks} sinks + last {window} (light), itself (dark)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def adaptive_figure(path: Path, budgets=(700, 600, 450, 300, 180)) -> None:
    from longctx.mlx.adaptive import AdaptiveContextManager
    from longctx.models import tiny_tokenizer
    rng = np.random.default_rng(0)
    facts = ["We meet at 10 am.", "Maria sends the slides.", "Budget: 4,500 dollars.", "Can you book a room?",
             "Sounds good.", "ok.", "We decided on the train.", "Nice weather today."]
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    history += [{"role": ("user", "assistant")[i % 2], "content": " ".join(rng.choice(facts, 2))} for i in range(23)]
    tok = tiny_tokenizer()
    grid = np.zeros((len(budgets), len(history) + 1))
    fig, ax = plt.subplots(figsize=(11, 3.2))
    for row, budget in enumerate(budgets):
        m = AdaptiveContextManager(budget, tokenizer=tok, keep_recent_turns=4)
        prompt = m.manage_context(history, "What did we decide?")
        tail = prompt
        for col in range(len(history) - 1, 0, -1):  # the kept turns are the most recent ones
            block = f"<|im_start|>{history[col]['role']}\n{history[col]['content']}<|im_end|>"
            grid[row, col] = 2 if block in tail else 1
            tail = tail[:tail.rfind(block)] if block in tail else ""
        grid[row, 0] = 3
        grid[row, -1] = 3
        summary = prompt.count("\n- ")
        ax.text(len(history) + 0.7, row, f"{m.count_tokens(prompt)} tokens" + (f", summary of {summary} points"
                                                                                 if summary else ""),
                va="center", fontsize=8)
    cmap = matplotlib.colors.ListedColormap(["white", "#f4b183", "#9dc3e6", "#2e75b6"])
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
    ax.set_yticks(range(len(budgets)), [f"budget {b}" for b in budgets])
    ax.set_xticks([0, len(history)], ["system", "current input"])
    ax.set_xlabel("message (oldest to newest)")
    ax.set_xlim(-0.5, len(history) + 9)
    ax.set_title("kept verbatim (blue: recent turns, dark: system and input) or folded into the summary (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def strategies_figure(path: Path, lengths=(64, 128, 256, 512, 1024)) -> None:
    import mlx.core as mx

    from longctx.mlx import LongContextQwen3
    from longctx.models import mlx_qwen3
    model = mlx_qwen3(0)
    strategies = {"full": {}, "sliding": {"window_size": 128},
                  "hierarchical": {"levels": [32, 128], "dilations": [1, 4]},
                  "streaming": {"sink_tokens": 4, "window": 124},
                  "compressed": {"compression_ratio": 0.75, "method": "knorm"}}
    ids = np.random.default_rng(0).integers(0, 256, max(lengths)).tolist()
    full = np.array(model(mx.array(ids)[None])[0])
    fig, (ax_h, ax_e) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, options in strategies.items():
        wrapper = LongContextQwen3(model, name, chunk_size=64, **options)
        held, err = [], []
        for n in lengths:
            out = np.array(wrapper.process_long_sequence(ids[:n])[0])
            cache = wrapper.cache[0]
            held.append(cache.size())
            err.append(max(np.abs(out - full[:n]).max(), 1e-7))
        ax_h.plot(lengths, held, marker="o", label=name)
        ax_e.plot(lengths, err, marker="o", label=name)
    ax_h.set_xlabel("input tokens")
    ax_h.set_ylabel("cache entries held (layer 0)")
    ax_h.set_title("memory: windows stop, compression keeps 1/4")
    ax_h.legend(fontsize=8)
    ax_e.set_xlabel("input tokens")
    ax_e.set_ylabel("max |logits - full model's|")
    ax_e.set_yscale("log")
    ax_e.set_title("exact while the input fits the window (128)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rope_factors_figure(path: Path, factor: float = 4.0, head_dim: int = 32, base: float = 10_000.0,
                        T0: int = 512) -> None:
    """Task 9: every method as LongRoPE's per-pair rescale factors (the shipped model's head_dim and
    base, 4x), YaRN exact against the linear blend of factors, and the searched factors if the book
    has them (book/src/figures/extension/longrope.json, written by the chapter's command)."""
    import json

    from longctx.techniques.rope import check_rope_scaling
    from longctx.testing.oracles import rope_frequencies
    theta = rope_frequencies({"rope_type": "default"}, head_dim, base)[0]

    def factors(scaling):
        return theta / rope_frequencies(check_rope_scaling(scaling, head_dim), head_dim, base, 4 * T0)[0]
    pairs = np.arange(head_dim // 2)
    yarn = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T0}
    exact = factors(yarn)
    ramp = (1 - 1 / exact) / (1 - 1 / factor)  # YaRN's ramp r_i: 0 keeps a pair, 1 divides it by s
    curves = {"PI (linear)": factors({"rope_type": "linear", "factor": factor}),
              "NTK-aware (base x s^(D/(D-2)))": (base * factor ** (head_dim / (head_dim - 2))) ** (2 * pairs / head_dim)
              / base ** (2 * pairs / head_dim),
              "YaRN (exact)": exact,
              "YaRN factors blended linearly": 1 + (factor - 1) * ramp,
              "Llama 3 (low 1, high 4)": factors({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": T0})}
    searched = path.parent / "extension" / "longrope.json"
    if searched.exists():
        curves["LongRoPE, searched"] = np.array(json.loads(searched.read_text())["rope_scaling"]["long_factor"])
    wavelength = 2 * np.pi / theta
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, f in curves.items():
        ax.plot(pairs, f, marker=".", label=name, ls="--" if "blended" in name else "-")
    ax.set_xlabel("rotated pair i (fast -> slow)")
    ax.set_ylabel("rescale factor lambda_i = theta_i / theta'_i")
    ax.set_title(f"{factor:g}x from {T0} tokens, head_dim {head_dim}, base {base:g}")
    ax.legend(fontsize=7)
    ax2.plot(pairs, wavelength, marker=".", color="k")
    ax2.axhline(T0, color="gray", ls=":", label=f"training length {T0}")
    ax2.axhline(factor * T0, color="gray", ls="--", label=f"target {factor * T0:g}")
    ax2.set_yscale("log")
    ax2.set_xlabel("rotated pair i")
    ax2.set_ylabel("wavelength 2 pi / theta_i (tokens)")
    ax2.set_title("pairs slower than the training length never turned fully")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid(ax, image, title, cmap="Blues", vmax=1.4):
    ax.imshow(image, cmap=cmap, vmin=0, vmax=vmax, aspect="equal")
    ax.set_xticks([x - 0.5 for x in range(image.shape[1] + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(image.shape[0] + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(labelsize=6, which="both", length=0)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(title, fontsize=9)


def sparse_figure(path: Path, L: int = 32, window: int = 6, globals_=(0, 13)) -> None:
    from longctx.mlx.sparse import bigbird_random_blocks
    from longctx.testing.oracles import bigbird_counts, longformer_mask
    n, b, r = 8, 4, 1
    blocks = bigbird_random_blocks(n, r, 0)
    zeros = np.zeros((1, n, r), int)
    zeros[:, [0, n - 1]] = -1
    panels = [(longformer_mask(L, L, window, globals_), f"Longformer, window {window}, globals {globals_}", 1.4),
              (longformer_mask(L, L, window, globals_, True), "Longformer, causal", 1.4),
              (bigbird_counts(1, n, b, blocks)[0], f"BigBird, b = {b}, r = {r} random (seed 0)", 2.4),
              (bigbird_counts(1, n, b, zeros)[0], "BigBird in HF's eval mode: block 0 counted 1 + r", 2.4)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for ax, (image, title, vmax) in zip(axes, panels):
        _grid(ax, image, title, vmax=vmax)
    fig.suptitle("Which keys each query sees (darker: counted twice in the softmax)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def linear_figure(path: Path, L: int = 16, chunk: int = 4) -> None:
    import mlx.core as mx

    from longctx.mlx import linear
    from longctx.testing.oracles import linear_attention
    source = np.zeros((L, L))
    for i in range(L):
        start = (i // chunk) * chunk
        source[i, :start] = 1  # read from the state S, z
        source[i, start:i + 1] = 2  # the masked product inside the chunk
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    _grid(axes[0], source, f"chunk {chunk}: light = the state before the chunk, dark = inside it", vmax=2.4)
    q, k, v = make_qkv(0, 1, 2, 2, 256, 256, 16)
    want = linear_attention(q, k, v)[0]
    xs = [mx.array(x.astype(np.float32)) for x in (q, k, v)]
    state = linear.empty_state(1, 2, 16, 16)
    forms = {"quadratic": linear.linear_attention_quadratic(*xs),
             "chunked (64)": linear.linear_attention_chunked(*xs, state, 64)[0],
             "recurrent": linear.linear_attention_recurrent(*xs, state)[0]}
    for name, out in forms.items():
        err = np.abs(np.array(out, dtype=np.float64) - want).max(axis=(0, 1, 3))
        axes[1].semilogy(np.maximum(err, 1e-12), label=name, linewidth=1)
    axes[1].set_xlabel("position")
    axes[1].set_ylabel("max |out - float64 oracle|")
    axes[1].set_title("three forms, one result (float32, L = 256)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (("sliding-mask.png", sliding_mask_figure), ("dilated-pattern.png", dilated_figure),
                       ("ring-schedule.png", ring_figure), ("compression-survivors.png", compression_figure),
                       ("attention-sinks.png", sinks_figure), ("adaptive-context.png", adaptive_figure),
                       ("qwen3-strategies.png", strategies_figure), ("rope-factors.png", rope_factors_figure),
                       ("sparse-patterns.png", sparse_figure), ("linear-chunks.png", linear_figure)):
        draw(OUT / name)
        print(f"wrote {OUT / name}")
