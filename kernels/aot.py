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
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = (80, 90)
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


def _anaa_cases() -> list[KernelCase]:
    # anaa_triton upcasts q, k, V' to fp32 before the launch; the input dtype and device select the dot
    # precision (triton_kernel.dot_precision) and the head dim the BD tile (triton_kernel._blocks)
    import torch

    from .anaa.triton_kernel import _blocks, dot_precision

    mod = "ehrfm.kernels.anaa.triton_kernel"
    cases = []
    for d in HEAD_DIMS:
        for dtype in INPUT_DTYPES:
            prec = dot_precision(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]),
                                 on_gpu=True)
            bm, bn, bd, warps = _blocks(d, on_gpu=True)
            common = {"CAUSAL": True, "BM": bm, "BN": bn, "BD": bd, "PREC": prec}
            variant = f"{dtype} inputs, head dim {d} ({bm}x{bn} tiles, {warps} warps)"
            f32 = lambda *names: {n: "*fp32" for n in names}  # noqa: E731
            docs = {"DOC": "*i32", "DSTART": "*i32", "DEND": "*i32"}
            scalars = {"n": "i32", "H": "i32", "d": "i32", "scale": "fp32"}
            cases.append(KernelCase(f"{mod}:_anaa_fwd", variant,
                                    {**f32("Q", "K", "V", "Z", "YA", "YZ", "R", "LSE"), **docs, "seed": "i32",
                                     **scalars}, {**common, "NOISE": 1}, warps))
            cases.append(KernelCase(f"{mod}:_anaa_bwd_dkdv", variant,
                                    {**f32("Q", "K", "V", "Z", "DYA", "DYZ", "LSE", "DELTA", "DR", "R", "DK", "DV"),
                                     **docs, "seed": "i32", **scalars}, {**common, "NOISE": 1}, warps))
            cases.append(KernelCase(f"{mod}:_anaa_bwd_dq", variant,
                                    {**f32("Q", "K", "V", "DYA", "LSE", "DELTA", "DR", "R", "DQ"), **docs,
                                     **scalars}, common, warps))
    cases.append(KernelCase(f"{mod}:_philox_noise_kernel", "tests' noise", {"Z": "*fp32", "seed": "i32", "n": "i32"},
                            {"BM": 16, "BN": 16}))
    return cases


def _dense_cases() -> list[KernelCase]:
    import torch

    from .dense.triton_kernel import BLOCK as block
    from .dense.triton_kernel import DOT_WARPS, dot_precision

    mod = "ehrfm.kernels.dense.triton_kernel"
    gpu_prec = dot_precision(torch.device("cuda"))
    cases = []
    for dtype in INPUT_DTYPES:
        z = f"*{dtype}"
        ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
        variant = f"{dtype} embeddings"
        cases.append(KernelCase(f"{mod}:_col_stats_kernel", variant,
                                {"Z": z, "ZS": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "PART": "*fp32",
                                 **ints("N", "D", "stride_zn", "stride_zd"), "eps": "fp32"},
                                {"BLOCK_N": block, "BLOCK_D": block}))
        cases.append(KernelCase(f"{mod}:_dual_gram_kernel", variant,
                                {"A": z, "B": "*fp32", "PA": "*fp32", "PB": "*fp32", "PART": "*fp32",
                                 **ints("M", "R", "stride_am", "stride_ar", "stride_bm", "stride_br")},
                                {"BLOCK_M": block, "BLOCK_R": block, "PREC": gpu_prec}, DOT_WARPS))
        # n >= d branch: dZ = Z P, G = Zs Ps (L1 = Z in the input dtype)
        cases.append(KernelCase(f"{mod}:_dual_matmul_kernel", variant,
                                {"L1": z, "R1": "*fp32", "L2": "*fp32", "R2": "*fp32", "Z": z, "ZS": "*fp32",
                                 "COEF": "*fp32", "DZ": "*fp32", "G": "*fp32", "COLPART": "*fp32",
                                 **ints("N", "D", "K", "s_l1n", "s_l1k", "s_r1k", "s_r1d", "s_l2n", "s_l2k", "s_r2k",
                                        "s_r2d", "stride_zn", "stride_zd")},
                                {"BLOCK_N": block, "BLOCK_D": block, "BLOCK_K": block, "PREC": gpu_prec},
                                DOT_WARPS))
    cases.append(KernelCase(f"{mod}:_orth_finish_kernel", "fp32 buffers",
                            {"DZ": "*fp32", "G": "*fp32", "ZS": "*fp32", "RSTD": "*fp32", "COLSUM": "*fp32",
                             "N": "i32", "D": "i32"}, {"BLOCK_N": block, "BLOCK_D": block}))
    return cases


def kernel_cases() -> list[KernelCase]:
    return _anaa_cases() + _dense_cases()


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (its bundled legacy one below sm_90, the newer one above)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def compile_case(case: KernelCase, arch: int) -> dict:
    """Compile one case for ``sm_{arch}``; returns registers, spill bytes and shared memory (bytes)."""
    import importlib

    import triton
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
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        arch_name = f"sm_{arch}a" if arch == 90 and "sm_90a" in compiled.asm["ptx"] else f"sm_{arch}"
        out = subprocess.run([_ptxas(arch), "-v", "--gpu-name", arch_name, str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ptxas {arch_name} failed on {case.kernel} ({case.variant}): {out.stderr.strip()[-2000:]}")
    info = out.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"kernel": fn_name, "variant": case.variant, "arch": f"sm_{arch}", "registers": registers,
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "shared_bytes": int(compiled.metadata.shared), "num_warps": int(compiled.metadata.num_warps)}


def compile_all(archs=ARCHS) -> list[dict]:
    return [compile_case(case, arch) for case in kernel_cases() for arch in archs]


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | variant | arch | registers | spill stores / loads (bytes) | shared (bytes) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['registers']} | {r['spill_stores']} / "
              f"{r['spill_loads']} | {r['shared_bytes']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    rows = compile_all()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
