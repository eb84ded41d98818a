"""`ehrfm models`: the backbone presets and their parameter counts next to 003 Table 5."""

from __future__ import annotations

import argparse
import json

from .config import SIZE_NAMES

# 003 Table 5, parameters in millions (Tiny / Small / Medium) for a 4470-token vocabulary; ehrfm's "mini" is not in 003
PAPER_PARAMS_M = {
    "llama": {"tiny": 3.6, "small": 15.1, "medium": 29.8},
    "mamba": {"tiny": 2.0, "small": 12.5, "medium": 22.6},
    "mamba2": {"tiny": 3.2, "small": 14.9, "medium": 25.2},
    "bert": {"tiny": 2.4, "small": 11.2, "medium": 21.7},
    "xlnet": {"tiny": 2.3, "small": 11.8, "medium": 22.8},
    "modernbert": {"tiny": 2.5, "small": 13.1, "medium": 27.7},
}
# 001's comparison set: 001 gives configurations (size "paper001") but no parameter counts
PAPER_PARAMS_M.update(bigbird={}, cehrbert={}, bilstm={})

WHY_COUNTS_DIFFER = (
    "Counts include the pretraining head and the EHR embedding layer (token-type, visit-segment, visit-order "
    "tables, two Time2Vec and the concat projection; BERT also 2048 absolute positions), which 003 does not "
    "describe; 003 counts depend on its 4470-token vocabulary (ours: --vocab-size, default 4470 to compare), on "
    "whether the LM head is tied to the input embeddings (HF defaults here: Mamba and BERT tied, Llama and "
    "Mamba2 untied) and on details 003 leaves open (e.g. BERT's MLM transform layer, Mamba2 state size 128 "
    "and one group). XLNet (lm bias, mask embedding) and ModernBERT (prediction head, decoder bias) are tied. "
    "Without the EHR embeddings, Small and Medium match 003 for every transformer (BERT 11.23/21.74, XLNet "
    "11.76/22.78, ModernBERT 13.05/27.73, Llama 15.07/29.75); 003's Tiny counts match 2 layers "
    "(2.40/2.33/2.53/3.60), not the n_m = 4 of its table, which ehrfm keeps."
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list backbone presets and parameter counts", description=__doc__)
    p.add_argument("--params", action="store_true", help="count parameters of every preset (vs 003 Table 5)")
    p.add_argument("--vocab-size", type=int, default=4470, help="vocabulary size for the counts (003: 4470)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=main)


def sizes_of(config_cls) -> list[str]:
    """The sizes an architecture has presets for, in ``SIZE_NAMES`` order ("paper001": 001's comparison set and EhrMamba only)."""
    return [size for size in SIZE_NAMES if size in config_cls.PRESETS]


def parameter_table(vocab_size: int = 4470) -> list[dict]:
    """One row per (architecture, size): our parameter count (built on the meta device) and 003's."""
    from ehrfm.pretrain.models import ARCHITECTURES, build_meta_model
    from ehrfm.pretrain.models.embeddings import EhrEmbeddings

    rows = []
    for arch, (config_cls, _base_cls, _head_cls) in ARCHITECTURES.items():
        for size in sizes_of(config_cls):
            model = build_meta_model(arch, size, vocab_size=vocab_size)
            config = model.config
            total = sum(p.numel() for p in model.parameters())  # tied tensors are counted once
            ehr = next(m for m in model.modules() if isinstance(m, EhrEmbeddings))
            word = getattr(ehr, "word_embeddings", None)  # BERT keeps its word table inside
            embeddings = sum(p.numel() for p in ehr.parameters()) - (word.weight.numel() if word is not None else 0)
            rows.append(
                {
                    "architecture": arch,
                    "size": size,
                    "hidden_size": config.hidden_size,
                    "layers": config.num_hidden_layers,
                    "params_m": round(total / 1e6, 2),
                    "ehr_embedding_params_m": round(embeddings / 1e6, 2),
                    "paper_params_m": PAPER_PARAMS_M[arch].get(size),
                    "tied_head": bool(config.tie_word_embeddings),
                }
            )
    return rows


def main(args: argparse.Namespace) -> int:
    from ehrfm.pretrain.models import ARCHITECTURES

    if not args.params:
        for arch, (config_cls, _, head_cls) in ARCHITECTURES.items():
            print(
                f"{arch:10s} {config_cls.model_type:15s} {head_cls.__name__:24s} sizes: {', '.join(sizes_of(config_cls))}"
            )
        return 0
    rows = parameter_table(args.vocab_size)
    if args.json:
        print(json.dumps({"vocab_size": args.vocab_size, "rows": rows, "note": WHY_COUNTS_DIFFER}, indent=2))
        return 0
    print(f"parameters (M) at vocab_size={args.vocab_size}; ehr-emb = EHR attribute embeddings (without the")
    print("concept table) included in 'ours'; tied = LM head shares the concept table; 003 = its Table 5")
    print(
        f"{'model':10s} {'size':8s} {'d_m':>4s} {'layers':>6s} {'ours':>7s} {'(ehr-emb)':>9s} {'tied':>5s} {'003':>6s}"
    )
    for r in rows:
        print(
            f"{r['architecture']:10s} {r['size']:8s} {r['hidden_size']:4d} {r['layers']:6d} {r['params_m']:7.2f} "
            f"{r['ehr_embedding_params_m']:9.2f} {'yes' if r['tied_head'] else 'no':>5s} "
            f"{'-' if r['paper_params_m'] is None else format(r['paper_params_m'], '6.1f'):>6s}"
        )
    print("\nwhy they differ: " + WHY_COUNTS_DIFFER)
    return 0
