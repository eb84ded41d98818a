"""`ehrfm bench dense`: forward + backward time of L_spec + L_orth, eager vs torch.compile vs Triton.

    ehrfm bench dense -- --sizes 256x256,1024x4096 --repeats 5

Times are medians in milliseconds of `(spec + orth).backward()` on a fresh fp32 Z (N, d) with
requires_grad, after warm-up (torch.compile's first call is reported separately as compile_s). The subspace
term is left out: it is an eigendecomposition (torch.linalg.eigh) in every implementation. Triton runs only on
CUDA; on CPU its entries say so (the interpreter is a correctness tool, its timings are meaningless).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ehrfm.config_flags import comma_list

from .reference import orthogonality_loss, spectral_loss

GRID = [(n, d) for n in (256, 1024, 4096) for d in (256, 1024, 4096)]


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in comma_list(text):
        n, d = item.lower().split("x")
        sizes.append((int(n), int(d)))
    return sizes


def _eager(z: torch.Tensor) -> torch.Tensor:
    return spectral_loss(z) + orthogonality_loss(z)


def _triton(z: torch.Tensor) -> torch.Tensor:
    from .triton_kernel import spec_orth_triton

    spec, orth = spec_orth_triton(z)
    return spec + orth


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step(fn, z0: torch.Tensor) -> float:
    z = z0.detach().clone().requires_grad_()
    _sync(z.device)
    start = time.perf_counter()
    fn(z).backward()
    _sync(z.device)
    return (time.perf_counter() - start) * 1e3


def _measure(fn, z0: torch.Tensor, warmup: int, repeats: int) -> dict:
    first = _time_step(fn, z0)
    for _ in range(max(warmup - 1, 0)):
        _time_step(fn, z0)
    times = [_time_step(fn, z0) for _ in range(repeats)]
    out = {"ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), "first_call_ms": round(first, 1)}
    if z0.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(z0.device)
        _time_step(fn, z0)
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(z0.device) / 2**20, 1)
    return out


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="ehrfm bench dense", description=__doc__)
    p.add_argument("--sizes", type=_parse_sizes, default=GRID, help="NxD,NxD,... (default: the 3 x 3 grid)")
    p.add_argument("--impls", default="eager,compile,triton", help="subset of eager,compile,triton")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = comma_list(args.impls)
    rows = []
    for n, d in args.sizes:
        # A fresh compiled function per shape: recompilations would otherwise hit dynamo's cache limit and
        # silently fall back to eager.
        fns = {"eager": _eager, "triton": _triton}
        if "compile" in impls:
            torch._dynamo.reset()
            fns["compile"] = torch.compile(_eager, dynamic=False)
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        z0 = torch.randn(n, d, generator=g).to(device)
        row = {"N": n, "d": d, "gram": "N x N" if n < d else "d x d"}
        for impl in impls:
            if impl == "triton" and device.type != "cuda":
                row[impl] = {"skipped": "Triton needs CUDA; CPU uses the reference"}
                continue
            try:
                row[impl] = _measure(fns[impl], z0, args.warmup, args.repeats)
            except Exception as err:  # noqa: BLE001 - record the failure of one cell, keep the grid going
                row[impl] = {"error": f"{type(err).__name__}: {err}"[:300]}
        if "ms" in row.get("eager", {}):
            for impl in impls:
                if impl != "eager" and "ms" in row.get(impl, {}):
                    row[impl]["speedup_vs_eager"] = round(row["eager"]["ms"] / row[impl]["ms"], 2)
        rows.append(row)
    return {
        "what": "median ms of forward + backward of L_spec + L_orth, fp32",
        "device": device.type,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "triton_status": (
            "measured"
            if device.type == "cuda" and "triton" in impls
            else "not measured: Triton kernels need a CUDA device"
        ),
        "rows": rows,
    }
