"""2 gloo ranks == one process on the concatenated batch: loss values and gradients.

Rank r holds rows slices[r] of the global batch (unequal sizes). Two regimes: global N >= d (all-reduced
moments) and global N < d (all-gathered rows). Gradient convention (see distributed.py): z_r.grad equals
world_size * dL/dz_r, and the rank-average of a shared encoder's parameter gradient (what DDP does) equals
the single-process gradient.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ehrfm.kernels import dense_losses
from ehrfm.kernels.dense.distributed import subspace_loss_distributed
from ehrfm.kernels.dense.reference import subspace_loss

pytestmark = pytest.mark.distributed

WORLD = 2
f64 = torch.float64
# (rows of z on rank 0, rank 1, rows of z_related on rank 0, rank 1, d, k)
CASES = {"moments": (7, 5, 4, 6, 4, 2), "gather": (3, 2, 4, 1, 8, 3), "empty_slice": (6, 0, 0, 5, 3, 2)}
WEIGHTS = {"spec": 1.0, "orth": 0.3, "sub": 0.7}


def _data(case):
    n0, n1, m0, m1, d, _ = CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    x = torch.randn(n0 + n1, 3, generator=g, dtype=f64)
    enc = torch.randn(3, d, generator=g, dtype=f64)
    z = x @ enc + 0.3 * torch.randn(n0 + n1, d, generator=g, dtype=f64)
    z_rel = torch.randn(m0 + m1, d, generator=g, dtype=f64) * torch.linspace(0.5, 2.0, d, dtype=f64)
    return x, enc, z, z_rel


def _total(out):
    return sum(WEIGHTS[name] * value for name, value in out.items())


def _slice(t, rank, n0):
    return t[:n0] if rank == 0 else t[n0:]


def _worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for case, (n0, _, m0, _, _, k) in CASES.items():
            x, enc, z, z_rel = _data(case)
            z_r = _slice(z, rank, n0).clone().requires_grad_()
            zrel_r = _slice(z_rel, rank, m0).clone().requires_grad_()
            out = dense_losses(z_r, z_related=zrel_r, k=k, distributed=True)
            _total(out).backward()
            # A shared linear encoder, as DDP sees it: rank-averaged parameter gradient.
            w = enc.clone().requires_grad_()
            _total(dense_losses(_slice(x, rank, n0) @ w, k=k, distributed=True)).backward()
            dist.all_reduce(w.grad)
            sub_only = subspace_loss_distributed(_slice(z, rank, n0), zrel_r.detach(), k)
            results[(case, rank)] = {
                "values": {name: v.item() for name, v in out.items()},
                "grad_z": z_r.grad,
                "grad_zrel": zrel_r.grad,
                "grad_w": w.grad / WORLD,
                "sub_only": sub_only.item(),
            }
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(spawnable):
    manager = mp.Manager()
    results = manager.dict()
    with spawnable():
        mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    return dict(results)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_single_process(rank_results, case):
    n0, _, m0, _, _, k = CASES[case]
    x, enc, z, z_rel = _data(case)
    z, z_rel = z.clone().requires_grad_(), z_rel.clone().requires_grad_()
    ref = dense_losses(z, z_related=z_rel, k=k)
    _total(ref).backward()
    w = enc.clone().requires_grad_()
    _total(dense_losses(x @ w, k=k)).backward()
    for rank in range(WORLD):
        got = rank_results[(case, rank)]
        for name, value in ref.items():
            assert got["values"][name] == pytest.approx(value.item(), rel=1e-10, abs=1e-12), name
        assert got["sub_only"] == pytest.approx(subspace_loss(z, z_rel, k).item(), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(got["grad_z"], WORLD * _slice(z.grad, rank, n0), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got["grad_zrel"], WORLD * _slice(z_rel.grad, rank, m0), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got["grad_w"], w.grad, rtol=1e-8, atol=1e-10)
