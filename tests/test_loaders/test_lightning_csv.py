"""Lightning CSVLogger metrics.csv: sparse rows, *_step/*_epoch, repeated headers, ragged rows,
rows of a later validate/test call, hparams.yaml (bad-inputs.md A9, D17).

The files are written the way Lightning's ``ExperimentWriter`` writes them: ``csv.DictWriter``
over the sorted union of keys, one sparse row per ``log_metrics`` call, CRLF line ends.
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest

from loaders.errors import DataWarnings, TrainauditError
from loaders.formats.lightning_csv import read_lightning, read_metrics_csv


def lightning_rows(epochs: int = 3, steps_per_epoch: int = 100,
                   log_every: int = 25) -> list[dict]:  # type: ignore[type-arg]
    """The rows a fit() with on_step+on_epoch training loss and per-epoch validation logs."""
    rows = []
    g = 0
    for ep in range(epochs):
        for _ in range(steps_per_epoch):
            g += 1
            if g % log_every == 0:
                rows.append({"epoch": ep, "step": g - 1, "train_loss_step": 5.0 / g, "lr-AdamW": 1e-3})
        rows.append({"epoch": ep, "step": g - 1, "val_loss": 1.0 / (ep + 1), "val_acc": 0.5 + ep / 10})
        rows.append({"epoch": ep, "step": g - 1, "train_loss_epoch": 4.0 / (ep + 1)})
    return rows


def write_lightning_csv(path: Path, rows: list[dict],  # type: ignore[type-arg]
                        extra_lines: dict[int, str] | None = None) -> Path:
    keys = sorted({k for r in rows for k in r})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    lines = buf.getvalue().split("\r\n")
    for at, text in sorted((extra_lines or {}).items(), reverse=True):
        lines.insert(at, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("\r\n".join(lines).encode())
    return path


def test_round_trip_prefers_per_step_series(tmp_path: Path) -> None:
    rows = lightning_rows()
    run = read_lightning(write_lightning_csv(tmp_path / "version_0" / "metrics.csv", rows))
    loss = run.series("loss")
    exp = [(r["step"], r["train_loss_step"]) for r in rows if "train_loss_step" in r]
    assert loss["step"].tolist() == [s for s, _ in exp]
    assert loss["value"].tolist() == pytest.approx([v for _, v in exp], rel=1e-12)
    assert run.series("lr")["value"].tolist() == pytest.approx([1e-3] * len(exp))
    ev = run.evals
    assert ev["series"].unique().tolist() == ["val_loss"]
    assert ev["step"].tolist() == [99, 199, 299] and ev["loss"].tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert run.meta["train_loss_column"] == "train_loss_step"
    assert run.meta["val_series_preferred"] == "val_loss"
    assert run.warnings == []
    assert run.name == "version_0"


def test_d17_repeated_header_and_ragged_row(tmp_path: Path) -> None:
    rows = lightning_rows()
    header = ",".join(sorted({k for r in rows for k in r}))
    p = write_lightning_csv(tmp_path / "metrics.csv", rows, extra_lines={5: header, 9: "0,49,1.0"})
    w = DataWarnings()
    run = read_metrics_csv(p, w)
    assert len(run.series("loss")) == len([r for r in rows if "train_loss_step" in r])
    ragged_line = p.read_bytes().split(b"\r\n").index(b"0,49,1.0") + 1
    assert f"{p}:{ragged_line}: ragged row (3 fields, header has 7), skipped" in w
    assert f"{p}: 1 repeated header line dropped" in w
    assert len(w) == 2


def test_validate_and_test_after_fit_are_not_training(tmp_path: Path) -> None:
    rows = lightning_rows()
    last = rows[-1]
    rows += [{"epoch": 3, "step": 300, "val_loss": 0.01, "val_acc": 0.99},   # trainer.validate()
             {"epoch": 3, "step": 300, "test_loss": 0.02, "test_acc": 0.98}]  # trainer.test()
    run = read_lightning(write_lightning_csv(tmp_path / "metrics.csv", rows))
    assert run.evals["step"].tolist() == [99, 199, 299]
    assert 0.01 not in run.evals["loss"].tolist()
    assert any("validation row logged after training" in x for x in run.notes)   # a note, not a data warning
    assert not list(run.warnings)
    assert any("test_loss" in n for n in run.notes)
    assert run.series("loss")["step"].max() <= last["step"]


def test_validate_rows_at_an_old_step_are_dropped(tmp_path: Path) -> None:
    rows = lightning_rows()
    rows.append({"epoch": 2, "step": 299, "val_loss": 0.7, "val_acc": 0.7})  # validate() right after fit
    run = read_lightning(write_lightning_csv(tmp_path / "metrics.csv", rows))
    assert run.evals["loss"].tolist() == pytest.approx([1.0, 0.5, 1 / 3])


def test_epoch_only_training_loss_on_separate_rows(tmp_path: Path) -> None:
    # The shape of many small projects: val row then train row at the same step, epoch values only.
    rows = []
    for ep in range(5):
        rows.append({"epoch": ep, "step": 10 * ep + 9, "val_loss": 1.0 - ep / 10})
        rows.append({"epoch": ep, "step": 10 * ep + 9, "train_loss": 2.0 - ep / 10})
    run = read_lightning(write_lightning_csv(tmp_path / "metrics.csv", rows))
    assert run.series("loss")["value"].tolist() == pytest.approx([2.0 - ep / 10 for ep in range(5)])
    assert run.evals["loss"].tolist() == pytest.approx([1.0 - ep / 10 for ep in range(5)])
    assert run.warnings == []


def test_version_folders_newest_is_read(tmp_path: Path) -> None:
    logs = tmp_path / "lightning_logs"
    write_lightning_csv(logs / "version_2" / "metrics.csv", lightning_rows(epochs=1))
    write_lightning_csv(logs / "version_10" / "metrics.csv", lightning_rows(epochs=2))
    run = read_lightning(tmp_path)
    assert run.meta["metrics_file"].endswith("version_10/metrics.csv")
    assert len(run.evals) == 2
    assert any("several Lightning versions" in w for w in run.warnings)


def test_checkpoint_files_beside_the_log(tmp_path: Path) -> None:
    import torch
    v = tmp_path / "version_0"
    write_lightning_csv(v / "metrics.csv", lightning_rows(epochs=1))
    (v / "checkpoints").mkdir()
    torch.save({"state_dict": {"w": torch.ones(1)}}, v / "checkpoints" / "epoch=0-step=100.ckpt")
    run = read_lightning(v)
    assert [(c.step, c.kind) for c in run.checkpoints] == [(100, "torch")]


def test_a9_unsafe_yaml_tag_ignored(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    mark = tmp_path / "PWNED"
    v = tmp_path / "version_0"
    write_lightning_csv(v / "metrics.csv", lightning_rows(epochs=1))
    payload = f"lr: 0.001\nx: !!python/object/apply:os.system ['touch {mark}']\n"
    (v / "hparams.yaml").write_text(payload)
    run = read_lightning(v)
    assert any("hparams.yaml: unsafe YAML tag ignored" in w for w in run.warnings)
    assert not mark.exists()
    assert len(run.series("loss")) > 0  # metrics still read
    # Control: the same YAML through yaml.unsafe_load in a subprocess runs the command.
    code = "import sys, yaml; yaml.unsafe_load(open(sys.argv[1]).read())"
    subprocess.run([sys.executable, "-c", code, str(v / "hparams.yaml")], check=False, timeout=60, capture_output=True)
    assert mark.exists()
    assert yaml is not None


def test_safe_hparams_are_kept(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    v = tmp_path / "version_0"
    write_lightning_csv(v / "metrics.csv", lightning_rows(epochs=1))
    (v / "hparams.yaml").write_text("lr: 0.001\nlayers: 2\n")
    assert read_lightning(v).meta["hparams"] == {"lr": 0.001, "layers": 2}


def test_empty_csv_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "metrics.csv"
    p.write_text("")
    with pytest.raises(TrainauditError, match="empty CSV"):
        read_lightning(p)


def test_non_numeric_cells_are_counted(tmp_path: Path) -> None:
    p = tmp_path / "metrics.csv"
    p.write_text("epoch,step,train_loss\n0,1,0.5\n0,2,oops\n0,3,nan\n")
    run = read_lightning(p)
    vals = run.series("loss")["value"].tolist()
    assert vals[0] == 0.5 and vals[1] != vals[1] and len(vals) == 2
    assert any("1 non-numeric value of loss skipped" in w for w in run.warnings)
