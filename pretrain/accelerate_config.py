"""Read a user's ``accelerate config`` YAML onto a PretrainConfig: every field is mapped, accepted or refused.

ehrfm takes Accelerate's process state (ranks, devices) but wraps the model itself (``parallel.py``), so an
Accelerate YAML is not handed to Accelerate: each of its fields falls in one of four groups, and no field is
dropped silently.

* mapped onto the config: ``distributed_type`` (-> ``train.strategy``), ``mixed_precision`` (no / bf16),
  ``gradient_accumulation_steps``, ``dynamo_config.dynamo_backend`` (NO / INDUCTOR -> ``train.compile``),
  ``fsdp_config.fsdp_activation_checkpointing``, and in ``deepspeed_config``: ``deepspeed_config_file``,
  ``zero_stage``, ``gradient_accumulation_steps``, ``gradient_clipping``, ``offload_optimizer_device``;
* the launcher's business (process counts, addresses, machine rank: torchrun / srun / ``ehrfm launch`` set
  them): accepted and not used;
* settings ehrfm fixes, accepted when they ask for what ehrfm does: FSDP2 ``fully_shard`` of every block
  (transformer-based wrap, full shard, reshard after forward, no parameter offload), sharded (DCP) checkpoints
  and a full-weight export, ZeRO-3 parameters without offload;
* everything else, and any fixed setting asking for something else, is a :class:`ConfigError` that names the
  file and the fields.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ehrfm.config import ConfigError, read_yaml_mapping

log = logging.getLogger("ehrfm.pretrain")

LAUNCHER_FIELDS = frozenset(
    {
        "compute_environment",
        "num_processes",
        "num_machines",
        "machine_rank",
        "main_process_ip",
        "main_process_port",
        "main_training_function",
        "rdzv_backend",
        "same_network",
        "use_cpu",
        "gpu_ids",
        "debug",
        "enable_cpu_affinity",
        "tpu_env",
        "tpu_use_cluster",
        "tpu_use_sudo",
        "downcast_bf16",
    }
)
TOP_FIELDS = (
    frozenset(
        {
            "distributed_type",
            "mixed_precision",
            "gradient_accumulation_steps",
            "dynamo_config",
            "fsdp_config",
            "deepspeed_config",
        }
    )
    | LAUNCHER_FIELDS
)

# fsdp_config field -> the values that describe what ehrfm does (None: any value; ehrfm decides itself)
FSDP_FIXED = {
    "fsdp_version": {1, 2},  # ehrfm always uses FSDP2 (fully_shard)
    "fsdp_auto_wrap_policy": {"TRANSFORMER_BASED_WRAP"},  # each transformer/SSM block is one FSDP unit
    "fsdp_transformer_layer_cls_to_wrap": None,  # ehrfm knows its own block classes
    "fsdp_sharding_strategy": {"FULL_SHARD", 1},
    "fsdp_reshard_after_forward": {True, "FULL_SHARD"},
    "fsdp_offload_params": {False},
    "fsdp_state_dict_type": {"SHARDED_STATE_DICT", "FULL_STATE_DICT"},  # checkpoints are DCP shards; export is full
    "fsdp_backward_prefetch": None,  # FSDP2 prefetches by itself
    "fsdp_forward_prefetch": None,
    "fsdp_use_orig_params": None,  # FSDP2 always keeps the original parameters
    "fsdp_sync_module_states": None,  # every rank builds the same weights from the same seed
    "fsdp_cpu_ram_efficient_loading": None,
    "fsdp_min_num_params": None,
}
DEEPSPEED_FIXED = {
    "offload_param_device": {"none", None},  # ZeRO-3 parameter offload is not supported
    "zero3_init_flag": None,
    "zero3_save_16bit_model": None,  # checkpoints keep the fp32 masters either way
    "deepspeed_multinode_launcher": None,  # the launcher's business
    "deepspeed_hostfile": None,
}
DEEPSPEED_MAPPED = {
    "deepspeed_config_file",
    "zero_stage",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "offload_optimizer_device",
}


def _check_section(path, section: str, values: dict, mapped: set, fixed: dict) -> None:
    unknown = sorted(set(values) - mapped - set(fixed))
    if unknown:
        raise ConfigError(
            f"{path}: {section} field(s) {', '.join(unknown)} are not used by ehrfm; remove them "
            f"(mapped: {', '.join(sorted(mapped)) or 'none'}; see pretrain/accelerate_config.py)"
        )
    wrong = [
        f"{key}={values[key]!r} (ehrfm supports {sorted(map(str, fixed[key]))})"
        for key in sorted(values)
        if key in fixed and fixed[key] is not None and values[key] not in fixed[key]
    ]
    if wrong:
        raise ConfigError(f"{path}: {section} asks for what ehrfm does not do: {'; '.join(wrong)}")


def apply_accelerate_config(cfg, path: str | os.PathLike) -> None:
    """Map the ``accelerate config`` YAML at ``path`` onto ``cfg`` (a PretrainConfig, in place); see the
    module docstring for what each field does. Raises :class:`ConfigError` naming the file and fields."""
    data = read_yaml_mapping(path, "accelerate config")
    _check_section(path, "top-level", data, set(TOP_FIELDS), {})
    kind = str(data.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        cfg.train.strategy = "fsdp"
    elif kind == "DEEPSPEED":
        cfg.train.strategy = f"deepspeed-zero{_apply_deepspeed(cfg, path, data.get('deepspeed_config') or {})}"
    elif kind in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU"):
        cfg.train.strategy = "ddp"
    else:
        raise ConfigError(
            f"{path}: distributed_type {kind} is not supported (use NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED)"
        )
    fsdp = data.get("fsdp_config") or {}
    _check_section(path, "fsdp_config", fsdp, {"fsdp_activation_checkpointing"}, FSDP_FIXED)
    if "fsdp_activation_checkpointing" in fsdp:
        cfg.train.activation_checkpointing = bool(fsdp["fsdp_activation_checkpointing"])
    precision = data.get("mixed_precision")
    if precision not in (None, "no", "bf16"):
        raise ConfigError(f"{path}: mixed_precision {precision!r} is not supported (use 'no' or bf16)")
    if precision:
        cfg.train.precision = "bf16" if precision == "bf16" else "fp32"
    if data.get("gradient_accumulation_steps"):
        cfg.train.grad_accum = int(data["gradient_accumulation_steps"])
    dynamo = data.get("dynamo_config") or {}
    _check_section(path, "dynamo_config", dynamo, {"dynamo_backend"}, {})
    backend = str(dynamo.get("dynamo_backend", "NO")).upper()
    if backend not in ("NO", "INDUCTOR"):
        raise ConfigError(f"{path}: dynamo_backend {backend} is not supported (use NO or INDUCTOR)")
    if "dynamo_backend" in dynamo:
        cfg.train.compile = backend == "INDUCTOR"
    ignored = sorted(set(data) & LAUNCHER_FIELDS)
    if ignored:
        log.info("accelerate config %s: %s left to the launcher (torchrun / srun)", path, ", ".join(ignored))


def _apply_deepspeed(cfg, path, ds: dict) -> int:
    """Apply ``deepspeed_config``; returns the ZeRO stage (2 or 3)."""
    _check_section(path, "deepspeed_config", ds, DEEPSPEED_MAPPED, DEEPSPEED_FIXED)
    if ds.get("deepspeed_config_file"):
        beside = sorted(set(ds) & (DEEPSPEED_MAPPED - {"deepspeed_config_file"}))
        if beside:
            raise ConfigError(
                f"{path}: deepspeed_config sets {', '.join(beside)} beside deepspeed_config_file; "
                "set them in the DeepSpeed JSON"
            )
        cfg.deepspeed.config_file = str(ds["deepspeed_config_file"])
        stage = json.loads(Path(ds["deepspeed_config_file"]).read_text()).get("zero_optimization", {}).get("stage", 2)
    else:
        stage = int(ds.get("zero_stage", 2))
        if ds.get("gradient_accumulation_steps") not in (None, "auto"):
            cfg.train.grad_accum = int(ds["gradient_accumulation_steps"])
        if ds.get("gradient_clipping") not in (None, "auto"):
            cfg.optim.grad_clip = float(ds["gradient_clipping"])
        cfg.deepspeed.offload_optimizer = ds.get("offload_optimizer_device", "none") not in ("none", None)
    if int(stage) not in (2, 3):
        raise ConfigError(f"{path}: DeepSpeed ZeRO stage {stage} is not supported; use 2 or 3")
    return int(stage)
