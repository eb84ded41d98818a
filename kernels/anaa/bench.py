"""`ehrfm bench anaa`: time and peak memory of ANAA paths, one fresh subprocess per (path, seq) config.

CPU: naive paper operator (``impl="reference"``) vs the factorized path; CUDA: the fused Triton kernel vs plain
SDPA attention (the cost floor: ANAA's extra work over attention is O(n d) plus one noise accumulator, so the
expected GPU result is Triton within a small factor of SDPA and far below the naive path's n^2 memory).
Each measurement is one training step (forward with noise + backward of a fixed linear loss), fp32, median over
``--repeats`` after one warm-up. Peak memory: on CPU the subprocess's peak RSS (VmHWM, reset after a warm-up
step, with glibc's mmap threshold fixed at 128 KiB so freed tensors leave the process) minus its RSS before the
measured step; on CUDA ``max_memory_allocated`` minus the allocation before the step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from ehrfm.config_flags import comma_ints, comma_list


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ehrfm bench anaa", description=__doc__)
    p.add_argument(
        "--sizes",
        type=comma_ints,
        default=[256, 1024, 2048, 4096],
        help="comma-separated sequence lengths",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--sigma-eh", type=float, default=1.0)
    p.add_argument("--variant", choices=["symmetric", "causal"], default="symmetric")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (CPU)")
    p.add_argument(
        "--impls", default=None, help="comma-separated; default reference,factorized (CPU) or triton,sdpa (CUDA)"
    )
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SEQ"), help=argparse.SUPPRESS)
    return p


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the VmHWM peak-RSS counter (Linux >= 4.0)
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    impl, n = args.worker[0], int(args.worker[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    from ehrfm.kernels import anaa_attention

    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v, w = (torch.randn(shape, generator=g, device=dev) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        if impl == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.variant == "causal")
        else:
            out = anaa_attention(
                q, k, v, sigma_eh=args.sigma_eh, variant=args.variant, training=True, seed=1, impl=impl
            )
        (out * w).sum().backward()
        for t in (q, k, v):
            t.grad = None
        if dev == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: lazy library initialisation is not the operator's memory
    gc.collect()
    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    step()
    peak = (torch.cuda.max_memory_allocated() if dev == "cuda" else _peak_rss_bytes()) - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "seq": n, "time_s": statistics.median(times), "peak_mb": max(peak, 0) / 2**20, "device": dev}


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns {"config", "results": [...], "ratios": {seq: {...}}}."""
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker(args)
    import torch

    cuda = torch.cuda.is_available()
    impls = comma_list(args.impls) or (["triton", "sdpa"] if cuda else ["reference", "factorized"])
    passthrough = [
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
        "--sigma-eh",
        str(args.sigma_eh),
        "--variant",
        args.variant,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("TRITON_INTERPRET", None)
    # memory run: large blocks via mmap so that freed tensors leave the process and RSS tracks live tensors;
    # timing run: default allocator (forced mmap adds page-fault time)
    env_mem = {**env, "MALLOC_MMAP_THRESHOLD_": "131072"}
    results = []
    for n in args.sizes:
        for impl in impls:
            cmd = [
                sys.executable,
                "-c",
                "import json,sys; from ehrfm.kernels.anaa.bench import run; print(json.dumps(run(sys.argv[1:])))",
                *passthrough,
                "--worker",
                impl,
                str(n),
            ]
            runs = [subprocess.run(cmd, capture_output=True, text=True, env=e) for e in (env, env_mem)]
            bad = [p for p in runs if p.returncode != 0]
            if bad:
                results.append({"impl": impl, "seq": n, "error": bad[0].stderr.strip().splitlines()[-1:]})
                continue
            timing, memory = (json.loads(p.stdout.strip().splitlines()[-1]) for p in runs)
            results.append({**timing, "peak_mb": memory["peak_mb"]})
    ratios = {}
    base, fast = impls[0], impls[-1]
    for n in args.sizes:
        a = next((r for r in results if r["seq"] == n and r["impl"] == base and "time_s" in r), None)
        b = next((r for r in results if r["seq"] == n and r["impl"] == fast and "time_s" in r), None)
        if a and b:
            ratios[n] = {
                f"speedup_{fast}_vs_{base}": a["time_s"] / b["time_s"],
                f"memory_ratio_{base}_over_{fast}": a["peak_mb"] / max(b["peak_mb"], 1e-3),
            }
    config = {k: v for k, v in vars(args).items() if k != "worker"}
    return {"config": config, "results": results, "ratios": ratios}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:]), indent=2))
