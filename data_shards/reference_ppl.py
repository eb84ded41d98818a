"""Reference perplexities: unigram and bigram count models fit on the pretraining split, scored on
``pretrain_val``, so every model loss can be read beside what token counts alone achieve.

Both models use add-k smoothing over the whole vocabulary V, with ``k = SMOOTHING_K``::

    unigram  p(t)     = (c(t) + k) / (N + k V)
    bigram   p(t | s) = (c(s, t) + k) / (c(s, .) + k V)

counted over the targets of the pretraining split's patient sequences. Which tokens are scored:

* ``all`` (the reference of next-token prediction): every token of a patient sequence except its first
  ([CLS]), the bigram conditioning on the token before it in the same sequence. The causal models' validation
  loss scores the same targets except that a long sequence cut into context windows also loses the first
  token of every window after the first (at most one target per ``context_length`` tokens).
* ``codes`` (the reference of masked-token prediction, and the clinical part of NTP): only targets that are
  clinical codes (token types DX..OTHER, what MLM masks), the bigram still conditioning on the previous token
  whatever its type. Structure tokens ([VS], [VE], [REG], intervals) and value bins that follow their code are
  largely deterministic; comparing ``all`` with ``codes`` shows how much of a low perplexity they make.

Results are written into the prepared folder's manifest (``reference_perplexity``); :func:`for_data_dir`
computes them for folders prepared before they existed (not cached: prepared folders are never rewritten).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .schema import SPECIAL_TYPES, TokenType
from .shard_codec import read_streams

SMOOTHING_K = 0.01
SCORED = {
    "all": "every token after the first of each patient sequence (next-token targets)",
    "codes": "clinical-code targets only (token types DX..OTHER, the tokens MLM masks)",
}


def split_tokens(root: Path, shards: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, types, is_first) over all sequences of the shards, concatenated; is_first marks sequence starts."""
    ids, types, first = [], [], []
    for shard in shards:
        lengths, streams, _ = read_streams(root / shard["path"], ("input_ids", "type_ids"))
        ids.append(streams["input_ids"])
        types.append(streams["type_ids"])
        starts = np.zeros(int(lengths.sum()), dtype=bool)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        starts[offsets[lengths > 0]] = True
        first.append(starts)
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, bool)
    return np.concatenate(ids).astype(np.int64), np.concatenate(types), np.concatenate(first)


def _code_targets(types: np.ndarray) -> np.ndarray:
    special = np.array(sorted({int(TokenType.PAD), *(int(t) for t in SPECIAL_TYPES)}))
    return ~np.isin(types, special)


def target_positions(is_first: np.ndarray) -> np.ndarray:
    """Indices of the scored positions: every token except the first of its sequence."""
    pos = np.nonzero(~is_first)[0]
    return pos[pos > 0]


def unigram_log_probs(counts: np.ndarray, tokens: np.ndarray, k: float) -> np.ndarray:
    """log p(t) = log((c(t) + k) / (N + k V)) of each token, from unigram ``counts`` over a vocabulary of V."""
    return np.log((counts[tokens] + k) / (counts.sum() + k * len(counts)))


class CountModels:
    """Unigram and bigram counts of one split's targets (vocabulary size ``vocab_size``)."""

    def __init__(self, ids: np.ndarray, is_first: np.ndarray, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        target = ~is_first
        self.unigram = np.bincount(ids[target], minlength=vocab_size).astype(np.float64)
        prev, nxt = ids[:-1][target[1:]], ids[1:][target[1:]]
        keys, counts = np.unique(prev * vocab_size + nxt, return_counts=True)
        self.pair_keys, self.pair_counts = keys, counts.astype(np.float64)
        self.context = np.bincount(prev, minlength=vocab_size).astype(np.float64)

    def log_probs(self, ids: np.ndarray, is_first: np.ndarray, k: float = SMOOTHING_K) -> tuple[np.ndarray, np.ndarray]:
        """Natural-log probabilities (unigram, bigram) of every target position of ``ids`` (first tokens of a
        sequence excluded), in position order."""
        v = self.vocab_size
        pos = target_positions(is_first)
        target, prev = ids[pos], ids[pos - 1]
        uni = unigram_log_probs(self.unigram, target, k)
        pair = np.zeros(len(target))
        if len(self.pair_keys):
            keys = prev * v + target
            at = np.minimum(np.searchsorted(self.pair_keys, keys), len(self.pair_keys) - 1)
            pair = np.where(self.pair_keys[at] == keys, self.pair_counts[at], 0.0)
        bi = np.log((pair + k) / (self.context[prev] + k * v))
        return uni, bi


def reference_perplexities(
    root: Path,
    manifest: dict,
    *,
    train_split: str = "pretrain",
    eval_split: str = "pretrain_val",
    k: float = SMOOTHING_K,
) -> dict:
    """Unigram/bigram perplexities on ``eval_split`` of a prepared folder ``root`` (see the module docstring)."""
    vocab_size = int(manifest["vocab_size"])
    shards = manifest["shards"]
    train_ids, train_types, train_first = split_tokens(Path(root), shards.get(train_split, []))
    eval_ids, eval_types, eval_first = split_tokens(Path(root), shards.get(eval_split, []))
    result = {"k": k, "fit_on": train_split, "scored_on": eval_split, "scored": SCORED}
    if not len(train_ids) or not len(eval_ids):
        return {**result, "unavailable": f"split {train_split if not len(train_ids) else eval_split} is empty"}
    all_models = CountModels(train_ids, train_first, vocab_size)
    uni, bi = all_models.log_probs(eval_ids, eval_first, k)
    pos = target_positions(eval_first)
    codes = _code_targets(eval_types[pos])
    # the unigram of codes is fit on code targets only (MLM's reference); the bigram keeps all contexts
    code_unigram = np.bincount(train_ids[~train_first & _code_targets(train_types)], minlength=vocab_size).astype(
        np.float64
    )
    code_uni = unigram_log_probs(code_unigram, eval_ids[pos][codes], k)

    def ppl(logp: np.ndarray) -> float:
        return float(math.exp(-float(logp.mean()))) if len(logp) else float("nan")

    return {
        **result,
        "all": {"unigram": ppl(uni), "bigram": ppl(bi), "targets": int(len(uni))},
        "codes": {"unigram": ppl(code_uni), "bigram": ppl(bi[codes]), "targets": int(codes.sum())},
    }


def reference_for(reference: dict, causal: bool) -> dict[str, float]:
    """The references a model's validation perplexity is read against: for next-token prediction the
    unigram and bigram over all targets (``ref_*``) and over clinical-code targets (``ref_code_*``, beside
    the model's ``val_code_ppl``); for masked-token prediction, whose targets are all codes, the unigram over
    code targets."""
    if "all" not in reference:
        return {}
    if causal:
        return {
            "ref_unigram_ppl": reference["all"]["unigram"],
            "ref_bigram_ppl": reference["all"]["bigram"],
            "ref_code_unigram_ppl": reference["codes"]["unigram"],
            "ref_code_bigram_ppl": reference["codes"]["bigram"],
        }
    return {"ref_unigram_ppl": reference["codes"]["unigram"]}


def for_data_dir(data_dir: Path, manifest: dict) -> dict:
    """The manifest's reference perplexities, or computed now for a folder prepared before they existed."""
    return manifest.get("reference_perplexity") or reference_perplexities(Path(data_dir), manifest)
