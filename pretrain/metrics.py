"""What pretraining measures: FLOPs per token and device peaks (for MFU), and the one-line validation summary.
Records are written by :class:`ehrfm.metrics_log.MetricsLogger` and read back by ``ehrfm.metrics_log.read_metrics``.

JSONL record of a training step (units in the names where not obvious): step, loss, lr, grad_norm,
real_tokens and padded_tokens (summed over ranks and micro-steps of this step), tokens_per_s (real tokens),
step_time_s, peak_memory_mb (CUDA max allocated, else the process's max RSS), mfu (GPU only), plus
auxiliary-loss terms. Validation records carry ``"split": "val"``, val_loss and val_ppl.
"""

from __future__ import annotations

import math
import re

import torch

# dense bf16 peak FLOP/s per device (the tensor-core number vendors quote, without sparsity), matched as whole
# words of torch.cuda.get_device_name() in this order ("L40" is not "L4", "GH200" is not "H200")
PEAK_FLOPS = {
    "B200": 2250e12,
    "GH200": 989e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,
}


def flops_per_token(model: torch.nn.Module, context_length: int) -> float:
    """Training FLOPs per token (PaLM appendix B convention, forward + backward = 3x forward):

    * 6 N over the N parameters used in matmuls: every parameter except the input embedding tables (lookups),
      plus the output projection (the LM head, H x V, counted once whether or not it is tied to the input);
    * attention scores and values: 12 * layers * hidden * T for bidirectional attention (BERT), half that for
      causal attention (Llama: on average a token attends to T / 2 positions); ModernBERT's local layers see
      at most 2 w + 1 keys; XLNet's permutation LM runs two streams (see below); BigBird's block-sparse
      attention sees at most (3 sliding + 2 global + r random) blocks. Mamba and the Bi-LSTM have no attention
      term (the LSTM's recurrent weights are matmul parameters, counted in N)."""
    config = model.config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = head.weight if head is not None else None
    n = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embeddings" not in name and "embed_tokens" not in name and p is not head_weight
    )
    if head_weight is not None:
        n += head_weight.numel()
    flops = 6.0 * n
    if config.model_type in ("ehr_bert", "ehr_cehrbert"):
        flops += 12.0 * config.num_hidden_layers * config.hidden_size * context_length
    elif config.model_type == "ehr_bigbird":  # block sparse: each query block sees (5 + 2r) blocks at most
        seen = min(context_length, (5 + 2 * config.num_random_blocks) * config.block_size)
        flops += 12.0 * config.num_hidden_layers * config.hidden_size * seen
    elif config.model_type == "ehr_llama":
        flops += 6.0 * config.num_hidden_layers * config.hidden_size * context_length
    elif config.model_type == "ehr_xlnet":
        # permutation LM runs a second (query) stream through q, o and the feed-forward; the relative position
        # projection r sees 2 T offsets. Attention per stream: 12 for content scores and values + 12 for the
        # position scores over 2 T offsets; + 12 for the identity target mapping's two einsums.
        again = (".rel_attn.q", ".rel_attn.o", ".rel_attn.r", ".ff.layer_")
        flops += 6.0 * sum(p.numel() for name, p in model.named_parameters() if any(k in name for k in again))
        flops += (2 * 24.0 + 12.0) * config.num_hidden_layers * config.hidden_size * context_length
    elif config.model_type == "ehr_modernbert":  # local layers attend to a window of 2 w + 1 keys
        local = sum(kind == "sliding_attention" for kind in config.layer_types)
        keys = (config.num_hidden_layers - local) * context_length
        keys += local * min(context_length, 2 * config.sliding_window + 1)
        flops += 12.0 * config.hidden_size * keys
    return flops


def peak_flops(override: float = 0.0, device_name: str | None = None) -> float:
    """Per-device peak FLOP/s: the override, else a lookup of the GPU name; 0 on CPU or an unknown GPU (no MFU;
    set train.peak_flops)."""
    if override > 0:
        return override
    if device_name is None:
        if not torch.cuda.is_available():
            return 0.0
        device_name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return value
    return 0.0


def validation_summary(record: dict) -> str:
    """One line of a validation record: the model's perplexities beside the count-model references, e.g.
    ``val_ppl 4.10 (unigram 284.87, bigram 5.63); codes 6.02 (unigram 434.11, bigram 7.58)``."""

    def refs(keys: tuple[str, str]) -> str:
        shown = [f"{name} {record[k]:.2f}" for name, k in zip(("unigram", "bigram"), keys) if k in record]
        return f" ({', '.join(shown)})" if shown else ""

    text = f"val_ppl {record['val_ppl']:.2f}" + refs(("ref_unigram_ppl", "ref_bigram_ppl"))
    if "ref_code_unigram_ppl" in record and math.isfinite(record.get("val_code_ppl", float("nan"))):
        text += f"; codes {record['val_code_ppl']:.2f}" + refs(("ref_code_unigram_ppl", "ref_code_bigram_ppl"))
    return text
