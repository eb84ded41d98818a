"""ehrfm.finetune: the finetuning stage (per-task heads, MPF, ALFIA + LoRA), its regularizers (NEFTune, ANAA),
evaluation with bootstrap CIs and the GBDT baselines.

Reads only exported HF folders (``ehrfm export``: config.json, model.safetensors, tokenizer files,
ehrfm_export.json) and prepared data folders (``ehrfm prepare``).

* ``ehrfm finetune``  -- :mod:`.train`: methods per-task / mpf / alfia (:mod:`.heads`, :mod:`.model`), --freeze,
  --lora (peft), --train-fraction, pos_weight, NEFTune and ANAA (:mod:`.regularizers`, :mod:`.anaa`), early
  stopping on validation AUPRC, best state saved.
* ``ehrfm evaluate``  -- :mod:`.evaluate` + :mod:`.metrics`: AUROC, AUPRC, Brier, best F1/F2 with thresholds,
  prevalence, n, 95% CIs from patient-level bootstrap; MEDS-label-schema predictions, plots, report.
* ``ehrfm baseline`` / ``ehrfm embed`` -- :mod:`.baselines`: code-count GBDT / logistic regression, ALFIA-boost.
* MPF prompt and task batches -- :mod:`.data` (what "last token" means after a mid-visit cut is documented there).
"""
