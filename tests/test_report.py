"""Report: Average row, base2novel Average HM = HM of averaged Base/Novel, plots and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator import report as Rep
from orchestrator import results as R


def _cells():
    def c(method, dataset, b, n, shots=16):
        return {
            "protocol": "base2novel",
            "method": method,
            "dataset": dataset,
            "shots": shots,
            "base_acc_mean": b,
            "novel_acc_mean": n,
            "hm_mean": R.harmonic_mean(b, n),
            "base_acc_std": 1.0,
            "novel_acc_std": 1.0,
        }

    return [
        c("coop", "digits", 90.0, 30.0),
        c("coop", "shapes", 50.0, 70.0),
        c("zeroshot", "digits", 60.0, 60.0),
        c("zeroshot", "shapes", 40.0, 80.0),
    ]


def test_average_hm_is_hm_of_averages():
    cells = _cells()
    avg = Rep.average_row(cells, ["coop", "zeroshot"], ["digits", "shapes"], "hm")
    assert avg["coop"] == pytest.approx(R.harmonic_mean(70.0, 50.0))
    mean_of_hms = (R.harmonic_mean(90, 30) + R.harmonic_mean(50, 70)) / 2
    assert avg["coop"] != pytest.approx(mean_of_hms)
    md = Rep.render_markdown(cells)
    assert (
        f"| **Average** | **{R.harmonic_mean(70.0, 50.0):.2f}** | **{R.harmonic_mean(50.0, 70.0):.2f}** |" in md
    )  # a tie: both


def test_fewshot_table_and_missing_dataset_gives_no_average():
    cells = [
        {"protocol": "fewshot", "method": "coop", "dataset": d, "shots": 2, "test_acc_mean": v, "test_acc_std": 0.5}
        for d, v in (("digits", 80.0), ("shapes", 60.0))
    ]
    cells.append(
        {
            "protocol": "fewshot",
            "method": "zeroshot",
            "dataset": "digits",
            "shots": 2,
            "test_acc_mean": 10.0,
            "test_acc_std": 0.0,
        }
    )
    md = Rep.render_markdown(cells)
    assert "| digits | **80.00 ± 0.50** | 10.00 ± 0.00 |" in md  # the best of the row in bold
    assert "| **Average** | 70.00 | — |" in md  # nothing to compare with: no mark


def test_regenerates_from_arrow_files_via_cli(tmp_path):
    rows = []
    for shots in (1, 2):
        for ds in ("digits", "shapes"):
            for seed in (1, 2):
                cfg = {
                    "cell_id": f"fewshot.coop.{ds}.{shots}shot",
                    "stage": "final",
                    "seed": seed,
                    "optuna_number": None,
                    "params": {},
                    "request": {
                        "method": "coop",
                        "dataset": ds,
                        "shots": shots,
                        "seed": seed,
                        "protocol": "fewshot",
                        "stage": "final",
                        "overrides": {},
                    },
                }
                rows.append(
                    R.trial_row(
                        cfg, {"test_acc": 10.0 * shots + seed}, status="FINISHED", tune_trial_id=f"{ds}{shots}{seed}"
                    )
                )
    R.write_results(tmp_path, rows, {})
    r = subprocess.run([sys.executable, "-m", "orchestrator.report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "report.md").read_text()
    assert "### 2-shot" in md and "| **Average** | 21.50 |" in md
    assert (tmp_path / "fewshot_curves.png").stat().st_size > 1000
    from PIL import Image

    assert Image.open(tmp_path / "fewshot_curves.png").info["dpi"][0] >= 299  # print resolution
    assert (tmp_path / "fewshot_curves.pdf").read_bytes().startswith(b"%PDF")
    tex = (tmp_path / "tables" / "fewshot_2shot.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\textbf{Average} & 21.50 \\" in tex and "digits & 21.50 $\\pm$ 0.71" in tex
    bad = subprocess.run(
        [sys.executable, "-m", "orchestrator.report", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_transfer_columns_follow_the_spec_then_the_papers_order_and_lost_targets_are_listed(tmp_path):
    """DG columns: V2, Sketch, A, R (not alphabetical); the spec's own order when it travels in cells.arrow."""
    targets = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    rows = []
    for seed in (1, 2):
        cfg = {
            "cell_id": "domain_generalization.tgpt.imagenet.16shot",
            "stage": "final",
            "seed": seed,
            "optuna_number": None,
            "params": {},
            "request": {
                "method": "tgpt",
                "dataset": "imagenet",
                "shots": 16,
                "seed": seed,
                "protocol": "domain_generalization",
                "stage": "final",
                "overrides": {},
            },
        }
        result = {"test_acc": 70.0, **{f"acc_{t}": 50.0 + i for i, t in enumerate(targets)}}
        if seed == 2:
            result.pop("acc_imagenet_r")
            result.update(error_class="target_failed", error_message="imagenet_r: MissingImageError: image file x")
        rows.append(R.trial_row(cfg, result, status="FINISHED", tune_trial_id=f"t{seed}"))
    R.write_results(tmp_path, rows, {})
    md = Rep.write_report(tmp_path).read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| method | source"))
    assert header == (
        "| method | source (dataset) | source acc | imagenet_v2 | imagenet_sketch | imagenet_a | imagenet_r "
        "| target average |"
    )
    assert "target_failed" in md and "imagenet_r: MissingImageError" in md
    R.write_results(tmp_path, rows, {"targets": ["imagenet_r", "imagenet_a", "imagenet_sketch", "imagenet_v2"]})
    md = Rep.write_report(tmp_path).read_text()
    assert "| source acc | imagenet_r | imagenet_a | imagenet_sketch | imagenet_v2 |" in md


def test_report_opens_with_provenance_and_ends_with_the_chosen_hyperparameters(tmp_path):
    rows = []
    for method, acc in (("coop", 60.0), ("kgcoop", 65.0)):
        for seed in (1, 2):
            cfg = {
                "cell_id": f"fewshot.{method}.digits.4shot",
                "stage": "final",
                "seed": seed,
                "optuna_number": 3,
                "params": {"lr": 0.0125, "n_ctx": 8},
                "request": {
                    "method": method,
                    "dataset": "digits",
                    "shots": 4,
                    "seed": seed,
                    "protocol": "fewshot",
                    "stage": "final",
                    "overrides": {},
                    "backbone": {"arch": "promptsweep-mini", "pretrained": "promptsweep"},
                },
            }
            rows.append(R.trial_row(cfg, {"test_acc": acc + seed}, status="FINISHED", tune_trial_id=f"{method}{seed}"))
    R.write_results(tmp_path / "x", rows, {"sweep": "paper", "spec_hash": "feed", "git_commit": "abc1234"})
    md = Rep.write_report(tmp_path / "x").read_text()
    assert md.startswith("# promptsweep results: paper\n")  # the sweep's name, not the folder's
    for line in (
        "| sweep | paper |",
        "| backbone | promptsweep-mini:promptsweep |",
        "| git commit | abc1234 |",
        "| spec hash | feed |",
    ):
        assert line in md, line
    assert "torch " in md and "pyarrow " in md  # package versions
    assert "| digits | 61.50 ± 0.71 | **66.50 ± 0.71** |" in md
    assert "## Chosen hyperparameters" in md and "| cell | lr | n_ctx |" in md
    assert "| fewshot.kgcoop.digits.4shot | 0.0125 | 8 |" in md
    tex = (tmp_path / "x" / "tables" / "hyperparameters_kgcoop.tex").read_text()
    assert r"fewshot.kgcoop.digits.4shot & 0.0125 & 8 \\" in tex and r"lr & n\_ctx" in tex


def test_report_renders_the_reviewers_sections(tmp_path):
    """Comparisons (with the marks in the result table), the unstable seed with its MLflow run, the cost with its
    plot, the per-seed statistics; each also as LaTeX."""
    from result_rows import reviewer_rows

    rows = [dict(r, cpu_seconds=3600.0, gpu_seconds=1800.0) if r["method"] == "kgcoop" else r for r in reviewer_rows()]
    R.write_results(tmp_path, rows, {"report": {"baseline": "coop"}})
    md = Rep.write_report(tmp_path).read_text()
    assert "| dtd | 30.20 ± 28.80 | **65.00 ± 7.07 ↑** | **65.00 ± 0.00** |" in md  # kgcoop: its interval excludes 0
    assert "↑ / ↓: better / worse than the baseline, coop: the 95 % interval" in md
    section = md[md.index("## Paired comparison with the baseline") :]
    assert "### fewshot, 2-shot: test accuracy (method − coop)" in section
    assert "| dtd | +51.40 [8.20, 94.60] ↑ (p 0.042) | +53.00 — (—) |" in section
    assert "| **Average** | +26.70 [25.00, 28.40] ↑ (p 0.475) | — (only 1 of 2 datasets) |" in section
    assert "| better / worse | better on 2 of 2, worse on 0 | better on 1 of 1, worse on 0 |" in section
    unstable = md[md.index("## Unstable seeds") : md.index("## Cost")]
    assert "| fewshot.coop.dtd.2shot | test accuracy | 3 | 63.40 | 15.20 | 10.2 | run-coop-dtd-3 |" in unstable
    assert (
        "| fewshot.kgcoop.dtd.2shot | test accuracy | 7.07 | 1: 60.00, 2: 70.00 | 1: run-kgcoop-dtd-1, 2: " in unstable
    )
    cost = md[md.index("## Cost") :]
    assert "The sweep took 2.500 GPU-hours (5.000 CPU-hours) over 15 trials" in cost  # kgcoop: 5 x 1800 GPU-s
    assert "| kgcoop | 5 | 2.500 | 5.000 |" in cost and "| coop | 9 | 0.000 | 0.000 |" in cost
    assert "fewshot: coop, kgcoop." in cost  # maple lacks eurosat: no accuracy to place it by
    assert (tmp_path / "cost_fewshot.png").stat().st_size > 1000 and "![cost_fewshot](cost_fewshot.png)" in md
    stats = md[md.index("## Statistics over the seeds") :]
    assert (
        "| dtd | 2 | coop | test accuracy | 3 | 30.20 | 28.80 | [-41.33, 101.73] | 1: 12.00, 2: 15.20, 3: 63.40, 4: failed |"
        in stats
    )
    assert "| coop | 51.10 [" in stats and "| maple | — |" in stats  # the Average over dtd and eurosat
    tex = (tmp_path / "tables" / "comparison_fewshot_2shot_test_acc.tex").read_text()
    assert r"+51.40 [8.20, 94.60] $\uparrow$ (p 0.042)" in tex
    assert "What mattered in the search" not in md  # nothing was searched


def test_report_without_a_baseline_says_how_to_name_one(tmp_path):
    from result_rows import reviewer_rows

    R.write_results(tmp_path, reviewer_rows(), {})
    md = Rep.write_report(tmp_path).read_text()
    assert "No baseline is named: add `report: {baseline: <method>}`" in md and "↑" not in md
    assert "## Unstable seeds" in md and "These results record no cost" in md and not list(tmp_path.glob("cost_*"))


def test_a_trials_run_notes_reach_its_row_and_the_report(tiny_backbone, tmp_path):
    """TGP-T without a captions file records why its content loss is off: in the trial's result, its
    trials.arrow row and the report's Run notes section (the MLflow run gets them as note.* tags)."""
    import json

    from orchestrator.tracking import _note_tags
    from orchestrator.trial import BackboneRef, TrialRequest, run_trial

    final = run_trial(
        TrialRequest(
            method="tgpt",
            dataset="digits",
            shots=1,
            seed=1,
            device="cpu",
            backbone=BackboneRef(arch="promptsweep-tiny", pretrained=None),
            overrides={"max_iters": 1, "batch_size": 4, "n_cat": 4, "n_con": 4, "num_workers": 0},
        )
    )
    notes = json.loads(final["run_notes"])
    assert notes["tgpt_content_loss"].startswith("off: no captions.txt")
    assert _note_tags(final["run_notes"]) == {"note.tgpt_content_loss": notes["tgpt_content_loss"]}
    cfg = {
        "cell_id": "fewshot.tgpt.digits.1shot",
        "stage": "final",
        "seed": 1,
        "optuna_number": None,
        "params": {},
        "request": {
            "method": "tgpt",
            "dataset": "digits",
            "shots": 1,
            "protocol": "fewshot",
            "seed": 1,
            "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
        },
    }
    row = R.trial_row(cfg, final, status=R.OK_STATUS, tune_trial_id="t1")
    assert row["run_notes"] == final["run_notes"]
    R.write_results(tmp_path, [row], {"spec_hash": "x"}, ["fewshot.tgpt.digits.1shot"])
    assert R.read_rows(tmp_path / "trials.arrow")[0]["run_notes"] == final["run_notes"]
    md = Rep.write_report(tmp_path).read_text()
    assert "## Run notes" in md and "| fewshot.tgpt.digits.1shot | tgpt_content_loss | off: no captions.txt" in md
