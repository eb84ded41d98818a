"""Survival heads: the censored likelihoods by hand and against torch.distributions.Exponential, survival
curves consistent with the likelihood, and gradients by finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from ehrfm.finetune.survival import (
    SurvivalHead,
    bin_exposure,
    discrete_time_nll,
    discrete_time_survival,
    event_bin,
    piecewise_exponential_nll,
    piecewise_exponential_survival,
)

EDGES = [0.0, 10.0, 30.0]


def test_exposure_and_bins_by_hand():
    time = torch.tensor([5.0, 10.0, 15.0, 40.0])
    assert bin_exposure(time, EDGES).tolist() == [[5, 0], [10, 0], [10, 5], [10, 30]]  # the last bin is open
    assert event_bin(time, EDGES).tolist() == [0, 1, 1, 1]


def test_one_bin_is_the_exponential_distribution():
    rate = torch.tensor(0.03)
    time = torch.tensor([1.0, 7.5, 20.0, 55.0, 90.0])
    event = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    log_hazard = torch.log(rate).expand(5, 1)
    dist = torch.distributions.Exponential(rate)
    expected = -(event * dist.log_prob(time) + (1 - event) * (-rate * time)).mean()  # log S(t) = -rate t
    torch.testing.assert_close(piecewise_exponential_nll(log_hazard, time, event, [0.0, 100.0]), expected)


def test_piecewise_exponential_by_hand():
    log_hazard = torch.log(torch.tensor([[0.1, 0.02], [0.1, 0.02]]))
    nll = piecewise_exponential_nll(log_hazard, torch.tensor([15.0, 40.0]), torch.tensor([1.0, 0.0]), EDGES)
    # event at day 15: log 0.02 - (0.1 * 10 + 0.02 * 5); censored at day 40: -(0.1 * 10 + 0.02 * 30)
    torch.testing.assert_close(nll, torch.tensor(-((math.log(0.02) - 1.1) + (-1.6)) / 2))
    survival = piecewise_exponential_survival(log_hazard[:1], torch.tensor([0.0, 15.0, 40.0]), EDGES)
    torch.testing.assert_close(survival[0], torch.tensor([1.0, math.exp(-1.1), math.exp(-1.6)]))


def test_discrete_time_by_hand():
    p = torch.tensor([[0.2, 0.4]])
    logits = torch.log(p / (1 - p))
    time = torch.tensor([15.0])
    event_nll = discrete_time_nll(logits, time, torch.tensor([1.0]), EDGES)
    censored_nll = discrete_time_nll(logits, time, torch.tensor([0.0]), EDGES)
    torch.testing.assert_close(event_nll, torch.tensor(-(math.log(0.8) + math.log(0.4))))
    torch.testing.assert_close(censored_nll, torch.tensor(-(math.log(0.8) + math.log(0.6))))
    survival = discrete_time_survival(logits, torch.tensor([5.0, 15.0, 30.0]), EDGES)
    torch.testing.assert_close(survival[0], torch.tensor([1.0, 0.8, 0.48]))


@pytest.mark.parametrize("kind", SurvivalHead.KINDS)
def test_fitting_reaches_the_closed_form_maximum_likelihood(kind):
    """Two groups with exponential event times (0.01 and 0.05 per day), administratively censored at day 90,
    one free parameter per (group, bin): maximising the censored likelihood must reach the closed-form MLE --
    events / days at risk per bin (piecewise exponential), events / rows entering the bin (discrete time) --
    which lies near the true hazards."""
    gen = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.01, 0.05]).repeat_interleave(2000)
    time = torch.empty(4000).exponential_(generator=gen) / rates
    event = (time <= 90).float()
    time = time.clamp(max=90.0)
    group = torch.arange(4000) // 2000
    edges = [0.0, 15.0, 45.0, 90.0]
    torch.manual_seed(0)
    head = SurvivalHead(2, edges, kind=kind, dropout=0.0)
    head.net = torch.nn.Linear(2, 3, bias=False)
    inputs = torch.nn.functional.one_hot(group, 2).float()
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = head.loss(head(inputs), time, event)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = head(torch.eye(2)).detach()
    exposure, k = bin_exposure(time, edges), event_bin(time, edges)
    for g, rate in enumerate((0.01, 0.05)):
        rows = group == g
        events = torch.stack([((k == b) & (event > 0) & rows).sum() for b in range(3)]).float()
        if kind == "piecewise_exponential":
            mle = events / exposure[rows].sum(0)
            torch.testing.assert_close(fitted[g].exp(), mle, rtol=5e-3, atol=0)
            torch.testing.assert_close(mle, torch.full((3,), rate), rtol=0.2, atol=0)
        else:
            entering = torch.stack([((k >= b) & rows).sum() for b in range(3)]).float()
            torch.testing.assert_close(torch.sigmoid(fitted[g]), events / entering, rtol=5e-3, atol=0)
