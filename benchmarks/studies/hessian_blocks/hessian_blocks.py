"""Hessian heatmaps of the Adam-mini paper's Figures 3 and 7, recomputed exactly.

    python benchmarks/studies/hessian_blocks/hessian_blocks.py                  # results/paper-sizes

Transformer (Figure 7): a one-layer GPT-2 with the paper's sizes (width 16, 4 heads, MLP width
32), trained with AdamW on the built-in corpus; at initialisation and after ``--steps`` steps the
exact Hessian of each of query, key, value, attention output and the two MLP weights (each its
own principal block, by `blockopt.hessian.hessian_block`) on one fixed validation batch, drawn as
|H|, and measured by `blockopt.audit` (every column: exact masses). MLP (Figure 3): the paper's
one-hidden-layer tanh network (input 64, width 16) on its two-Gaussian-clusters data, trained with
Adam at LR 1e-4; the Hessian of all its weights, ordered neuron by neuron (w_i, then v_i), at
steps 0, 1 and 500.

Writes PNGs and result.json (`blockopt.bench.write_result`) to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import blockopt
from blockopt.bench import GPT2Config, build_model, demo_data, environment, write_result
from blockopt.hessian import hessian_block

HERE = Path(__file__).resolve().parent
TENSORS = {  # panel title -> parameter of the one-layer GPT-2
    "query": "layers.0.attn.q_proj.weight",
    "key": "layers.0.attn.k_proj.weight",
    "value": "layers.0.attn.v_proj.weight",
    "attn.proj": "layers.0.attn.o_proj.weight",
    "mlp.fc_1": "layers.0.mlp.fc_in.weight",
    "mlp.proj": "layers.0.mlp.fc_out.weight",
}


def batches(ids: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        window = torch.stack([ids[s : s + seq + 1] for s in starts.tolist()]).long()
        yield window[:, :-1], window[:, 1:]


def transformer(args) -> dict:
    config = GPT2Config(vocab_size=args.vocab, dim=16, n_layers=1, n_heads=4, mlp_hidden=32, max_seq_len=args.seq)
    model = build_model(config, seed=args.seed)
    _, splits = demo_data(args.vocab, max_bytes=args.max_bytes)
    fixed = next(batches(splits.val, args.batch, args.seq, torch.Generator().manual_seed(1)))
    train = batches(splits.train, args.batch, args.seq, torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    out, step = {}, 0
    for checkpoint in (0, args.steps):
        while step < checkpoint:
            loss = model(*next(train))[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        model.eval()
        with torch.no_grad():
            val_loss = model(*fixed)[1].item()
        loss_fn = lambda: model(*fixed)[1]  # noqa: E731
        hessians = {title: hessian_block(model, loss_fn, name) for title, name in TENSORS.items()}
        report = blockopt.audit(model, fixed, names=list(TENSORS.values()), samples=10**6)
        model.train()
        out[step] = dict(val_loss=val_loss, hessians=hessians, report=report)
    return dict(config=config, checkpoints=out)


class OneHidden(nn.Module):
    """f(x) = sum_i v_i tanh(w_i . x): the network of the paper's Figure 3 (no biases)."""

    def __init__(self, d_in: int = 64, width: int = 16):
        super().__init__()
        self.w = nn.Linear(d_in, width, bias=False)
        self.v = nn.Linear(width, 1, bias=False)

    def forward(self, x):
        return self.v(torch.tanh(self.w(x))).squeeze(-1)


def mlp(args) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    # the paper's data: two classes, each 50 points around a uniform [0, 10)^64 centre with noise 0.5
    centres = torch.rand(2, 64, generator=generator) * 10
    x = torch.cat([centres[c] + 0.5 * torch.randn(50, 64, generator=generator) for c in range(2)])
    y = torch.cat([torch.zeros(50), torch.ones(50)])
    torch.manual_seed(args.seed)
    model = OneHidden()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = lambda: F.binary_cross_entropy_with_logits(model(x), y)  # noqa: E731
    out, step = {}, 0
    for checkpoint in (0, 1, args.mlp_steps):
        while step < checkpoint:
            optimizer.zero_grad()
            loss_fn().backward()
            optimizer.step()
            step += 1
        h = hessian_block(model, loss_fn, ["w.weight", "v.weight"])
        # neuron by neuron: w_i's 64 entries, then v_i
        order = torch.cat([torch.cat([torch.arange(i * 64, (i + 1) * 64), torch.tensor([1024 + i])]) for i in range(16)])
        h = h[order][:, order]
        neuron = torch.arange(16).repeat_interleave(65)
        same = neuron.view(-1, 1) == neuron.view(1, -1)
        with torch.no_grad():
            accuracy = ((model(x) > 0).float() == y).float().mean().item()
        out[step] = dict(hessian=h, neuron_mass=((h.square() * same).sum() / h.square().sum()).item(),
                         loss=loss_fn().item(), accuracy=accuracy)
    return out


def heatmap(ax, h: torch.Tensor, title: str, ticks: int | None = None) -> None:
    """|H| on a linear scale clipped at its 99.5th percentile (a few huge diagonal entries would
    otherwise hide everything else)."""
    a = h.abs().float()
    top = torch.quantile(a.flatten()[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[:200_000]], 0.995)
    ax.imshow(a.clamp(max=top.item()).numpy(), cmap="viridis", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    if ticks:
        positions = list(range(0, h.shape[0] + 1, ticks))
        ax.set_xticks([p - 0.5 for p in positions], [str(p) for p in positions], fontsize=6)
        ax.set_yticks([p - 0.5 for p in positions], [str(p) for p in positions], fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])


def plot(result_t: dict, result_m: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for step, point in result_t["checkpoints"].items():
        fig, axes = plt.subplots(2, 3, figsize=(11, 7.5))
        for ax, (title, h) in zip(axes.flat, point["hessians"].items()):
            # per-head boundaries (64 entries = 4 rows of 16 inputs) for q/k/v, per-neuron ones beyond that are too dense
            heatmap(ax, h, f"{title} ({h.shape[0]}x{h.shape[0]})", ticks=64 if title in ("query", "key", "value") else None)
        fig.suptitle(f"one-layer GPT-2 (width 16, 4 heads), |H| per weight, step {step} (val loss {point['val_loss']:.2f})")
        fig.tight_layout()
        name = f"transformer_step{step}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    fig, axes = plt.subplots(1, len(result_m), figsize=(4.2 * len(result_m), 4.4))
    for ax, (step, point) in zip(axes, result_m.items()):
        heatmap(ax, point["hessian"], f"step {step}: loss {point['loss']:.3f}, acc {point['accuracy']:.2f}\n"
                f"in per-neuron blocks: {point['neuron_mass']:.3f}", ticks=65 * 4)
    fig.suptitle("1-hidden-layer tanh MLP (64 -> 16 -> 1), |H| of all weights, neuron by neuron (w_i, v_i)")
    fig.tight_layout()
    fig.savefig(out / "mlp.png", dpi=110)
    plt.close(fig)
    return files + ["mlp.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary of the built-in corpus")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="sequences per training batch and in the measured batch")
    parser.add_argument("--steps", type=int, default=500, help="AdamW steps before the second measurement")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mlp-steps", type=int, default=500)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "paper-sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    started = time.perf_counter()
    result_t = transformer(args)
    result_m = mlp(args)
    args.out.mkdir(parents=True, exist_ok=True)
    files = plot(result_t, result_m, args.out)
    results = {
        "transformer": {
            str(step): {
                "val_loss": point["val_loss"],
                "value_over_query_mean_abs": (point["hessians"]["value"].abs().mean()
                                              / point["hessians"]["query"].abs().mean()).item(),
                "audit": point["report"].to_dict()["tensors"],
                "audit_table": point["report"].table(),
            }
            for step, point in result_t["checkpoints"].items()
        },
        "mlp": {str(step): {k: v for k, v in point.items() if k != "hessian"} for step, point in result_m.items()},
        "figures": files,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_result(args.out, name="hessian_blocks", settings=settings, results=results, environment=env)
    for step, point in result_t["checkpoints"].items():
        print(f"transformer, step {step} (val loss {point['val_loss']:.3f}):\n{point['report'].table()}\n")
    for step, point in result_m.items():
        print(f"mlp step {step}: in per-neuron blocks {point['neuron_mass']:.3f}, accuracy {point['accuracy']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
