"""`trainaudit report` through click's CliRunner: files, columns, summary.json, cache, exit codes."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from analyze.cli import main
from analyze.cli.report import report
from analyze.pipeline.output import default_out_dir, write_full_report
from analyze.pipeline.tables import SPECTRAL_COLUMNS, TABLE_COLUMNS, validate_summary

REQUIRED_SPECTRAL = ("step", "tensor", "shape", "method", "sigma_est", "err_bound", "sigma_power", "sigma_exact",
                     "rel_err", "power_rel_err", "iterations", "warm_start", "sigma_ratio")


def shared_report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report folder of the tiny demo run per session (test_browser.py reuses it, cached)."""
    return tmp_path_factory.getbasetemp() / "tiny-demo-report"


def seed_figures(src: Path, dst: Path) -> None:
    """Copy drawn figures from an earlier report: figures are keyed by their tables' content, so
    unchanged panels are not drawn again (keeps these tests fast; the cache itself is tested)."""
    if (src / "cache" / "figures").is_dir():
        shutil.copytree(src / "cache" / "figures", dst / "cache" / "figures", dirs_exist_ok=True)


@pytest.fixture(scope="module")
def reported(tiny_demo_run: Path, tmp_path_factory: pytest.TempPathFactory):
    out = shared_report_dir(tmp_path_factory)
    shutil.rmtree(out, ignore_errors=True)  # this fixture times a cold run
    first = CliRunner().invoke(main, ["report", str(tiny_demo_run), "--out", str(out)])
    second = CliRunner().invoke(main, ["report", str(tiny_demo_run), "--out", str(out)])
    return out, first, second


def test_report_writes_every_file_with_documented_columns(reported) -> None:
    out, first, _ = reported
    assert first.exit_code == 0, first.output
    assert (out / "report.html").stat().st_size > 10_000
    for name, cols in TABLE_COLUMNS.items():
        df = pd.read_csv(out / "tables" / f"{name}.csv")
        assert tuple(df.columns) == cols, name
    sp = pd.read_csv(out / "tables" / "spectral.csv")
    assert set(REQUIRED_SPECTRAL) <= set(SPECTRAL_COLUMNS) and len(sp) > 0
    assert sp["sigma_exact"].notna().all()  # exact SVD is on by default for a ~100k-parameter model
    summary = json.loads((out / "summary.json").read_text())
    assert validate_summary(summary) == []
    assert summary["run"]["checkpoints"] == [0, 20, 40]
    assert summary["run"]["source_format"] == "trainaudit"
    assert summary["overfitting"]["val_series"] == "val"
    assert summary["tau"]["class_a"] == "irregular" and summary["tau"]["class_b"] == "regular"
    assert "report:" in first.stdout and "checkpoint 3/3" in first.stderr  # progress on stderr


def test_rerun_is_served_from_cache_and_says_so(reported) -> None:
    out, first, second = reported
    assert second.exit_code == 0, second.output
    assert second.stderr.count("(cached)") == 3
    assert "done in" not in second.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert any("served from the cache" in n for n in summary["notes"])
    assert "served from the cache" in (out / "report.html").read_text(encoding="utf-8")


def test_validator_rejects_wrong_shapes(reported) -> None:
    out, _, _ = reported
    good = json.loads((out / "summary.json").read_text())
    assert validate_summary(good) == []
    mutations = [
        lambda s: s.pop("tau"),
        lambda s: s.update(format_version=2),
        lambda s: s["overfitting"].update(verdict="maybe"),
        lambda s: s["run"].update(steps_logged="40"),
        lambda s: s["spikes"].append({"series": "lr", "kind": "spike", "first_step": 1, "peak_step": 1,
                                      "height_mad": 7.0, "length": 1}),
        lambda s: s["findings"].append({"severity": "fatal", "code": "x", "message": "m", "step": None,
                                        "tensor": None, "value": None}),
        lambda s: s["notes"].append(3),
    ]
    for mutate in mutations:
        bad = copy.deepcopy(good)
        mutate(bad)
        assert validate_summary(bad), mutate


def test_unreadable_input_exits_2_with_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "no such file" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(report, [str(empty)])
    assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0, res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["report", str(empty), "--format", "no-such-format"])
    assert res.exit_code == 2 and "no-such-format" in res.stderr and res.stderr.strip().count("\n") == 0


def test_strict_turns_data_warnings_into_exit_2(reported, tiny_demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_demo_run, run, ignore=shutil.ignore_patterns("report"))
    with open(run / "train.csv", "a") as f:
        f.write("41,0.5,1.0")  # a torn last line: the reader skips it with a warning
    out = tmp_path / "o"
    seed_figures(reported[0], out)
    res = CliRunner().invoke(main, ["report", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "incomplete final line" in html and "Data issues" in html
    (out / "report.html").unlink()
    (out / "summary.json").unlink()
    strict = CliRunner().invoke(main, ["report", str(run), "--out", str(out), "--strict"])
    assert strict.exit_code == 2
    assert "(--strict)" in strict.stderr
    assert (out / "report.html").exists() and (out / "summary.json").exists()  # written before exiting
    summary = json.loads((out / "summary.json").read_text())
    assert any("incomplete final line" in n for n in summary["notes"])


def test_default_out_dir_and_no_exact_svd(reported, tiny_demo_run: Path, tmp_path: Path) -> None:
    assert default_out_dir(tiny_demo_run) == tiny_demo_run / "report"
    f = tmp_path / "trainer_state.json"
    f.write_text("{}")
    assert default_out_dir(f) == tmp_path / "trainer_state-report"
    seed_figures(reported[0], tmp_path / "o")
    files = write_full_report(tiny_demo_run, tmp_path / "o", exact_svd=False)
    sp = pd.read_csv(files.tables_dir / "spectral.csv")
    # Without exact SVD the estimator still runs on every matrix; exact stays only where it is cheaper
    # than the estimator (min dim <= EXACT_MAX_DIM), so the validation table has a reference there.
    from analyze.metrics.spectral import EXACT_MAX_DIM
    small = sp["shape"].map(lambda s: min(int(d) for d in str(s).strip("()[] ").replace("x", ",").split(",") if d.strip()) <= EXACT_MAX_DIM)
    assert sp["sigma_est"].notna().all() and (sp["method"] == "lanczos").all()
    assert sp.loc[small, "sigma_exact"].notna().all() and sp.loc[~small, "sigma_exact"].isna().all()
    assert Path(files) == tmp_path / "o"  # os.fspath gives the folder (trainaudit demo uses it)


def test_report_help_lists_the_contract_options() -> None:
    res = CliRunner().invoke(main, ["report", "--help"])
    assert res.exit_code == 0
    for opt in ("--out", "--exact-svd / --no-exact-svd", "--strict", "--format", "--model", "--workers"):
        assert opt in res.output


def test_user_model_only_through_explicit_model_option(tiny_demo_run: Path, tmp_path: Path, monkeypatch) -> None:
    from analyze.config import AnalysisConfig
    from analyze.pipeline.analysis import analyze_run

    run = tmp_path / "run"
    shutil.copytree(tiny_demo_run, run, ignore=shutil.ignore_patterns("report", "checkpoints"))
    (run / "checkpoints").mkdir()
    shutil.copy(tiny_demo_run / "checkpoints" / "step_00000040.safetensors", run / "checkpoints")
    meta = json.loads((run / "run.json").read_text())
    meta["model"] = None  # the run names no model: nothing may be imported on its behalf
    (run / "run.json").write_text(json.dumps(meta))
    res = analyze_run(run)
    assert "--model" in res.panels["activations"] and res.tables["activations"].empty
    (tmp_path / "my_factory_mod.py").write_text(
        "from analyze.demo import corpus\n"
        "from analyze.demo.model import MiniGPT, MiniGPTConfig\n"
        "def build(config):\n"
        "    return MiniGPT(MiniGPTConfig(vocab_size=len(corpus.vocabulary()), context=corpus.CONTEXT))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = analyze_run(run, AnalysisConfig(model_factory="my_factory_mod:build"))
    assert res.panels["activations"] == "" and len(res.tables["activations"]) == 2
    bad = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "o"), "--model", "nope_mod:f"])
    assert bad.exit_code == 2 and "--model nope_mod:f" in bad.stderr and "Traceback" not in bad.output


@pytest.mark.parametrize("name, target, args", [
    ("report", "analyze.pipeline.output.write_full_report", ["{f}"]),
    ("audit", "analyze.pipeline.audit.audit_checkpoint", ["{f}"]),
    ("spectral", "analyze.pipeline.audit.spectral_rows", ["{f}"]),
    ("demo", "analyze.demo.train.train_demo", ["--steps", "1", "--out", "{d}"]),
])
def test_every_command_turns_a_trainaudit_error_into_one_line_and_exit_2(name: str, target: str, args: list[str],
                                                                         tmp_path: Path, monkeypatch) -> None:
    import importlib

    from analyze.cli import COMMANDS
    from loaders.errors import TrainauditError

    def broken(*a: object, **k: object) -> None:
        raise TrainauditError(tmp_path / "x.bin", "broken\nacross lines")

    module, attr = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), attr, broken)
    f = tmp_path / "x.bin"
    f.write_bytes(b"")
    argv = [a.format(f=f, d=tmp_path / "demo") for a in args]
    mod, cmd = COMMANDS[name].split(":")
    for res in (CliRunner().invoke(main, [name, *argv]),  # through the group and on its own
                CliRunner().invoke(getattr(importlib.import_module(mod), cmd), argv)):
        assert res.exit_code == 2, res.output
        assert res.stderr == f"trainaudit: error: {f}: broken across lines\n"
        assert "Traceback" not in res.output
