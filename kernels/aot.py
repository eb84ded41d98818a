"""Ahead-of-time compilation of every ehrfm Triton kernel for NVIDIA GPUs, without a GPU.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which accepts constructs the GPU compiler rejects
(and says nothing about registers). Here each kernel is compiled the way a launch would compile it (same
constexprs, pointer dtypes per input dtype) for sm_80 (A100) and sm_90 (H100/H200) with Triton's bundled
``ptxas``; ``ptxas -v`` reports registers and spills per kernel. The test (``tests/kernels/test_triton_aot.py``)
requires every compile to succeed without spills.

Must run with ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` returns interpreted functions
that cannot be compiled. ``python -m ehrfm.kernels.aot [--json OUT]`` prints the register/spill table.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
from pathlib import Path

ARCHS = (80, 90)
# the most shared memory one block may use (bytes): A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB
SHARED_LIMIT = {80: 166912, 90: 232448}
HEAD_DIMS = (64, 128)
INPUT_DTYPES = ("fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One compile: a kernel, its argument types (pointer dtypes as Triton spells them) and constexprs."""

    kernel: str  # "module:function"
    variant: str  # what distinguishes this case (input dtype, head dim)
    types: dict  # argument name -> "*fp32" / "i32" / "fp32" ...; every other argument is a constexpr
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth of loops (Triton's default)


_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# ANAA kernel -> (arguments read in the operand dtype, other pointer arguments (fp32 or int32), scalars)
_ANAA_SIGNATURES = {
    "_anaa_fwd": (("Q", "K", "V"), ("YA", "R", "LSE"), ("n", "H", "d", "scale")),
    "_anaa_noise_fwd": (("V",), ("Z", "YZ"), ("seed", "n", "H", "d")),
    "_anaa_bwd_dkdv": (("Q", "K", "V", "DYA"), ("LSE", "DELTA", "DR", "R", "DK", "DV"), ("n", "H", "d", "scale")),
    "_anaa_noise_bwd_dv": (("DYZ",), ("Z", "DVZ"), ("seed", "n", "H", "d")),
    "_anaa_bwd_dq": (("Q", "K", "V", "DYA"), ("LSE", "DELTA", "DR", "R", "DQ"), ("n", "H", "d", "scale")),
}


def anaa_case(kernel: str, dtype: str, head_dim: int, tile: tuple[int, int, int, int]) -> KernelCase:
    """The launch of ANAA ``kernel`` on ``dtype`` inputs (``"fp32"``/``"bf16"``/``"fp16"``) at ``head_dim`` with
    ``tile`` = (BM, BN, num_warps, num_stages), as :mod:`ehrfm.kernels.anaa.triton_kernel` launches it on a GPU
    (causal, Philox noise)."""
    import torch

    from .anaa import tiles
    from .anaa.triton_kernel import dot_precision
    from .tuning import operand_dtype

    torch_dtype = getattr(torch, _TORCH_DTYPE[dtype])
    operand = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
        operand_dtype(torch_dtype, on_gpu=True)
    ]
    operands, others, scalars = _ANAA_SIGNATURES[kernel]
    types = {name: f"*{operand}" for name in operands}
    types |= {name: "*fp32" for name in others} | {"DOC": "*i32", "DSTART": "*i32", "DEND": "*i32"}
    types |= {name: "fp32" if name == "scale" else "i32" for name in scalars}
    bm, bn, warps, stages = tile
    constexprs = {
        "CAUSAL": True,
        "BM": bm,
        "BN": bn,
        "BD": tiles.block_d(head_dim),
        "PREC": dot_precision(torch_dtype, on_gpu=True),
    }
    if "noise" in kernel:
        constexprs["NOISE"] = 1
    variant = f"{dtype} inputs, head dim {head_dim}, {bm}x{bn} tile, {warps} warps, {stages} stages"
    return KernelCase(f"ehrfm.kernels.anaa.triton_kernel:{kernel}", variant, types, constexprs, warps, stages)


def _anaa_cases() -> list[KernelCase]:
    """Every autotuning candidate of every ANAA kernel (:data:`.anaa.tiles.GPU_TILES`), per input dtype and
    head dim, plus the tests' noise kernel."""
    import torch

    from .anaa import tiles

    cases = []
    for kernel in tiles.GPU_TILES:
        for d in HEAD_DIMS:
            for dtype in INPUT_DTYPES:
                for tile in tiles.gpu_candidates(kernel, getattr(torch, _TORCH_DTYPE[dtype]), d):
                    cases.append(anaa_case(kernel, dtype, d, tile))
    cases.append(
        KernelCase(
            "ehrfm.kernels.anaa.triton_kernel:_philox_noise_kernel",
            "tests' noise",
            {"Z": "*fp32", "seed": "i32", "n": "i32"},
            {"BM": 16, "BN": 16},
        )
    )
    return cases


def sweep_cases(dtypes=("bf16", "fp32"), sizes=(16, 32, 64, 128), warps=(4, 8), stages=(2,)) -> list[KernelCase]:
    """A grid of ANAA tiles to choose :data:`.anaa.tiles.GPU_TILES` from (``--sweep``; about 10 minutes)."""
    import itertools

    from .anaa import tiles

    return [
        anaa_case(kernel, dtype, d, (bm, bn, w, st))
        for kernel in tiles.GPU_TILES
        for dtype in dtypes
        for d in HEAD_DIMS
        for bm, bn, w, st in itertools.product(sizes, sizes, warps, stages)
    ]


def _dense_cases() -> list[KernelCase]:
    """The dense-loss kernels as a GPU launch compiles them: every autotuning candidate of the two dot kernels."""
    import torch

    from .dense.triton_kernel import BLOCK as block
    from .dense.triton_kernel import GRAM_TILES, MATMUL_TILES, dot_precision

    mod = "ehrfm.kernels.dense.triton_kernel"
    gpu_prec = dot_precision(torch.device("cuda"))
    cases = []
    for dtype in INPUT_DTYPES:
        z = f"*{dtype}"
        kind = "fp32" if dtype == "fp32" else "half"
        ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
        cases.append(
            KernelCase(
                f"{mod}:_col_stats_kernel",
                f"{dtype} embeddings",
                {
                    "Z": z,
                    "ZS": "*fp32",
                    "MEAN": "*fp32",
                    "RSTD": "*fp32",
                    "PART": "*fp32",
                    **ints("N", "D", "stride_zn", "stride_zd"),
                    "eps": "fp32",
                },
                {"BLOCK_N": block, "BLOCK_D": block},
            )
        )
        for warps, stages in GRAM_TILES[kind]:
            cases.append(
                KernelCase(
                    f"{mod}:_dual_gram_kernel",
                    f"{dtype} embeddings, {block}x{block} tile, {warps} warps, {stages} stages",
                    {
                        "A": z,
                        "B": "*fp32",
                        "PA": "*fp32",
                        "PB": "*fp32",
                        "PART": "*fp32",
                        **ints("M", "R", "stride_am", "stride_ar", "stride_bm", "stride_br"),
                    },
                    {"BLOCK_M": block, "BLOCK_R": block, "PREC": gpu_prec, "HALF_GRAM": kind == "half"},
                    warps,
                    stages,
                )
            )
        # n >= d branch: dZ = Z P, G = Zs Ps (L1 = Z in the input dtype)
        for block_d, warps, stages in MATMUL_TILES[kind]:
            cases.append(
                KernelCase(
                    f"{mod}:_dual_matmul_kernel",
                    f"{dtype} embeddings, {block}x{block_d} tile, {warps} warps, {stages} stages",
                    {
                        "L1": z,
                        "R1": "*fp32",
                        "L2": "*fp32",
                        "R2": "*fp32",
                        "Z": z,
                        "ZS": "*fp32",
                        "COEF": "*fp32",
                        "DZ": "*fp32",
                        "G": "*fp32",
                        "COLPART": "*fp32",
                        **ints(
                            "N",
                            "D",
                            "K",
                            "s_l1n",
                            "s_l1k",
                            "s_r1k",
                            "s_r1d",
                            "s_l2n",
                            "s_l2k",
                            "s_r2k",
                            "s_r2d",
                            "stride_zn",
                            "stride_zd",
                        ),
                    },
                    {"BLOCK_N": block, "BLOCK_D": block_d, "BLOCK_K": block, "PREC": gpu_prec},
                    warps,
                    stages,
                )
            )
    cases.append(
        KernelCase(
            f"{mod}:_orth_finish_kernel",
            "fp32 buffers",
            {"DZ": "*fp32", "G": "*fp32", "ZS": "*fp32", "RSTD": "*fp32", "COLSUM": "*fp32", "N": "i32", "D": "i32"},
            {"BLOCK_N": block, "BLOCK_D": block},
        )
    )
    return cases


def kernel_cases() -> list[KernelCase]:
    return _anaa_cases() + _dense_cases()


def compile_case(case: KernelCase, arch: int) -> dict:
    """Compile one case for ``sm_{arch}``; returns registers, spill bytes and shared memory (bytes).

    The numbers are those of the cubin Triton itself builds: Triton runs ``ptxas -v`` with its own flags (the
    register-allocation level among them) and prints that log when ``dump_ptxas_log`` is on; the compile skips
    Triton's cache so that the log is always there."""
    import contextlib
    import importlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, fn_name = case.kernel.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    if not hasattr(fn, "fn"):
        raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1; run the AOT compile without it")
    params = list(inspect.signature(fn.fn).parameters)
    signature = {p: case.types.get(p, "constexpr") for p in params}
    missing = [p for p in params if signature[p] == "constexpr" and p not in case.constexprs]
    if missing:
        raise ValueError(f"{case.kernel}: no type or constexpr for {missing}")
    constexprs = {(params.index(k),): v for k, v in case.constexprs.items()}
    ptxas_log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(ptxas_log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": case.num_warps, "num_stages": case.num_stages},
            )
        except Exception as error:
            raise RuntimeError(f"sm_{arch} compile failed on {case.kernel} ({case.variant}): {error}") from error
    info = ptxas_log.getvalue()
    if "Used " not in info:
        raise RuntimeError(f"{case.kernel} ({case.variant}) sm_{arch}: Triton printed no ptxas log")
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {
        "kernel": fn_name,
        "variant": case.variant,
        "arch": f"sm_{arch}",
        "registers": registers,
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
    }


def _try_compile(case: KernelCase, arch: int) -> dict:
    try:
        return compile_case(case, arch)
    except Exception as error:  # a sweep records tiles that do not compile and goes on
        name = case.kernel.split(":")[1]
        print(f"{name} ({case.variant}) sm_{arch}: {str(error).splitlines()[0][:200]}", file=sys.stderr)
        return {
            "kernel": name,
            "variant": case.variant,
            "arch": f"sm_{arch}",
            "registers": -1,
            "spill_stores": -1,
            "spill_loads": -1,
            "shared_bytes": -1,
            "num_warps": case.num_warps,
        }


def compile_all(archs=ARCHS, cases: list[KernelCase] | None = None, tolerate_errors: bool = False) -> list[dict]:
    """Compile ``cases`` (default: every shipped kernel configuration) for ``archs``, one process per CPU."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(case, arch) for case in (cases or kernel_cases()) for arch in archs]
    compile_one = _try_compile if tolerate_errors else compile_case
    with ProcessPoolExecutor(max_workers=max(1, min(len(os.sched_getaffinity(0)), 8))) as pool:
        return list(pool.map(compile_one, *zip(*jobs), chunksize=4))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel | variant | arch | registers | spill stores / loads (bytes) | shared (bytes) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['registers']} | {r['spill_stores']} / "
        f"{r['spill_loads']} | {r['shared_bytes']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="compile a grid of ANAA tiles instead of the shipped candidates (to choose them)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    rows = compile_all(cases=sweep_cases(), tolerate_errors=True) if args.sweep else compile_all()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
