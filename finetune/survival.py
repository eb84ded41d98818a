"""Survival heads for time-to-event finetuning: piecewise-exponential (MOTOR-style) and discrete-time.

Time is in days from the prediction time, split into bins by ``edges`` (0 = e_0 < e_1 < ... < e_B; the last
bin is open: it also covers times beyond e_B).

Piecewise exponential: the head gives a log hazard per bin, log h_b (per day). A patient observed for t days
has exposure x_b(t) = clip(t - e_b, 0, e_{b+1} - e_b) in bin b (the last bin unbounded), cumulative hazard
H(t) = sum_b h_b x_b(t) and survival S(t) = exp(-H(t)). The censored log-likelihood of (t, event) is

    log L = event * log h_{b(t)} - H(t)

(b(t): the bin holding t), so censoring enters exactly: a censored row contributes only its survival to t.

Discrete time: the head gives a logit per bin, p_b = sigmoid(logit_b), the probability of the event in bin b
given survival to its start. A row with its time in bin k contributes sum_{b<k} log(1 - p_b) plus log p_k if
the event was observed, else log(1 - p_k): a row censored inside bin k counts as having survived that bin (the
usual discrete-time convention; it slightly overstates survival for rows censored early in a bin).
S(t) = prod over bins that end at or before t of (1 - p_b).

Shapes: embeddings (N, H); time, event (N,); log hazards / logits (N, B); survival at T query times (N, T).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# survival curves are reported on these fractions of a task's horizon (20 points, the last = the horizon)
SURVIVAL_GRID = torch.linspace(0.05, 1.0, 20)


def _edges(edges: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    edges = torch.as_tensor(edges, dtype=like.dtype, device=like.device)
    if edges.ndim != 1 or len(edges) < 2 or edges[0] != 0 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"edges must start at 0 and increase, got {edges.tolist()}")
    return edges


def bin_exposure(time: torch.Tensor, edges: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(N,) days -> (N, B) days spent in each bin (the last bin open-ended)."""
    edges = _edges(edges, time)
    widths = torch.cat([edges[1:-1] - edges[:-2], torch.tensor([float("inf")], dtype=time.dtype, device=time.device)])
    return (time[:, None] - edges[None, :-1]).clamp(min=0).minimum(widths[None, :])


def event_bin(time: torch.Tensor, edges: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(N,) days -> (N,) index of the bin holding each time (times beyond the last edge: the last bin)."""
    edges = _edges(edges, time)
    return (torch.searchsorted(edges[1:-1].contiguous(), time.contiguous(), right=True)).clamp(max=len(edges) - 2)


def piecewise_exponential_nll(
    log_hazard: torch.Tensor, time: torch.Tensor, event: torch.Tensor, edges: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Mean negative censored log-likelihood (see the module docstring); log_hazard (N, B) float."""
    log_hazard = log_hazard.float()
    time, event = time.to(log_hazard), event.to(log_hazard)
    exposure = bin_exposure(time, edges)
    cumulative = (log_hazard.exp() * exposure).sum(-1)
    at_event = log_hazard.gather(-1, event_bin(time, edges)[:, None])[:, 0]
    return (cumulative - event * at_event).mean()


def piecewise_exponential_survival(
    log_hazard: torch.Tensor, times: torch.Tensor, edges: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(N, B) log hazards, (T,) days -> (N, T) survival probabilities S(t) = exp(-H(t))."""
    log_hazard = log_hazard.float()
    exposure = bin_exposure(times.to(log_hazard), edges)  # (T, B)
    return torch.exp(-(log_hazard.exp() @ exposure.T))


def discrete_time_nll(
    logits: torch.Tensor, time: torch.Tensor, event: torch.Tensor, edges: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Mean negative log-likelihood of the discrete-time model; logits (N, B)."""
    logits = logits.float()
    time, event = time.to(logits), event.to(logits)
    k = event_bin(time, edges)
    bins = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    survived = (bins < k[:, None]).to(logits)
    log_not = F.logsigmoid(-logits)  # log(1 - p)
    at_k = logits.gather(-1, k[:, None])[:, 0]
    last = event * F.logsigmoid(at_k) + (1 - event) * F.logsigmoid(-at_k)
    return -((survived * log_not).sum(-1) + last).mean()


def discrete_time_survival(
    logits: torch.Tensor, times: torch.Tensor, edges: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(N, B) logits, (T,) days -> (N, T) S(t): the product of (1 - p_b) over bins ending at or before t."""
    logits = logits.float()
    edges = _edges(edges, logits)
    ended = (edges[None, 1:] <= times.to(logits)[:, None]).to(logits)  # (T, B)
    return torch.exp(F.logsigmoid(-logits) @ ended.T)


class SurvivalHead(nn.Module):
    """Patient embedding (N, H) -> (N, B): log hazards (``piecewise_exponential``) or logits (``discrete``).

    A two-layer MLP like the binary heads; ``edges`` (days) are kept as a buffer so a saved head carries
    them. :meth:`loss` and :meth:`survival` dispatch on the kind."""

    KINDS = ("piecewise_exponential", "discrete")

    def __init__(self, hidden_size: int, edges: Sequence[float], kind: str = "piecewise_exponential", dropout=0.1):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {self.KINDS}")
        self.kind = kind
        self.register_buffer("edges", torch.as_tensor(list(edges), dtype=torch.float32))
        _edges(self.edges, self.edges)
        bins = len(self.edges) - 1
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, bins)
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)

    def loss(self, out: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        nll = piecewise_exponential_nll if self.kind == "piecewise_exponential" else discrete_time_nll
        return nll(out, time, event, self.edges)

    def survival(self, out: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        curve = piecewise_exponential_survival if self.kind == "piecewise_exponential" else discrete_time_survival
        return curve(out, times, self.edges)
