"""Arrow results: schema + metadata, per-cell aggregation, atomic writes, readable by pandas/polars/DuckDB."""

from __future__ import annotations

import json
import math
import os
import re

import pyarrow as pa
import pytest
from result_rows import cfg as _cfg
from result_rows import final as _final
from result_rows import reviewer_rows as _reviewer_rows

from orchestrator import results as R


def _rows():
    rows = [
        R.trial_row(
            _cfg(stage="search", seed=1, params={"lr": 0.01, "csc": True}),
            {"val_acc": 40.0, "test_images_read": 0},
            status="FINISHED",
            tune_trial_id="s1",
        ),
        R.trial_row(
            _cfg(stage="search", seed=1, params={"lr": 0.1, "csc": False}, number=1),
            {"val_acc": 50.0, "test_images_read": 0},
            status="FINISHED",
            tune_trial_id="s2",
        ),
    ]
    for seed, acc in ((1, 60.0), (2, 70.0), (3, 80.0)):
        rows.append(
            R.trial_row(
                _cfg(seed=seed, params={"lr": 0.1, "csc": False}, number=1),
                {"val_acc": 55.0, "test_acc": acc, "epochs_run": 2, "test_images_read": 100},
                status="FINISHED",
                tune_trial_id=f"f{seed}",
                mlflow_run_id=f"r{seed}",
            )
        )
    rows.append(
        R.trial_row(
            _cfg(seed=4),
            {"error_class": "nan_loss", "error_message": "loss is NaN"},
            status="ERROR",
            tune_trial_id="f4",
        )
    )
    return rows


def test_trials_schema_and_metadata(tmp_path):
    R.write_results(tmp_path, _rows(), {"spec_hash": "abc", "sweep": "t"})
    t = R.read_table(tmp_path / R.TRIALS_FILE)
    assert t.num_rows == 6
    s = t.schema
    assert s.field("shots").type == pa.int16() and s.field("seed").type == pa.int64()
    assert s.field("param_lr").type == pa.float64() and s.field("param_csc").type == pa.bool_()
    assert s.field("finished_at").type == pa.timestamp("ms", tz="UTC")
    for col in (
        "cell_id",
        "params_json",
        "val_acc",
        "test_acc",
        "status",
        "error_class",
        "error_message",
        "node_id",
        "tune_trial_id",
        "optuna_trial_number",
        "mlflow_run_id",
        "config_hash",
        "epochs_run",
        "wall_time_s",
    ):
        assert col in s.names
    md = s.metadata
    assert md[b"schema_version"] == b"2" and md[b"spec_hash"] == b"abc"
    rows = t.to_pylist()
    assert {r["sweep"] for r in rows} == {"t"} and {r["backbone"] for r in rows} == {"promptsweep-mini:promptsweep"}
    assert {r["status"] for r in rows} == {"FINISHED", "ERROR"}
    for name in s.names:  # every column says what it is; accuracies say they are percent
        assert s.field(name).metadata[b"description"], name
    assert s.field("test_acc").metadata[b"unit"] == b"%" and s.field("wall_time_s").metadata[b"unit"] == b"s"
    assert b"hyperparameter lr" in s.field("param_lr").metadata[b"description"]
    assert "pyarrow" in json.loads(md[b"package_versions"])
    err = [r for r in t.to_pylist() if r["status"] == "ERROR"][0]
    assert err["error_class"] == "nan_loss" and err["test_acc"] is None


def test_the_largest_accepted_values_are_written_and_read_back(tmp_path):
    """Every integer the spec and TrainConfig accept fits its column: a trial with the largest ones keeps its row."""
    from methods.base import TrainConfig
    from orchestrator.spec import N_TRIALS_MAX, SEED_MAX, SHOTS_MAX

    cfg = _cfg(seed=SEED_MAX, number=N_TRIALS_MAX - 1)
    cfg["request"]["shots"] = SHOTS_MAX
    epochs = TrainConfig.model_fields["epochs"].metadata
    max_epochs = next(m.le for m in epochs if getattr(m, "le", None) is not None)
    row = R.trial_row(
        cfg, {"test_acc": 1.0, "epochs_run": max_epochs, "test_images_read": 1}, status="FINISHED", tune_trial_id="big"
    )
    R.write_results(tmp_path, [row], {"spec_hash": "abc", "sweep": "t"})
    back = R.read_table(tmp_path / R.TRIALS_FILE).to_pylist()[0]
    assert (back["shots"], back["seed"], back["optuna_trial_number"], back["epochs_run"]) == (
        SHOTS_MAX,
        SEED_MAX,
        N_TRIALS_MAX - 1,
        max_epochs,
    )


def test_cells_mean_std_over_successful_final_rows(tmp_path):
    R.write_results(tmp_path, _rows(), {"spec_hash": "abc"})
    c = R.read_table(tmp_path / R.CELLS_FILE).to_pylist()
    assert len(c) == 1
    c = c[0]
    assert c["n"] == 3 and c["n_failed"] == 1
    assert c["test_acc_mean"] == pytest.approx(70.0) and c["test_acc_std"] == pytest.approx(10.0)
    assert c["search_trials"] == 2 and c["search_best_val"] == 50.0
    assert json.loads(c["params_json"]) == {"csc": False, "lr": 0.1}


def test_base2novel_hm_is_from_seed_means(tmp_path):
    rows = []
    for seed, (b, n) in enumerate(((80.0, 40.0), (60.0, 80.0)), start=1):
        rows.append(
            R.trial_row(
                _cfg(cell="base2novel.coop.digits.2shot", seed=seed, protocol="base2novel"),
                {"base_acc": b, "novel_acc": n, "hm": R.harmonic_mean(b, n)},
                status="FINISHED",
                tune_trial_id=str(seed),
            )
        )
    c = R.cells_table(rows, {}).to_pylist()[0]
    assert c["hm_mean"] == pytest.approx(R.harmonic_mean(70.0, 60.0))
    assert c["hm_mean"] != pytest.approx((R.harmonic_mean(80, 40) + R.harmonic_mean(60, 80)) / 2)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    R.write_results(tmp_path, _rows(), {"spec_hash": "abc"})
    before = (tmp_path / R.TRIALS_FILE).read_bytes()

    class Boom(RuntimeError):
        pass

    def bad_new_file(*a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(R.ipc, "new_file", bad_new_file)
    with pytest.raises(Boom):
        R.write_results(tmp_path, _rows()[:2], {"spec_hash": "changed"})
    assert (tmp_path / R.TRIALS_FILE).read_bytes() == before
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_files_open_in_pandas_polars_duckdb(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    R.write_results(tmp_path, _rows(), {"spec_hash": "abc"})
    p, q = tmp_path / R.TRIALS_FILE, tmp_path / "trials.parquet"
    assert len(pd.read_feather(p)) == len(pd.read_parquet(q)) == 6
    assert pl.read_ipc(p).height == pl.read_parquet(q).height == 6
    assert pd.read_parquet(q).equals(pd.read_feather(p))
    assert pl.read_parquet(tmp_path / "cells.parquet").equals(pl.read_ipc(tmp_path / R.CELLS_FILE))
    path = str(q).replace("'", "''")
    assert duckdb.sql(f"select count(*) from '{path}' where stage = 'final'").fetchall()[0][0] == 4
    assert pq_metadata(q)[b"spec_hash"] == b"abc"


def pq_metadata(path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_schema(path).metadata


def test_the_readme_lines_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's pandas / polars / DuckDB block, executed verbatim in a folder holding results/demo/."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "duckdb" in b]
    assert len(blocks) == 1, "the README has one Python block reading the results"
    epochs = [R.epoch_row(_cfg(seed=1), {"epoch": 1, "train_loss": 1.0, "time_total_s": 2.0}, "f1")]
    R.write_results(tmp_path / "results" / "demo", _rows(), {"spec_hash": "abc"}, epochs=epochs)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert len(scope["trials"]) == 6 and scope["cells"].height == 1
    printed = capsys.readouterr().out
    assert "coop" in printed and "70.0" in printed  # the final seeds' mean of the one cell
    assert len(scope["epochs"]) == 1 and "test accuracy" in printed and "b'%'" in printed


def test_a_schema_1_ledger_reads_as_schema_2_rows(tmp_path):
    """A sweep started before schema 2 (Tune's TERMINATED, no backbone column) resumes from its trials.arrow."""
    import pyarrow.feather as feather

    R.write_results(tmp_path, _rows(), {"spec_hash": "abc", "sweep": "t"})
    t = R.read_table(tmp_path / R.TRIALS_FILE)
    old = t.drop_columns(["sweep", "backbone"]).set_column(
        t.schema.get_field_index("status") - 2,
        "status",
        pa.array(["TERMINATED" if s == "FINISHED" else s for s in t.column("status").to_pylist()]),
    )
    feather.write_feather(old, tmp_path / "old.arrow")
    rows = R.read_rows(tmp_path / "old.arrow")
    assert sorted(r["status"] for r in rows) == ["ERROR"] + ["FINISHED"] * 5
    assert R.cells_table(rows, {}).to_pylist()[0]["n"] == 3


def test_epochs_table_one_row_per_trial_and_epoch(tmp_path):
    cfg = _cfg(seed=2)
    epochs = [
        R.epoch_row(
            cfg, {"epoch": e, "train_loss": 2.0 / e, "val_acc": 10.0 * e, "lr": 0.002, "time_total_s": 1.5 * e}, "f2"
        )
        for e in (2, 1)
    ]
    assert R.epoch_row(cfg, {"final": True, "epoch": 2, "test_acc": 50.0}, "f2") is None
    R.write_results(tmp_path, _rows(), {"spec_hash": "abc", "sweep": "t"}, epochs=epochs)
    import pandas as pd

    df = pd.read_parquet(tmp_path / "epochs.parquet")
    assert df["epoch"].tolist() == [1, 2] and df["wall_time_s"].tolist() == [1.5, 3.0]
    assert set(df["sweep"]) == {"t"} and set(df["tune_trial_id"]) == {"f2"}
    assert R.read_epochs(tmp_path / R.EPOCHS_FILE)[1]["val_acc"] == 20.0
    assert R.read_table(tmp_path / R.EPOCHS_FILE).schema.field("val_acc").metadata[b"unit"] == b"%"


def test_rows_from_a_schema_1_tune_state_are_upgraded_too(tmp_path):
    """Rows in Tune's saved callback state (a driver of schema 1) fill the ledger as schema-2 rows."""
    from orchestrator.tune_runner import ResultsCallback

    old = dict(_rows()[2], status="TERMINATED")
    cb = ResultsCallback(tmp_path, {"sweep": "t"}, [])
    cb.set_state({"rows": {old["tune_trial_id"]: old}})
    assert cb.rows[old["tune_trial_id"]]["status"] == "FINISHED"


# --- the numbers a reviewer asks for: per-seed values, intervals, comparisons, unstable seeds, cost ------------

T_975_DF1 = 12.706204736174698  # Student t quantile, 1 degree of freedom (tables)


def _cells_by_id(tmp_path, meta=None):
    R.write_results(tmp_path, _reviewer_rows(), meta or {"report": {"baseline": "coop"}})
    return {c["cell_id"]: c for c in R.read_table(tmp_path / R.CELLS_FILE).to_pylist()}


def test_cells_hold_seeds_values_intervals_and_unstable_seeds(tmp_path):
    cells = _cells_by_id(tmp_path)
    coop = cells["fewshot.coop.dtd.2shot"]
    assert (coop["n"], coop["n_failed"], coop["seeds"], coop["failed_seeds"]) == (3, 1, [1, 2, 3], [4])
    assert coop["test_acc_values"] == [12.0, 15.2, 63.4]
    # std of 12.0, 15.2, 63.4 = sqrt(((-18.2)^2 + (-15)^2 + 33.2^2) / 2) = sqrt(829.24) = 28.80
    assert coop["test_acc_std"] == pytest.approx(math.sqrt(829.24))
    half = 4.302652729911275 * math.sqrt(829.24) / math.sqrt(3)
    assert (coop["test_acc_ci_low"], coop["test_acc_ci_high"]) == pytest.approx((30.2 - half, 30.2 + half))
    assert coop["unstable_seeds"] == [3] and coop["high_std_metrics"] == ["test_acc"]  # 63.4: 10.2 scaled MADs out
    kg = cells["fewshot.kgcoop.dtd.2shot"]  # n = 2: an interval, but no seed can be called the odd one
    assert kg["seeds"] == [1, 2] and (kg["test_acc_ci_low"], kg["test_acc_ci_high"]) == pytest.approx(
        (65 - 5 * T_975_DF1, 65 + 5 * T_975_DF1)
    )
    assert kg["unstable_seeds"] == [] and kg["high_std_metrics"] == ["test_acc"]  # std 7.07 > 5
    maple = cells["fewshot.maple.dtd.2shot"]  # n = 1: a mean, no interval
    assert maple["test_acc_mean"] == 65.0 and maple["test_acc_ci_low"] is None and maple["test_acc_values"] == [65.0]
    b2n = cells["base2novel.coop.digits.2shot"]  # HM of the seed means, bootstrap interval = the seeds' own HMs here
    assert b2n["hm_mean"] == pytest.approx(2 * 70 * 60 / 130)
    assert (b2n["hm_ci_low"], b2n["hm_ci_high"]) == pytest.approx((2 * 80 * 40 / 120, 2 * 60 * 80 / 140))
    assert b2n["hm_values"] == pytest.approx([2 * 80 * 40 / 120, 2 * 60 * 80 / 140])
    looser = _cells_by_id(tmp_path, {"report": {"unstable": {"mads": 20.0, "max_std": 30.0}}})
    assert (
        looser["fewshot.coop.dtd.2shot"]["unstable_seeds"] == []
        and looser["fewshot.coop.dtd.2shot"]["high_std_metrics"] == []
    )  # the spec's report.unstable travels in the metadata


def test_comparisons_pair_the_shared_seeds_with_the_baseline(tmp_path):
    _cells_by_id(tmp_path)
    rows = R.read_table(tmp_path / R.COMPARISONS_FILE).to_pylist()
    assert {r["baseline"] for r in rows} == {"coop"} and "coop" not in {r["method"] for r in rows}
    by = {(r["method"], r["dataset"]): r for r in rows if r["metric"] == "test_acc"}
    kg = by[("kgcoop", "dtd")]  # seeds 1, 2 shared: differences 48 and 54.8
    assert kg["seeds"] == [1, 2] and kg["n_pairs"] == 2 and kg["diff_mean"] == pytest.approx(51.4)
    assert (kg["diff_ci_low"], kg["diff_ci_high"]) == pytest.approx((51.4 - 3.4 * T_975_DF1, 51.4 + 3.4 * T_975_DF1))
    assert kg["ci_excludes_zero"] is True and kg["ci_method"] == "t"
    assert kg["p_ttest"] == pytest.approx(1 - 2 / math.pi * math.atan(51.4 / 3.4)) and kg["p_wilcoxon"] is None
    maple = by[("maple", "dtd")]  # one shared seed: a difference, nothing more
    assert (maple["n_pairs"], maple["diff_mean"], maple["diff_ci_low"], maple["p_ttest"]) == (1, 53.0, None, None)
    assert maple["ci_excludes_zero"] is False
    avg = by[("kgcoop", R.AVERAGE)]  # dtd 51.4 and eurosat 2.0: better on both
    assert avg["diff_mean"] == pytest.approx((51.4 + 2.0) / 2) and avg["cell_id"] is None and avg["seeds"] == []
    assert (avg["n_pairs"], avg["datasets_better"], avg["datasets_worse"], avg["ci_method"]) == (2, 2, 0, "bootstrap")
    assert not [r for r in rows if r["protocol"] == "base2novel"]  # coop is the only method there
    s = R.read_table(tmp_path / R.COMPARISONS_FILE).schema
    assert s.field("diff_mean").metadata[b"unit"] == b"pp" and all(s.field(n).metadata[b"description"] for n in s.names)
    import duckdb

    path = str(tmp_path / "comparisons.parquet").replace("'", "''")
    assert duckdb.sql(f"select count(*) from '{path}' where ci_excludes_zero").fetchall()[0][0] >= 2
    R.write_results(tmp_path, _reviewer_rows(), {})  # no baseline named: the table is there, empty
    assert R.read_table(tmp_path / R.COMPARISONS_FILE).num_rows == 0


def test_baseline_per_protocol(tmp_path):
    rows = _reviewer_rows() + [
        _final("zeroshot", "digits", s, {"base_acc": 70.0, "novel_acc": 70.0, "hm": 70.0}, protocol="base2novel")
        for s in (1, 2)
    ]
    R.write_results(tmp_path, rows, {"report": {"baseline": {"base2novel": "zeroshot"}}})
    got = R.read_table(tmp_path / R.COMPARISONS_FILE).to_pylist()
    assert {(r["protocol"], r["baseline"], r["method"]) for r in got} == {("base2novel", "zeroshot", "coop")}
    assert sorted(r["metric"] for r in got) == ["base_acc", "hm", "novel_acc"]
    hm = next(r for r in got if r["metric"] == "hm")
    assert hm["diff_mean"] == pytest.approx(2 * 70 * 60 / 130 - 70.0) and hm["ci_method"] == "bootstrap"


def test_trial_rows_carry_their_cost_and_cells_sum_it(tmp_path):
    res = {"CPU": 2.0, "GPU": 0.5}
    rows = [
        _final(
            "coop",
            "dtd",
            1,
            {
                "test_acc": 50.0,
                "wall_time_s": 100.0,
                "time_total_s": 101.0,
                "images_trained": 480,
                "images_evaluated": 600,
            },
            resources=res,
        ),
        R.trial_row(
            _cfg(cell="fewshot.coop.dtd.2shot", stage="search", seed=1),
            {"val_acc": 40.0, "time_total_s": 40.0},
            status="PRUNED",
            tune_trial_id="pruned",
            resources=res,
        ),  # no wall_time_s: Tune's time
        R.trial_row(
            _cfg(cell="fewshot.coop.dtd.2shot", stage="search", seed=1, number=1),
            {},
            status="ERROR",
            tune_trial_id="old",
        ),
    ]  # a row of an older ledger: no resources, no time
    R.write_results(tmp_path, rows, {})
    t = {r["tune_trial_id"]: r for r in R.read_table(tmp_path / R.TRIALS_FILE).to_pylist()}
    first = t["fewshotcoopdtd1"]
    assert (first["cpus"], first["gpu_fraction"], first["cpu_seconds"], first["gpu_seconds"]) == (2.0, 0.5, 200.0, 50.0)
    assert (first["images_trained"], first["images_evaluated"]) == (480, 600)
    assert (t["pruned"]["cpu_seconds"], t["pruned"]["gpu_seconds"]) == (80.0, 20.0)
    assert t["old"]["cpu_seconds"] is None
    cpu_only = R.trial_row(_cfg(), {"wall_time_s": 10.0}, status="FINISHED", tune_trial_id="c", resources={"CPU": 1.0})
    assert (cpu_only["gpu_fraction"], cpu_only["gpu_seconds"], cpu_only["cpu_seconds"]) == (
        0.0,
        0.0,
        10.0,
    )  # Ray omits GPU: 0
    cell = R.read_table(tmp_path / R.CELLS_FILE).to_pylist()[0]
    assert (cell["cpu_seconds"], cell["gpu_seconds"], cell["images_trained"]) == (280.0, 70.0, 480)
    back = {r["tune_trial_id"]: r for r in R.read_rows(tmp_path / R.TRIALS_FILE)}  # the ledger keeps them
    assert back["pruned"]["gpu_seconds"] == 20.0


def test_new_report_settings_rewrite_the_summaries_from_the_ledger(tmp_path):
    R.write_results(
        tmp_path,
        _reviewer_rows(),
        {
            "sweep": "t",
            "spec_hash": "abc",
            "report": {"baseline": "coop"},
            "planned_final_runs": {"fewshot.kgcoop.dtd.2shot": 3},
        },
    )
    R.rewrite_summaries(tmp_path, {"baseline": "kgcoop"})
    got = R.read_table(tmp_path / R.COMPARISONS_FILE).to_pylist()
    assert {r["baseline"] for r in got} == {"kgcoop"} and {r["method"] for r in got} == {"coop", "maple"}
    meta = R.read_meta(tmp_path / R.CELLS_FILE)
    assert meta["spec_hash"] == "abc" and meta["report"] == {"baseline": "kgcoop"}
    first = R.read_table(tmp_path / R.CELLS_FILE).to_pylist()[0]["cell_id"]
    assert first == "fewshot.kgcoop.dtd.2shot"  # the planned order is kept


def test_every_column_a_reviewer_reads_is_documented_in_the_readme():
    """The README's column table names every cells and comparisons column and the trials' cost columns
    (``<metric>_<stat>`` standing for each metric's statistics)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"`([a-z_<>]+)`", text))
    names = (
        {c.name for c in (*R.CELL_HEAD, *R.CELL_TAIL, *R.COMPARISON_COLUMNS)}
        | set(R.COST_COLUMNS)
        | {"cpus", "gpu_fraction"}
    )
    names |= {f"<metric>_{k}" for k, _ in R.CELL_STATS}
    assert sorted(names - documented) == []
