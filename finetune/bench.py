"""`ehrfm bench generate`: rollout speed of zero-shot forecasting per backbone, cached vs uncached.

    ehrfm bench generate -- [--archs llama,mamba,mamba2] [--size tiny] [--history 512] [--new 64]
                            [--examples 8] [--samples 8] [--vocab 2000] [--uncached-new 8]

A freshly initialised model of each backbone continues random histories of ``--history`` tokens: the cached
path is ``finetune.rollout.rollout`` (left-padded prefill, then one token per step through the KV cache or
the recurrent state); the uncached path recomputes the whole sequence for every new token, as a model
without a cache would. Every rollout runs its full ``--new`` budget (no outcome ends it early), so the
numbers are decoding speed. Reports rollouts/s and generated tokens/s of each path and their ratio
(``cached_speedup``, per generated token).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ehrfm.config_flags import comma_list


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    """Synthetic patient histories of the given lengths (code ids drawn uniformly above the special tokens,
    visits of 8 tokens, time and age rising over the history): rollout inputs for benchmarks and checks."""
    from ehrfm.data_shards.schema import SPECIAL_TOKENS, TokenType

    rng = np.random.default_rng(seed)
    prompts = []
    for length in lengths:
        ids = rng.integers(len(SPECIAL_TOKENS), vocab, size=length)
        visits = np.repeat(np.arange(1, length // 8 + 2), 8)[:length]
        prompts.append(
            {
                "input_ids": ids,
                "type_ids": np.full(length, int(TokenType.DX)),
                "ages": np.linspace(60.0, 61.0, length, dtype=np.float32),
                "times": np.linspace(2800.0, 2852.0, length, dtype=np.float32),
                "visit_segments": 2 - visits % 2,
                "visit_orders": visits,
            }
        )
    return prompts


@torch.no_grad()
def _uncached(model, prompts: list[dict], samples: int, new_tokens: int, generator: torch.Generator) -> int:
    """Greedy-free sampling by full recomputation: every step runs the model over the whole sequence."""
    from .rollout import left_pad

    batch = left_pad([p for p in prompts for _ in range(samples)], next(model.parameters()).device)
    generated = 0
    for _ in range(new_tokens):
        logits = model(**batch, use_cache=False).logits[:, -1].float()
        token = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator).to(logits.device)
        batch = {k: torch.cat([v, token if k == "input_ids" else v[:, -1:]], dim=1) for k, v in batch.items()}
        generated += len(token)
    return generated


def run(argv: list[str]) -> dict:
    from ehrfm.data_shards.schema import SPECIAL_TOKENS
    from ehrfm.devices import compute_device
    from ehrfm.pretrain.models import build_model

    from .rollout import OutcomeRule, SamplingConfig, TokenTable, rollout

    p = argparse.ArgumentParser(prog="ehrfm bench generate")
    p.add_argument("--archs", default="llama,mamba,mamba2")
    p.add_argument("--size", default="tiny")
    p.add_argument("--history", type=int, default=512, help="history tokens per prompt")
    p.add_argument("--new", type=int, default=64, help="tokens generated per rollout (cached path)")
    p.add_argument("--uncached-new", type=int, default=8, help="tokens per rollout on the slow uncached path")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = compute_device()
    tokens = list(SPECIAL_TOKENS) + [f"CODE/{i}" for i in range(args.vocab - len(SPECIAL_TOKENS))]
    table = TokenTable(tokens, [], {}).to(device)
    never = OutcomeRule(hit_ids=[], window_days=float("inf"))
    prompts = random_prompts([args.history] * args.examples, args.vocab, args.seed)
    cfg = SamplingConfig(samples=args.samples, max_new_tokens=args.new, seed=args.seed)
    results = {}
    for arch in comma_list(args.archs):
        torch.manual_seed(args.seed)
        model = build_model(arch, args.size, vocab_size=args.vocab).to(device).eval()
        rows = args.examples * args.samples
        generator = torch.Generator().manual_seed(args.seed)
        rollout(model, prompts[:1], [never], table, SamplingConfig(samples=1, max_new_tokens=2), generator)  # warm-up
        started = time.perf_counter()
        cached = rollout(model, prompts, [never] * len(prompts), table, cfg, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        cached_s = time.perf_counter() - started
        started = time.perf_counter()
        slow_tokens = _uncached(model, prompts, args.samples, args.uncached_new, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        uncached_s = time.perf_counter() - started
        cached_tps, uncached_tps = cached.tokens / cached_s, slow_tokens / uncached_s
        results[arch] = {
            "rows": rows,
            "cached": {
                "seconds": round(cached_s, 3),
                "tokens": cached.tokens,
                "tokens_per_s": round(cached_tps, 1),
                "rollouts_per_s": round(rows / cached_s, 2),
            },
            "uncached": {
                "seconds": round(uncached_s, 3),
                "tokens": slow_tokens,
                "tokens_per_s": round(uncached_tps, 1),
                "rollouts_per_s_equivalent": round(rows * args.uncached_new / args.new / uncached_s, 2),
            },
            "cached_speedup": round(cached_tps / uncached_tps, 2),
        }
    return {
        "device": str(device),
        "size": args.size,
        "history": args.history,
        "new_tokens": args.new,
        "examples": args.examples,
        "samples": args.samples,
        "results": results,
        "goal": "cached >= 10x uncached per generated token at 512 history tokens",
    }
