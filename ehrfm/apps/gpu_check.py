"""The prepared GPU check (``scripts/gpu-check``): every GPU-only path of ehrfm, run once, one JSON out.

Checks, each recorded as ``{"status": "ok" | "failed" | "skipped", "seconds": ..., ...numbers}``:

* ``environment``: torch / CUDA / device, which optional kernels import (mamba-ssm, causal-conv1d, flash-attn);
* ``triton_kernels``: the ANAA kernel (forward, dQ/dK/dV; packed rows, causal) and the dense-loss kernel
  (forward, dZ) against their plain-PyTorch references, fp32 and bf16 inputs;
* ``mamba_scan_packed``: ``selective_scan`` on packed rows (mamba-ssm's kernel, one document per row) against
  the sequential reference, values and gradients, and its speed against the fallback scan;
* ``flash_varlen``: a Llama on packed rows with flash-attn varlen against SDPA with the block mask;
* ``pretrain``: Tiny Llama and Tiny Mamba, 30 steps each under ddp and fsdp (world size 1, NCCL), bf16:
  final loss, validation perplexity, tokens/s, MFU (the train-throughput numbers);
* ``finetune_evaluate``: per-task finetuning and evaluation of an exported run, on the device;
* ``benches``: ``ehrfm bench anaa`` (Triton vs SDPA) and ``ehrfm bench dense``.

Pass/fail thresholds are relative errors ``|a - b| / |b|`` (Frobenius): 2e-2 for fp32 inputs (tf32 dots),
6e-2 for bf16 inputs. Without CUDA, ``--device cpu`` runs the same checks at small sizes (Triton through its
interpreter, gloo instead of NCCL): a rehearsal of the script, not a measurement.

    python -m ehrfm.apps.gpu_check --out gpu-check.json [--device cuda|cpu] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ..config_flags import comma_list

TOL = {"fp32": 2e-2, "bf16": 6e-2}


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _optional_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 - absent or built for another torch
        return None
    return str(getattr(module, "__version__", "installed"))


class Context:
    def __init__(self, device: str, work: Path) -> None:
        import torch

        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.work = work
        self._data: Path | None = None

    def data(self) -> Path:
        """A small prepared Synthea cohort with the demo tasks (generated once, cached by ehrfm)."""
        if self._data is None:
            from ..data_shards.config import PrepareConfig
            from ..data_shards.prepare import prepare
            from ..data_shards.synthea import generate_cohort

            source = generate_cohort(40, seed=7, age="60-90", threads=max(1, os.cpu_count() or 1), progress=False)
            cfg = PrepareConfig(format="fhir", tasks=["demo"])
            cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test = 0.45, 0.30, 0.25
            cfg.splits.val_fraction = 0.3  # of the finetune patients: both classes in finetune_val at 40 patients
            out = self.work / "data"
            if not (out / "manifest.json").exists():
                prepare(source, out, cfg, progress=False)
            self._data = out
        return self._data


def _ehrfm(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "ehrfm.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ehrfm {' '.join(args[:2])} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return proc


# -- checks ---------------------------------------------------------------------------------------------------
def check_environment(ctx: Context) -> dict:
    import torch

    out = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(ctx.device),
        "gpu_extra_install": os.environ.get("EHRFM_GPU_EXTRA", "not attempted"),
    }
    if ctx.gpu:
        out.update(
            name=torch.cuda.get_device_name(ctx.device),
            capability=list(torch.cuda.get_device_capability(ctx.device)),
            gpus=torch.cuda.device_count(),
            memory_gb=round(torch.cuda.get_device_properties(ctx.device).total_memory / 2**30, 1),
        )
    for name in ("triton", "mamba_ssm", "causal_conv1d", "flash_attn", "deepspeed"):
        out[name] = _optional_version(name)
    from ..devices import preferred_attn_implementation
    from ..pretrain.metrics import peak_flops

    out["attn_implementation"] = preferred_attn_implementation(ctx.device)
    out["peak_flops"] = peak_flops() if ctx.gpu else 0.0
    return out


def check_triton_kernels(ctx: Context) -> dict:
    import torch

    from ..kernels import anaa_attention
    from ..kernels.dense.reference import orthogonality_loss, spectral_loss
    from ..kernels.dense.triton_kernel import spec_orth_triton
    from ..kernels.tuning import tuned_tiles

    batch, heads, n = (2, 4, 512) if ctx.gpu else (1, 2, 37)
    head_dims = (64, 128) if ctx.gpu else (16,)
    g = torch.Generator().manual_seed(0)
    results, worst = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if not ctx.gpu and dtype == torch.bfloat16:
            continue  # the interpreter has no bf16
        errs = {}
        for d in head_dims:
            q, k, v, w = (torch.randn(batch, heads, n, d, generator=g) for _ in range(4))
            noise = torch.randn(batch, heads, n, n, generator=g).to(ctx.device)
            docs = torch.ones(batch, n, dtype=torch.long)
            docs[:, n // 3 :] = 2
            docs[-1, -n // 5 :] = 0  # padding
            # training with explicit noise: the softmax and the noise kernels, compared with the reference
            kw = dict(sigma_eh=1.0, variant="causal", training=True, noise=noise, document_ids=docs.to(ctx.device))

            def run(impl, cast):
                leaves = [t.to(ctx.device, cast).requires_grad_() for t in (q, k, v)]
                out = anaa_attention(*leaves, impl=impl, **kw)
                (out.float() * w.to(ctx.device)).sum().backward()
                return [out] + [t.grad for t in leaves]

            got, ref = run("triton", dtype), run("reference", torch.float32)
            errs.update({f"anaa_d{d}_{part}": _rel(a, b) for part, a, b in zip(("out", "dq", "dk", "dv"), got, ref)})
        z = (torch.randn(4 * 64, 2 * 64, generator=g) * torch.linspace(0.5, 2.0, 2 * 64)).to(ctx.device)

        def dense(fn, cast):
            leaf = z.to(cast).detach().requires_grad_()
            spec, orth = (
                fn(leaf) if fn is spec_orth_triton else (spectral_loss(leaf.float()), orthogonality_loss(leaf.float()))
            )
            (1.3 * spec + 0.7 * orth).backward()
            return spec, orth, leaf.grad

        dgot, dref = dense(spec_orth_triton, dtype), dense(None, torch.float32)
        errs.update({f"dense_{p}": _rel(a, b) for p, a, b in zip(("spec", "orth", "dz"), dgot, dref)})
        results[name] = errs
        worst[name] = max(errs.values())
    ok = all(worst[k] < TOL[k] for k in worst)
    return {
        "status": "ok" if ok else "failed",
        "shape": [batch, heads, n, list(head_dims)],
        "relative_error": results,
        "tolerance": {k: TOL[k] for k in worst},
        **{
            f"{family}_tiles_chosen": {k: v for k, v in tuned_tiles().items() if k.startswith(f"{family}:")}
            for family in ("anaa", "dense")
        },
    }


def check_mamba_scan_packed(ctx: Context) -> dict:
    import torch

    from ..kernels.mamba_scan import scan as scan_mod
    from ..kernels.mamba_scan import selective_scan, selective_scan_reference

    batch, channels, length, state = (4, 256, 512, 16) if ctx.gpu else (2, 16, 48, 4)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "u": torch.randn(batch, channels, length, generator=g),
        "delta": torch.randn(batch, channels, length, generator=g),
        "A": -torch.rand(channels, state, generator=g) - 0.1,
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.randn(channels, generator=g),
        "z": torch.randn(batch, channels, length, generator=g),
        "delta_bias": torch.randn(channels, generator=g) * 0.5,
    }
    resets = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        resets[row, torch.randperm(length - 1, generator=g)[: 3 + row][1:] + 1] = True
    up = torch.randn(batch, channels, length, generator=g).to(ctx.device)

    def run(fn):
        leaves = {k: v.to(ctx.device).requires_grad_() for k, v in inputs.items()}
        if ctx.gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        y = fn(**leaves, delta_softplus=True, resets=resets.to(ctx.device))
        y.backward(up)
        if ctx.gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start, [y] + [leaves[k].grad for k in ("u", "delta", "A", "B", "C")]

    run(selective_scan)  # warm-up (kernel load)
    fast_s, fast = run(selective_scan)
    _, ref = run(selective_scan_reference)
    errs = {name: _rel(a, b) for name, a, b in zip(("y", "du", "ddelta", "dA", "dB", "dC"), fast, ref)}
    kernel = scan_mod._cuda_kernel_applies(inputs["u"].to(ctx.device))
    saved = scan_mod._mamba_ssm_scan
    scan_mod._mamba_ssm_scan = None
    try:
        fallback_s, _ = run(selective_scan)
    finally:
        scan_mod._mamba_ssm_scan = saved
    ok = max(errs.values()) < TOL["fp32"]
    return {
        "status": "ok" if ok else "failed",
        "path": "mamba-ssm kernel, one document per row"
        if kernel
        else "fallback scan (mamba-ssm not importable on this device)",
        "relative_error": errs,
        "fwd_bwd_seconds": {"selective_scan": round(fast_s, 5), "fallback": round(fallback_s, 5)},
        "shape": [batch, channels, length, state],
    }


def check_flash_varlen(ctx: Context) -> dict:
    import torch

    from ..devices import preferred_attn_implementation
    from ..pretrain.models import build_model

    if preferred_attn_implementation(ctx.device) != "flash_attention_2":
        return {"status": "skipped", "reason": "flash-attn not importable or the device is older than sm_80"}
    torch.manual_seed(0)
    model = (
        build_model(
            "llama",
            "tiny",
            head=True,
            vocab_size=200,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
        )
        .to(ctx.device, torch.bfloat16)
        .eval()
    )
    length, batch = 512, 4
    ids = torch.randint(5, 200, (batch, length), device=ctx.device)
    docs = torch.ones(batch, length, dtype=torch.long, device=ctx.device)
    docs[:, 100:] = 2
    docs[:, 350:] = 3
    docs[1, 480:] = 0
    with torch.no_grad():
        sdpa = model(input_ids=ids, document_ids=docs, attention_mask=(docs > 0).long()).logits
        model.set_attn_implementation("flash_attention_2")
        flash = model(input_ids=ids, document_ids=docs, attention_mask=(docs > 0).long()).logits
    real = docs > 0
    err = _rel(flash[real].float(), sdpa[real].float())
    return {"status": "ok" if err < TOL["bf16"] else "failed", "relative_error_logits": err}


def _last(run: Path, split: str | None) -> dict:
    from ..metrics_log import read_metrics

    records = [r for r in read_metrics(run) if (r.get("split") == split) or (split is None and "split" not in r)]
    return records[-1] if records else {}


def check_pretrain(ctx: Context) -> dict:
    data = ctx.data()
    steps = 30 if ctx.gpu else 3
    runs = {}
    for arch in ("llama", "mamba"):
        for strategy in ("ddp", "fsdp"):
            out = ctx.work / f"pretrain_{arch}_{strategy}"
            start = time.perf_counter()
            _ehrfm(
                "pretrain",
                "--data",
                str(data),
                "--model",
                arch,
                "--size",
                "tiny",
                "--out",
                str(out),
                "--strategy",
                strategy,
                f"train.max_steps={steps}",
                f"train.val_every={steps}",
                f"checkpoint.every={steps}",
                "train.precision=bf16",
                "train.progress_bar=false",
                timeout=600,
            )
            last, val = _last(out, None), _last(out, "val")
            engine = json.loads((out / "engine.json").read_text())
            runs[f"{arch}/{strategy}"] = {
                "seconds": round(time.perf_counter() - start, 1),
                "loss": last.get("loss"),
                "val_ppl": val.get("val_ppl"),
                "ref_bigram_ppl": val.get("ref_bigram_ppl"),
                "tokens_per_s": last.get("tokens_per_s"),
                "mfu": last.get("mfu"),
                "peak_memory_mb": last.get("peak_memory_mb"),
                "backend": engine.get("backend"),
                "attn_implementation": engine.get("attn_implementation"),
            }
    return {"status": "ok", "steps": steps, "runs": runs}


def check_finetune_evaluate(ctx: Context) -> dict:
    run = ctx.work / "pretrain_llama_ddp"
    if not (run / "metrics.jsonl").exists():
        return {"status": "skipped", "reason": "needs the pretrain check's llama/ddp run"}
    hf, ft, ev = ctx.work / "hf_llama", ctx.work / "ft_llama", ctx.work / "eval_llama"
    _ehrfm("export", "--run", str(run), "--out", str(hf), "--overwrite", timeout=300)
    start = time.perf_counter()
    _ehrfm(
        "finetune",
        "--model",
        str(hf),
        "--data",
        str(ctx.data()),
        "--out",
        str(ft),
        "--method",
        "per-task",
        "--epochs",
        "2",
        "--context-length",
        "256",
        "--overwrite",
        timeout=600,
    )
    _ehrfm(
        "evaluate",
        "--model",
        str(ft),
        "--data",
        str(ctx.data()),
        "--out",
        str(ev),
        "--bootstrap",
        "100",
        "--overwrite",
        timeout=300,
    )
    zero_shot = ctx.work / "zero_shot_llama"
    _ehrfm(
        "forecast",
        "--model",
        str(hf),
        "--data",
        str(ctx.data()),
        "--out",
        str(zero_shot),
        "--samples",
        "8",
        "--max-examples",
        "40",
        "--max-new-tokens",
        "128",
        "--context-length",
        "256",
        "--overwrite",
        timeout=600,
    )
    forecast = json.loads((zero_shot / "forecast.json").read_text())
    meta = json.loads((ft / "finetune.json").read_text())
    metrics = json.loads((ev / "metrics.json").read_text())
    auroc = {t: m.get("auroc", {}).get("value") for t, m in metrics.get("tasks", {}).items()}
    ok = str(meta.get("device", "")).startswith(ctx.device.type) and forecast["device"].startswith(ctx.device.type)
    return {
        "status": "ok" if ok else "failed",
        "device": meta.get("device"),
        "seconds": round(time.perf_counter() - start, 1),
        "auroc": auroc,
        "zero_shot": {"device": forecast["device"], "seconds": forecast["seconds"], "tasks": forecast["tasks"]},
    }


def check_forecast_rollouts(ctx: Context) -> dict:
    """Cached rollouts on the device (KV cache, Mamba / Mamba2 recurrent states and whatever fast decode kernels
    are installed): greedy rollouts of left-padded prompts, rows leaving the batch as they hit, must equal each
    prompt rolled out alone (token for token on CPU; on a GPU batch-size-dependent kernels may flip a near-tie, so
    the share of identical rollout prefixes is reported and must stay >= 0.9); plus rollout throughput."""
    import torch

    from ..data_shards.schema import SPECIAL_TOKENS
    from ..finetune.bench import random_prompts
    from ..finetune.config import SamplingConfig
    from ..finetune.rollout import OutcomeRule, TokenTable, rollout
    from ..pretrain.models import build_model

    vocab = 64 if not ctx.gpu else 512
    tokens = list(SPECIAL_TOKENS) + [f"C{i}" for i in range(vocab - len(SPECIAL_TOKENS))]
    table = TokenTable(tokens, [], {}).to(ctx.device)
    prompts = random_prompts([5, 9, 7] if not ctx.gpu else [60, 120, 90], vocab, seed=0)
    first = len(SPECIAL_TOKENS)
    rules = [OutcomeRule(list(range(first + 5 * i, first + 5 * i + 8)), 1e9) for i in range(3)]
    cfg = SamplingConfig(samples=1, temperature=0.0, max_new_tokens=16 if not ctx.gpu else 64)
    out = {}
    for arch in ("llama", "mamba", "mamba2"):
        torch.manual_seed(0)
        # Mamba2 heads x head_dim = 2 x hidden (its expand factor)
        shapes = {"mamba2": dict(head_dim=16, num_heads=8, state_size=8, chunk_size=16)}.get(arch, {})
        model = build_model(arch, "tiny", vocab_size=vocab, hidden_size=64, num_hidden_layers=2, **shapes)
        model = model.to(ctx.device).eval()
        start = time.perf_counter()
        together = rollout(model, prompts, rules, table, cfg, torch.Generator(), keep_tokens=True)
        seconds = time.perf_counter() - start
        alone = [
            rollout(model, [p], [r], table, cfg, torch.Generator(), keep_tokens=True) for p, r in zip(prompts, rules)
        ]
        pairs = list(zip(together.sampled, (a.sampled[0] for a in alone)))
        agree = sum(_common_prefix(x, y) for x, y in pairs) / max(1, sum(max(len(x), len(y)) for x, y in pairs))
        out[arch] = {
            "identical_share": round(agree, 4),
            "tokens": together.tokens,
            "tokens_per_s": round(together.tokens / seconds, 1),
        }
    ok = all(v["identical_share"] >= (0.9 if ctx.gpu else 1.0) for v in out.values())
    return {"status": "ok" if ok else "failed", **out}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_benches(ctx: Context) -> dict:
    if not ctx.gpu:
        return {"status": "skipped", "reason": "benches measure GPUs"}
    out = {}
    benches = (
        ("anaa", ["--sizes", "512,2048", "--impls", "triton,sdpa"]),
        ("dense", []),
        ("generate", ["--archs", "llama,mamba,mamba2", "--size", "tiny", "--history", "512", "--new", "64"]),
    )
    for name, args in benches:
        path = ctx.work / f"bench-{name}.json"
        _ehrfm("bench", name, "--json-out", str(path), *args, timeout=300)
        out[name] = json.loads(path.read_text())["results"]
    return {"status": "ok", **out}


CHECKS = {
    "environment": check_environment,
    "triton_kernels": check_triton_kernels,
    "mamba_scan_packed": check_mamba_scan_packed,
    "flash_varlen": check_flash_varlen,
    "pretrain": check_pretrain,
    "finetune_evaluate": check_finetune_evaluate,
    "forecast_rollouts": check_forecast_rollouts,
    "benches": check_benches,
}


def run_checks(device: str, work: Path, only: list[str] | None = None) -> dict:
    ctx = Context(device, work)
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device, "checks": {}}
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            result = check(ctx)
            result.setdefault("status", "ok")
        except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
            result = {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}"[-3000:],
                "traceback": traceback.format_exc()[-3000:],
            }
        result["seconds"] = result.get("seconds", round(time.perf_counter() - start, 1))
        report["checks"][name] = result
        print(f"[gpu-check] {name}: {result['status']} ({result['seconds']} s)", file=sys.stderr, flush=True)
    report["failed"] = [n for n, r in report["checks"].items() if r["status"] == "failed"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    args = parser.parse_args(argv)
    import torch

    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})",
            file=sys.stderr,
        )
        return 2
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    with tempfile.TemporaryDirectory(prefix="ehrfm-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run_checks(device, work, comma_list(args.only) or None)
    from ..outputs import write_text_atomic

    write_text_atomic(args.out, json.dumps(report, indent=1, default=str) + "\n")
    print(f"[gpu-check] wrote {args.out}; failed: {report['failed'] or 'none'}", file=sys.stderr)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
