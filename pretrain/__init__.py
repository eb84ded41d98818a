"""ehrfm.pretrain: the backbones (Llama, Mamba, Mamba2, BERT as HF classes with EHR embeddings), NTP/MLM and
dense objectives, the DDP / FSDP2 / DeepSpeed engines, sharded checkpoints with exact resume, and HF export
(``ehrfm pretrain``, ``ehrfm export``)."""
