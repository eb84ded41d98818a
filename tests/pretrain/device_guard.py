"""A fake device for NCCL's rule on CPU: every tensor handed to a collective must live on the engine's device.

On a GPU rank a tensor made without ``device=`` (``torch.tensor([...])``, ``torch.zeros(4)``) lands on the
host, and NCCL rejects it at the first collective; on CPU with gloo the same code runs. This guard makes the
difference visible on CPU: while it is active, tensors created by a factory without an explicit ``device``
(or by ``.cpu()`` / ``torch.from_numpy``) are marked *host tensors*; the mark follows values computed only
from host tensors (a result that also reads a device tensor would sit on the device), and ``.to(device)``
clears it. The wrapped ``torch.distributed`` collectives raise :class:`HostTensorInCollective` on a marked
tensor. Explicit ``device=`` is trusted: the check is about tensors that forgot where they belong.

Run as a driver (``python device_guard.py pretrain ...``): the guard is active inside ``Trainer.train_step``
and ``Trainer.validate`` (the loop's collectives), the rest of ``ehrfm`` runs unchanged.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

MARK = "_ehrfm_host_tensor"
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.arange,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.linspace,
    torch.eye,
    torch.scalar_tensor,
}
COLLECTIVES = [
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",
]


class HostTensorInCollective(RuntimeError):
    pass


def is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, MARK, False)


def _mark(out, value: bool) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, MARK, value)
            except (AttributeError, RuntimeError):  # tensors without a __dict__ (e.g. some subclasses)
                pass


def _names_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call names a device (positionally, as a tensor to copy from, or by keyword)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, int, torch.Tensor)) and not isinstance(a, bool) for a in args[1:])


class HostTensorMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            host = kwargs.get("device") is None
        elif func is torch.from_numpy or func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.to:
            host = is_host(args[0]) and not _names_device(args, kwargs)
        elif func is torch.Tensor.cuda:
            host = False
        else:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if not inputs:
                return out
            host = all(is_host(t) for t in inputs)
        _mark(out, host)
        return out


def _checked(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for t in tree_flatten((args, kwargs))[0]:
            if is_host(t):
                raise HostTensorInCollective(
                    f"torch.distributed.{name} got a tensor created without device= (shape {tuple(t.shape)}, "
                    f"{t.dtype}): on a GPU rank it sits on the host and NCCL rejects it"
                )
        return fn(*args, **kwargs)

    wrapper._ehrfm_checked = True
    return wrapper


def install() -> None:
    """Wrap the collectives of ``torch.distributed`` (and its autograd variants) with the host-tensor check."""
    import torch.distributed.nn as dist_nn
    import torch.distributed.nn.functional as dist_nn_f

    for module in (dist, dist_nn, dist_nn_f):
        for name in COLLECTIVES:
            fn = getattr(module, name, None)
            if fn is not None and not getattr(fn, "_ehrfm_checked", False):
                setattr(module, name, _checked(name, fn))


def guarded(method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        with HostTensorMode():
            return method(*args, **kwargs)

    return run


if __name__ == "__main__":
    install()
    from ehrfm.pretrain import train as train_mod

    train_mod.Trainer.train_step = guarded(train_mod.Trainer.train_step)
    train_mod.Trainer.validate = guarded(train_mod.Trainer.validate)
    from ehrfm.cli import main

    sys.exit(main(sys.argv[1:]))
