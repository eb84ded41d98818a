"""End to end through the CLI: finetune -> evaluate -> files exist and parse; ANAA only while finetuning;
early stopping; baselines and ALFIA-boost in the same report format."""

import json
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

from ehrfm.cli import main
from ehrfm.finetune.model import FinetuneModel
from ehrfm.finetune.regularizers import hf_model

PRED_SCHEMA = {
    "subject_id": pl.Int64,
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean,
    "predicted_boolean_value": pl.Boolean,
    "predicted_boolean_probability": pl.Float32,  # meds-evaluation's PredictionSchema
}


def _check_eval_folder(folder, tasks, n_boot):
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n_bootstrap"] == n_boot and set(metrics["tasks"]) == set(tasks)
    for task in tasks:
        m = metrics["tasks"][task]
        for key in (
            "auroc",
            "auprc",
            "brier",
            "best_f1",
            "best_f1_threshold",
            "best_f2",
            "best_f2_threshold",
            "prevalence",
            "n",
        ):
            assert {"value", "ci_low", "ci_high", "n_valid"} <= set(m[key]), key
        assert m["auprc"]["ci_low"] <= m["auprc"]["value"] <= m["auprc"]["ci_high"]
        preds = pl.read_parquet(folder / task / "predictions.parquet")
        assert dict(preds.schema) == PRED_SCHEMA
        # the label part is valid MEDS (meds-evaluation adds exactly the two predicted_* columns)
        meds.LabelSchema.validate(
            pq.read_table(folder / task / "predictions.parquet")
            .select(["subject_id", "prediction_time", "boolean_value"])
            .schema
        )
        assert preds.height == m["n"]["value"]
        assert preds["predicted_boolean_probability"].is_between(0, 1).all()
        for plot in ("roc.png", "pr.png", "calibration.png"):
            assert (folder / task / plot).read_bytes()[:4] == b"\x89PNG"
    report = (folder / "report.md").read_text()
    assert all(f"| {t} |" in report for t in tasks) and "auprc" in report
    return metrics


def test_per_task_finetune_then_evaluate(llama_export, ft_data, tasks, tmp_path, capsys):
    ft, ev = tmp_path / "ft", tmp_path / "eval"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(llama_export),
                "--data",
                str(ft_data),
                "--out",
                str(ft),
                "--method",
                "per-task",
                "--epochs",
                "2",
                "--lr",
                "1e-3",
                "--context-length",
                "32",
                "--pos-weight",
                "auto",
                "dropout=0.0",
            ]
        )
        == 0
    )
    meta = json.loads((ft / "finetune.json").read_text())
    assert meta["method"] == "per-task" and meta["tasks"] == tasks and len(meta["history"]) == 2
    assert (ft / "backbone" / "model.safetensors").exists() and (ft / "heads.safetensors").exists()
    assert (ft / "ehrfm_vocab.json").exists() and (ft / "finetune.yaml").exists()
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(ft),
                "--data",
                str(ft_data),
                "--split",
                "test",
                "--out",
                str(ev),
                "--bootstrap",
                "100",
            ]
        )
        == 0
    )
    _check_eval_folder(ev, tasks, 100)
    # test labels are scored row for row
    preds = pl.read_parquet(ev / tasks[0] / "predictions.parquet")
    labels = pl.read_parquet(ft_data / "labels" / tasks[0] / "test.parquet")
    assert preds.select("subject_id", "prediction_time", "boolean_value").equals(labels)
    assert "| any_visit_90d |" in capsys.readouterr().out
    # 000 section 5.8 diagnostics of the finetuned model, as PNG
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(ft),
                "--data",
                str(ft_data),
                "--out",
                str(tmp_path / "eval2"),
                "--bootstrap",
                "10",
                "--attention-plots",
                "4",
            ]
        )
        == 0
    )
    pngs = sorted(p.name for p in (tmp_path / "eval2" / "attention").glob("*.png"))
    assert len(pngs) == 2 and all(name.startswith("ft_") for name in pngs)
    for name in pngs:
        assert (tmp_path / "eval2" / "attention" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_early_stopping_keeps_the_best_epoch(llama_export, ft_data, tasks, tmp_path):
    from ehrfm.finetune.config import FinetuneConfig
    from ehrfm.finetune.train import finetune

    cfg = FinetuneConfig(method="mpf", context_length=24, epochs=10, patience=2, learning_rate=0.0, tasks=tasks)
    meta = finetune(llama_export, ft_data, tmp_path / "ft", cfg)
    # nothing can improve at lr 0: epoch 0 stays best and training stops after `patience` more epochs
    assert meta["best_epoch"] == 0 and len(meta["history"]) == 3
    assert meta["best_val_auprc"] == meta["history"][0]["val_auprc"]


def test_anaa_flag_swaps_attention_during_finetuning_only(llama_export, ft_data, tmp_path, monkeypatch):
    seen = []
    original = FinetuneModel.forward

    def spy(self, batch):
        seen.append((self.training, hf_model(self.backbone).config._attn_implementation))
        return original(self, batch)

    monkeypatch.setattr(FinetuneModel, "forward", spy)
    ft = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(llama_export),
                "--data",
                str(ft_data),
                "--out",
                str(ft),
                "--method",
                "mpf",
                "--epochs",
                "1",
                "--context-length",
                "24",
                "--anaa",
                "--anaa-sigma-eh",
                "0.5",
            ]
        )
        == 0
    )
    assert {impl for training, impl in seen if training} == {"ehrfm_anaa"}
    meta = json.loads((ft / "finetune.json").read_text())
    assert meta["anaa"]["sigma_eh"] == 0.5 and meta["attn_implementation"] != "ehrfm_anaa"
    assert "ehrfm_anaa" not in (ft / "backbone" / "config.json").read_text()
    # without --anaa: never swapped
    seen.clear()
    assert (
        main(
            [
                "finetune",
                "--model",
                str(llama_export),
                "--data",
                str(ft_data),
                "--out",
                str(tmp_path / "plain"),
                "--method",
                "mpf",
                "--epochs",
                "1",
                "--context-length",
                "24",
            ]
        )
        == 0
    )
    assert seen and all(impl != "ehrfm_anaa" for _, impl in seen)
    # evaluation of the ANAA model uses ANAA's deterministic inference form (eq. 10), then restores attention
    seen.clear()
    assert (
        main(
            ["evaluate", "--model", str(ft), "--data", str(ft_data), "--out", str(tmp_path / "ev"), "--bootstrap", "20"]
        )
        == 0
    )
    assert seen and all(not training and impl == "ehrfm_anaa" for training, impl in seen)


@pytest.mark.slow
def test_mpf_alfia_lora_embed_and_baselines(llama_export, ft_data, tasks, tmp_path):
    for method, extra in (("mpf", []), ("alfia", ["--lora", "--lora-save", "adapter"])):
        ft = tmp_path / f"ft_{method}"
        assert (
            main(
                [
                    "finetune",
                    "--model",
                    str(llama_export),
                    "--data",
                    str(ft_data),
                    "--out",
                    str(ft),
                    "--method",
                    method,
                    "--epochs",
                    "1",
                    "--lr",
                    "1e-3",
                    "--context-length",
                    "32",
                    *extra,
                ]
            )
            == 0
        )
        assert (
            main(["evaluate", "--model", str(ft), "--data", str(ft_data), "--out", str(tmp_path / f"ev_{method}")]) == 0
        )
        _check_eval_folder(tmp_path / f"ev_{method}", tasks, 1000)
    meta = json.loads((tmp_path / "ft_alfia" / "finetune.json").read_text())
    assert meta["num_fuse"] == 4 and meta["lora"]
    emb = tmp_path / "emb"
    assert main(["embed", "--model", str(tmp_path / "ft_alfia"), "--data", str(ft_data), "--out", str(emb)]) == 0
    frame = pl.read_parquet(emb / tasks[0] / "test.parquet")
    assert frame["embedding"].list.len().unique().to_list() == [32]
    assert frame["layer_weights"].list.len().unique().to_list() == [4]
    for model, extra in (("xgboost", []), ("logreg", []), ("lightgbm", ["--embeddings", str(emb)])):
        out = tmp_path / f"base_{model}"
        assert (
            main(["baseline", "--model", model, "--data", str(ft_data), "--out", str(out), "--bootstrap", "50", *extra])
            == 0
        )
        metrics = _check_eval_folder(out, tasks, 50)
        assert metrics["method"] == f"baseline:{model}"
        suffix = {"xgboost": ".xgb.json", "logreg": ".logreg.json", "lightgbm": ".lgbm.txt"}[model]
        saved = out / "models" / f"{tasks[0]}{suffix}"
        assert saved.exists() and not list((out / "models").glob("*.pkl"))  # nothing that unpickles
        if model == "xgboost":
            from xgboost import XGBClassifier

            XGBClassifier().load_model(str(saved))  # loads natively
        if model == "lightgbm":
            import lightgbm

            assert lightgbm.Booster(model_file=str(saved)).num_trees() > 0


def test_count_features_exclude_special_tokens_and_history_after_prediction(ft_data, tasks):
    import numpy as np

    from ehrfm.data_shards.examples import TaskExamples
    from ehrfm.data_shards.vocab import Vocabulary
    from ehrfm.finetune.baselines import count_features

    vocab = Vocabulary.load(ft_data / "tokenizer")
    x, labels = count_features(ft_data, tasks[0], "test", len(vocab))
    ex = TaskExamples(ft_data, tasks[0], "test")
    sample, _ = ex[3]
    row = x[3].toarray()[0]
    special = [vocab.ids[t] for t in ("[CLS]", "[VS]", "[VE]", "[REG]")]
    assert (row[special] == 0).all()
    code = int(sample["input_ids"][sample["type_ids"] >= 7][0])
    assert row[code] == (sample["input_ids"] == code).sum()
    visits = sample["visit_orders"] > 0
    np.testing.assert_allclose(row[-2:], sample["ages"][visits][[0, -1]], rtol=1e-6)
    assert labels.height == x.shape[0]


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", [("bert", "mpf"), ("mamba", "alfia"), ("mamba2", "per-task")])
def test_other_backbones_finetune_and_evaluate(arch, method, ft_data, export_factory, tasks, tmp_path):
    export = export_factory(tmp_path / arch, ft_data, arch)
    ft = tmp_path / "ft"
    extra = ["--lora"] if method == "alfia" else []
    assert (
        main(
            [
                "finetune",
                "--model",
                str(export),
                "--data",
                str(ft_data),
                "--out",
                str(ft),
                "--method",
                method,
                "--epochs",
                "1",
                "--context-length",
                "24",
                *extra,
            ]
        )
        == 0
    )
    meta = json.loads((ft / "finetune.json").read_text())
    assert meta["pooling"] == ("first" if arch == "bert" else "last")
    assert (
        main(
            ["evaluate", "--model", str(ft), "--data", str(ft_data), "--out", str(tmp_path / "ev"), "--bootstrap", "10"]
        )
        == 0
    )
    _check_eval_folder(tmp_path / "ev", tasks, 10)


def test_baseline_train_fraction_keeps_the_patients_finetuning_keeps(ft_data, tasks, tmp_path, monkeypatch):
    """`ehrfm baseline --train-fraction F --seed S` fits on exactly the label rows `ehrfm finetune` trains on
    with the same tasks, fraction and seed (the pretraining-benefit study compares them on the same patients)."""
    import numpy as np

    import ehrfm.finetune.baselines as baselines
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.prepare import prepare
    from ehrfm.data_shards.synthea import generate_cohort

    cfg = PrepareConfig(
        format="fhir", tasks=[str(Path(__file__).with_name("tasks_synthea.yaml"))]
    )  # most patients in finetune
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test, cfg.splits.val_fraction, cfg.splits.seed = (
        0.1,
        0.8,
        0.1,
        0.0,
        1,
    )
    ft_data = tmp_path / "data"
    prepare(generate_cohort(6, seed=11, age="55-90", threads=1), ft_data, cfg, progress=False)
    from ehrfm.finetune.data import FinetuneDataset, FinetuneInputError
    from ehrfm.seeding import derive_seed

    fitted = []
    real = baselines.make_model

    class Spy:
        def __init__(self, model):
            self.model = model

        def fit(self, x, y):
            fitted.append(np.asarray(y))
            return self.model.fit(x, y)

        def __getattr__(self, name):
            return getattr(self.model, name)

        def __getitem__(self, index):  # the logreg pipeline's steps, read when the model is saved
            return self.model[index]

    monkeypatch.setattr(baselines, "make_model", lambda name, seed: Spy(real(name, seed)))
    seed, fraction = 3, 0.5
    dataset = FinetuneDataset(ft_data, tasks, "finetune", 32, None, fraction, derive_seed(seed, "train_fraction"))
    try:
        baselines.run_baseline(
            "logreg", ft_data, tmp_path / "base", tasks=tasks, n_boot=5, seed=seed, train_fraction=fraction
        )
    except FinetuneInputError as err:  # a fraction of 6 patients may leave one class: then finetuning refuses too
        assert err.task in tasks
        y = dataset.labels()[dataset.task_indices() == tasks.index(err.task)]
        assert y.all() or not y.any()
        pytest.fail(f"the fixture cohort left one class at fraction {fraction}: {err}")
    assert [len(y) for y in fitted] == [int((dataset.task_indices() == t).sum()) for t in range(len(tasks))]
    for t, y in enumerate(fitted):
        assert (np.sort(y) == np.sort(dataset.labels()[dataset.task_indices() == t].astype(int))).all()
    full = FinetuneDataset(ft_data, tasks, "finetune", 32, None)
    assert len(dataset) < len(full)
