"""`blockopt.audit` on the built-in Llama and GPT-2 and on small configs of other transformers families.

    python benchmarks/studies/audit/audit.py                       # every model -> results/init
    python benchmarks/studies/audit/audit.py --models demo --out benchmarks/studies/audit/results/demo-timing

Each model is built from its config (scaled down; nothing is downloaded) at its initialisation,
partitioned by `blockopt.partition`, and audited on one batch of random token ids exactly as
``blockopt audit MODEL`` does (same batch, samples and seed). Writes every table (``<model>.txt``)
and result.json (`blockopt.bench.write_result`: the reports, seconds per model, the machine's
load) to ``--out``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import blockopt
from blockopt.bench import ModelSpec, environment, write_result

HERE = Path(__file__).resolve().parent
SMALL = dict(vocab_size=512)
MODELS = {
    # built-in
    "llama-tiny": ("llama-tiny", {}),
    "gpt2-tiny": ("gpt2-tiny", {}),
    "demo": ("demo", {}),  # the ~1M-parameter Llama of `blockopt demo`: the timing target
    # transformers families, scaled down
    "hf-gpt2": ("hf:gpt2", dict(SMALL, n_layer=2, n_embd=64, n_head=4, n_positions=64)),
    "hf-gpt_neox": ("hf:gpt_neox", dict(SMALL, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                        intermediate_size=256, max_position_embeddings=64)),
    "hf-opt": ("hf:opt", dict(SMALL, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=256,
                              word_embed_proj_dim=64, max_position_embeddings=64)),
    "hf-phi3": ("hf:phi3", dict(SMALL, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                num_hidden_layers=2, intermediate_size=128, max_position_embeddings=64,
                                pad_token_id=0)),
    "hf-qwen2": ("hf:qwen2", dict(SMALL, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=2, intermediate_size=128, max_position_embeddings=64)),
}


def audit_model(source: str, overrides: dict, *, batch: int, seq: int, samples: int, seed: int):
    spec = ModelSpec.parse(source, overrides)
    model = spec.build(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blockopt.PartitionWarning)
        plan = blockopt.partition(model)
    ids = torch.randint(0, spec.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    started = time.perf_counter()
    report = blockopt.audit(model, (ids[:, :-1], ids[:, 1:]), plan, samples=samples, seed=seed)
    return spec, model, plan, report, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=2, help="sequences (as `blockopt audit`'s default)")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence (as `blockopt audit`'s default)")
    parser.add_argument("--samples", type=int, default=32, help="Hessian columns per tensor (as the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "init")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for key in args.models:
        source, overrides = MODELS[key]
        spec, model, plan, report, seconds = audit_model(source, overrides, batch=args.batch, seq=args.seq,
                                                         samples=args.samples, seed=args.seed)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        header = (f"{key}: {source} {overrides or ''} -> {type(model).__name__}, {n_params:,} parameters; "
                  f"{args.batch} x {args.seq} random token ids; {seconds:.0f} s")
        (args.out / f"{key}.txt").write_text(f"{header}\n\n{report}\n")
        print(f"{header}\n{report}\n", flush=True)
        results[key] = {"source": source, "overrides": overrides, "n_params": n_params, "seconds": round(seconds, 1),
                        "plan_warnings": list(plan.warnings), **report.to_dict()}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_result(args.out, name="audit", settings=settings, results=results, environment=env)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
