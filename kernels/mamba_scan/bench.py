"""`ehrfm bench mamba-scan`: forward+backward time of one Mamba v1 layer (mixer) with the fast scan vs HF's
reference path (``MambaMixer`` without mamba_ssm: sequential torch scan, autograd backward).

Both mixers share the same weights and input; the result also reports their largest output / gradient
difference so a speed-up can never come from computing something else.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ehrfm bench mamba-scan", description=__doc__)
    p.add_argument("--size", default="small", choices=["tiny", "small", "medium"], help="preset of 003 Table 5")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the fast path (median reported)")
    p.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the HF reference path")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _fwd_bwd(mixer, x, upstream):
    import torch

    mixer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    y = mixer(x)
    torch.autograd.backward(y, upstream)
    elapsed = time.perf_counter() - start
    grads = [x.grad] + [p.grad for p in mixer.parameters()]
    return elapsed, y.detach(), grads


def run(argv: list[str]) -> dict:
    import torch
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from ehrfm.pretrain.models.configuration import EhrMambaConfig
    from ehrfm.pretrain.models.mamba import EhrMambaMixer

    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = EhrMambaConfig.from_preset(args.size)
    fast = EhrMambaMixer(config, layer_idx=0).train()
    reference = MambaMixer(config, layer_idx=0).train()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(args.batch, args.length, config.hidden_size)
    upstream = torch.randn(args.batch, args.length, config.hidden_size)

    _fwd_bwd(fast, x[:, :16], upstream[:, :16])  # warm-up (allocator, lazy imports)
    fast_times = []
    for _ in range(args.repeats):
        elapsed, y_fast, g_fast = _fwd_bwd(fast, x, upstream)
        fast_times.append(elapsed)
    ref_times = []
    for _ in range(args.ref_repeats):
        elapsed, y_ref, g_ref = _fwd_bwd(reference, x, upstream)
        ref_times.append(elapsed)
    fast_s, ref_s = statistics.median(fast_times), statistics.median(ref_times)
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(g_fast, g_ref))
    return {
        "size": args.size,
        "batch": args.batch,
        "length": args.length,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "state_size": config.state_size,
        "threads": torch.get_num_threads(),
        "fast_fwd_bwd_s": round(fast_s, 4),
        "fast_runs_s": [round(t, 4) for t in fast_times],
        "hf_reference_fwd_bwd_s": round(ref_s, 4),
        "speedup": round(ref_s / fast_s, 1),
        "goal_speedup": 20.0,
        "max_abs_output_diff": float((y_fast - y_ref).abs().max()),
        "max_abs_grad_diff": grad_diff,
    }
