"""A simplified picture of a forja model, drawn from its own ModelConfig.

Token embedding, one transformer block shown once with "×N" and its inside (norm, grouped-query
attention, norm, SwiGLU MLP), the final norm and the output head, each with its parameter count
computed from the config (model/gpt.py's layers, counted by hand; the tests check the sum against
the real model). matplotlib's Agg backend, so it draws on a machine without a display.
"""
from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig


def block_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one transformer block, part by part (gpt.Block: RMSNorm weights, fused qkv and
    o_proj without bias, SwiGLU's fused gate/up and down without bias)."""
    d, hd = cfg.n_embd, cfg.head_dim
    return {"attention norm": d, "attention": d * (cfg.n_head + 2 * cfg.n_kv_head) * hd + d * d,
            "MLP norm": d, "MLP": d * 2 * cfg.mlp_hidden + cfg.mlp_hidden * d}


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of each part of the model; they add up to the model's total (a tied head adds none:
    it is the embedding matrix)."""
    return {"embedding": cfg.vocab_size * cfg.n_embd, "blocks": cfg.n_layer * sum(block_counts(cfg).values()),
            "final norm": cfg.n_embd, "output head": 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd}


def human(n: int) -> str:
    """1234567 -> '1.23M': counts short enough for a box."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def draw(cfg: ModelConfig, path: Path, title: str = "forja model") -> Path:
    """Render the diagram of cfg's model as a PNG at path (bottom to top: tokens in, logits out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    parts, inner = parameter_counts(cfg), block_counts(cfg)
    total = sum(parts.values())
    kv = "" if cfg.n_kv_head == cfg.n_head else f" ({cfg.n_head // cfg.n_kv_head} share each)"
    head = ("output head (tied to the embedding)" if cfg.tie_embeddings
            else f"output head  {cfg.n_embd} → {cfg.vocab_size:,}")
    # (label, parameters, y, x, width, colour); the block's inside sits in the frame drawn below
    boxes = [
        (f"token embedding  {cfg.vocab_size:,} × {cfg.n_embd}", parts["embedding"], 1.0, 0.5, 5.0, "#dfe7fd"),
        ("RMSNorm", inner["attention norm"], 2.6, 1.0, 4.0, "#eeeeee"),
        (f"attention (RoPE), head dim {cfg.head_dim}\n{cfg.n_head} query heads, {cfg.n_kv_head} KV heads{kv}",
         inner["attention"], 3.6, 1.0, 4.0, "#fde2e4"),
        ("RMSNorm", inner["MLP norm"], 4.8, 1.0, 4.0, "#eeeeee"),
        (f"SwiGLU MLP  {cfg.n_embd} → {cfg.mlp_hidden} → {cfg.n_embd}", inner["MLP"], 5.8, 1.0, 4.0, "#e2ece9"),
        ("final RMSNorm", parts["final norm"], 7.6, 0.5, 5.0, "#eeeeee"),
        (head, parts["output head"], 8.6, 0.5, 5.0, "#fff1c1"),
    ]
    fig, ax = plt.subplots(figsize=(9, 8.5))
    ax.set(xlim=(0, 9), ylim=(-0.2, 10.2))
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0.7, 2.2), 4.6, 4.6, boxstyle="round,pad=0.05", fill=False, lw=1.5, ls="--"))
    ax.text(5.45, 6.55, f"× {cfg.n_layer}", fontsize=16, weight="bold")
    ax.text(5.45, 2.3, f"{cfg.n_layer} blocks: {human(parts['blocks'])}", fontsize=9, color="#444")
    for label, n, y, x, w, colour in boxes:
        ax.add_patch(FancyBboxPatch((x, y), w, 0.6, boxstyle="round,pad=0.05", fc=colour, ec="#333"))
        ax.text(x + w / 2, y + 0.3, label, ha="center", va="center", fontsize=8.5 if "\n" in label else 9)
        per_block = " /block" if x > 0.5 else ""
        ax.text(7.6, y + 0.3, f"{n:,}{per_block}", ha="right", va="center", fontsize=9, family="monospace")
    arrow = dict(arrowstyle="->", color="#333")
    for y0, y1 in ((0.2, 1.0), (1.65, 2.6), (3.25, 3.6), (4.25, 4.8), (5.45, 5.8), (6.45, 7.6), (8.25, 8.6), (9.25, 9.8)):
        ax.annotate("", (3.0, y1), (3.0, y0), arrowprops=arrow)
    ax.text(3.0, 0.05, f"token ids (context {cfg.block_size:,})", ha="center", va="top", fontsize=9)
    ax.text(3.0, 9.95, f"logits over {cfg.vocab_size:,} tokens", ha="center", va="bottom", fontsize=9)
    for y in (4.5, 6.55):  # the residual additions around attention and MLP
        ax.text(3.1, y, "+ residual", fontsize=8, color="#666", va="center")
    ax.text(7.6, 9.6, "parameters", ha="right", fontsize=9, weight="bold")
    ax.text(9.0, 0.0, f"total {total:,} ({human(total)})\nd_model {cfg.n_embd}, {cfg.n_layer} layers",
            ha="right", va="bottom", fontsize=10, weight="bold")
    ax.set_title(title)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
