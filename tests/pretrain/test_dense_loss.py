"""pretrain.dense_loss: picks the right tokens on a hand-built (packed) batch and weights the terms."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ehrfm.config import ConfigError, load_config
from ehrfm.data_shards.schema import TokenType as T
from ehrfm.kernels import dense_losses
from ehrfm.kernels.dense.reference import subspace_loss
from ehrfm.pretrain.dense_loss import DenseLossConfig, dense_aux_loss, last_token_mask, reg_pairs

L = 14
# Row 0 packs two documents: doc 1 = positions 0-7 (two visits, [REG] at 4 and 7), doc 2 = 8-11 ([REG] at 11),
# then two pads. Row 1 is one document 0-12 with three visits ([REG] at 4, 9, 12), then one pad.
ROW0 = [T.CLS, T.VS, T.DX, T.VE, T.REG, T.VS, T.VE, T.REG, T.CLS, T.VS, T.VE, T.REG, T.PAD, T.PAD]
ROW1 = [T.CLS, T.VS, T.DX, T.VE, T.REG, T.INTERVAL, T.VS, T.LAB, T.VE, T.REG, T.VS, T.VE, T.REG, T.PAD]
TYPE_IDS = torch.tensor([ROW0, ROW1])
ATTENTION = (TYPE_IDS != T.PAD).long()
DOC_IDS = torch.tensor([[1] * 8 + [2] * 4 + [0] * 2, [1] * 13 + [0]])


def _positions(mask):
    return [tuple(p) for p in torch.nonzero(mask).tolist()]


def _flat(pairs):
    return [(int(a) // L, int(a) % L, int(b) // L, int(b) % L) for a, b in zip(*pairs)]


def test_last_token_of_each_packed_document():
    assert _positions(last_token_mask(ATTENTION, DOC_IDS)) == [(0, 7), (0, 11), (1, 12)]
    # without document ids each row is one document
    assert _positions(last_token_mask(ATTENTION)) == [(0, 11), (1, 12)]
    # left padding
    assert _positions(last_token_mask(torch.tensor([[0, 0, 1, 1, 1]]))) == [(0, 4)]


def test_reg_pairs_are_consecutive_visits_of_one_document():
    reg = TYPE_IDS == T.REG
    # never (0,7)-(0,11) (different documents) nor (0,11)-(1,4) (different rows)
    assert _flat(reg_pairs(reg, ATTENTION, DOC_IDS)) == [(0, 4, 0, 7), (1, 4, 1, 9), (1, 9, 1, 12)]
    assert _flat(reg_pairs(reg, ATTENTION)) == [(0, 4, 0, 7), (0, 7, 0, 11), (1, 4, 1, 9), (1, 9, 1, 12)]


def _hidden(dtype=torch.float32):
    return torch.randn(2, L, 4, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_total_is_weighted_sum_on_the_expected_rows():
    h = _hidden().requires_grad_()
    cfg = DenseLossConfig(enabled=True, lam=0.5, lam_sub=0.2, lam_orth=0.01, k=2, source="both", eps=1e-5)
    total, logs = dense_aux_loss(h, cfg, attention_mask=ATTENTION, document_ids=DOC_IDS, type_ids=TYPE_IDS)
    last = [h[0, 7], h[0, 11], h[1, 12]]
    regs = [h[0, 4], h[0, 7], h[0, 11], h[1, 4], h[1, 9], h[1, 12]]
    z = torch.stack(last + regs)
    ref = dense_losses(z, eps=1e-5)
    sub = subspace_loss(torch.stack([h[0, 4], h[1, 4], h[1, 9]]), torch.stack([h[0, 7], h[1, 9], h[1, 12]]), 2)
    expected = 0.5 * (ref["spec"] + 0.2 * sub + 0.01 * ref["orth"])
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(logs["dense/sub"], sub.detach())
    assert int(logs["dense/n_emb"]) == 9 and int(logs["dense/n_pairs"]) == 3
    total.backward()
    assert h.grad[0, 12:].abs().sum() == 0 and h.grad[0, 7].abs().sum() > 0


def test_source_last_and_sub_skipped_below_k():
    h = _hidden(torch.bfloat16)
    cfg = DenseLossConfig(enabled=True, lam=1.0, lam_sub=1.0, lam_orth=0.0, k=4, source="last")
    total, logs = dense_aux_loss(h, cfg, attention_mask=ATTENTION, document_ids=DOC_IDS, type_ids=TYPE_IDS)
    z = torch.stack([h[0, 7], h[0, 11], h[1, 12]]).float()
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, dense_losses(z)["spec"])
    assert logs["dense/sub"].item() == 0.0 and int(logs["dense/n_pairs"]) == 3  # 3 pairs < k = 4


def test_reg_source_needs_reg_positions():
    with pytest.raises(ValueError):
        dense_aux_loss(_hidden(), DenseLossConfig(source="reg", lam_sub=0.0), attention_mask=ATTENTION)


def test_config_overrides():
    cfg = load_config(DenseLossConfig, None, ["enabled=true", "k=8", "source=both", "lam=0.2"])
    assert (cfg.enabled, cfg.k, cfg.source, cfg.lam) == (True, 8, "both", 0.2)
    with pytest.raises(ConfigError):
        load_config(DenseLossConfig, None, ["source=first"])


CFG_BOTH = DenseLossConfig(enabled=True, lam=0.5, lam_sub=0.2, lam_orth=0.01, k=2, source="both")


def _rank_worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        h = _hidden()[rank : rank + 1].clone().requires_grad_()
        rows = slice(rank, rank + 1)
        total, logs = dense_aux_loss(
            h,
            CFG_BOTH,
            attention_mask=ATTENTION[rows],
            document_ids=DOC_IDS[rows],
            type_ids=TYPE_IDS[rows],
            group=dist.group.WORLD,
        )
        total.backward()
        results[rank] = (total.item(), {k: v.item() for k, v in logs.items()}, h.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_one_row_per_rank_equals_whole_batch(spawnable):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    with spawnable():
        mp.spawn(_rank_worker, args=(port, results), nprocs=2, join=True)
    h = _hidden().requires_grad_()
    total, logs = dense_aux_loss(h, CFG_BOTH, attention_mask=ATTENTION, document_ids=DOC_IDS, type_ids=TYPE_IDS)
    total.backward()
    assert logs["dense/sub"] > 0
    for rank in range(2):
        got_total, got_logs, got_grad = results[rank]
        assert got_total == pytest.approx(total.item(), rel=1e-5)
        assert got_logs == pytest.approx({k: v.item() for k, v in logs.items()}, rel=1e-5, abs=1e-6)
        # collectives sum gradients over ranks: 2x the single-process gradient (DDP's average undoes it)
        torch.testing.assert_close(got_grad, 2 * h.grad[rank : rank + 1], rtol=1e-4, atol=1e-6)
