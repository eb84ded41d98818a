"""Reference perplexities of count models: hand-computed values and an independent dictionary count."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from ehrfm.data_shards.reference_ppl import CountModels, reference_perplexities


def _arrays(seqs):
    ids = np.array([t for s in seqs for t in s], dtype=np.int64)
    first = np.zeros(len(ids), bool)
    first[np.cumsum([0] + [len(s) for s in seqs[:-1]])] = True
    return ids, first


def test_hand_computed_unigram_and_bigram():
    # train targets (first token of each sequence excluded): [1,5,6,5] -> 5,6,5 and [1,5,5] -> 5,5
    models = CountModels(*_arrays([[1, 5, 6, 5], [1, 5, 5]]), vocab_size=8)
    uni, bi = models.log_probs(*_arrays([[1, 5, 7]]), k=0.5)
    # unigram: c(5)=4, c(6)=1, N=5, V=8: p(5)=(4+.5)/(5+4), p(7)=(0+.5)/(5+4)
    assert np.exp(uni) == pytest.approx([4.5 / 9, 0.5 / 9])
    # bigram pairs: (1,5)x2 (5,6) (6,5) (5,5); contexts c(1,.)=2 c(5,.)=2: p(5|1)=(2+.5)/(2+4), p(7|5)=(0+.5)/(2+4)
    assert np.exp(bi) == pytest.approx([2.5 / 6, 0.5 / 6])


def test_matches_a_dictionary_count_on_a_prepared_corpus(meds_dataset, tmp_path):
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.prepare import prepare

    root = tmp_path / "data"
    cfg = PrepareConfig(tasks=[])
    cfg.splits.respect_meds_splits = False
    manifest = prepare(meds_dataset, root, cfg, progress=False)
    k, vocab = 0.01, manifest["vocab_size"]

    def seqs(split):
        out = []
        for shard in manifest["shards"][split]:
            with pa.memory_map(str(root / shard["path"])) as src:
                out += [list(s) for s in pa.ipc.open_file(src).read_all().column("input_ids").to_pylist()]
        return out

    train, val = seqs("pretrain"), seqs("pretrain_val")
    uni = Counter(t for s in train for t in s[1:])
    pairs = Counter((a, b) for s in train for a, b in zip(s, s[1:]))
    contexts = Counter(a for s in train for a in s[:-1])
    n = sum(uni.values())
    lu = [math.log((uni[t] + k) / (n + k * vocab)) for s in val for t in s[1:]]
    lb = [math.log((pairs[(a, b)] + k) / (contexts[a] + k * vocab)) for s in val for a, b in zip(s, s[1:])]
    got = reference_perplexities(root, manifest)
    assert manifest["reference_perplexity"]["all"] == got["all"]  # written by prepare
    assert got["all"]["targets"] == len(lu)
    assert got["all"]["unigram"] == pytest.approx(math.exp(-sum(lu) / len(lu)), rel=1e-9)
    assert got["all"]["bigram"] == pytest.approx(math.exp(-sum(lb) / len(lb)), rel=1e-9)
    assert got["codes"]["targets"] < got["all"]["targets"]
