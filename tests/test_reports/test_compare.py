"""`trainaudit report` on several runs / a folder of runs: every run's report, comparison.html and
comparison.json, numbers checked against each run's own tables, escaping, links, cache, a browser."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from analyze.cli import main
from analyze.pipeline.compare import expand_runs, runs_in_folder, spectral_growth
from reports.compare import FOLDER_RE

EVIL = "<img src=x onerror=alert(1)> \u202eevil"


def _seed(dst: Path, src_root: Path) -> None:
    """Reuse figures drawn by an earlier report of the same tables (keyed by content; keeps this fast)."""
    src = src_root / "tiny-demo-report" / "cache" / "figures"
    if src.is_dir():
        shutil.copytree(src, dst / "cache" / "figures", dirs_exist_ok=True)


@pytest.fixture(scope="module")
def sweep(tiny_demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a/ = the tiny demo run; b/ = the same logs with only the first two checkpoints and a hostile
    name; plus a folder that is no run and an earlier comparison output (both must be ignored)."""
    root = tmp_path_factory.mktemp("sweep")
    a, b = root / "a", root / "b"
    shutil.copytree(tiny_demo_run, a, ignore=shutil.ignore_patterns("report"))
    shutil.copytree(tiny_demo_run, b, ignore=shutil.ignore_patterns("report", "step_00000040.safetensors"))
    meta = json.loads((b / "run.json").read_text())
    meta["run_name"] = EVIL
    (b / "run.json").write_text(json.dumps(meta))
    (root / "pictures").mkdir()
    (root / "pictures" / "x.png").write_bytes(b"\x89PNG")
    (root / "old").mkdir()
    (root / "old" / "comparison.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def compared(sweep: Path, tmp_path_factory: pytest.TempPathFactory):
    cwd = tmp_path_factory.mktemp("cwd")
    out = cwd / "trainaudit-compare"
    for slug in ("01-a", "02-b"):
        _seed(out / "runs" / slug, tmp_path_factory.getbasetemp())
    old = os.getcwd()
    os.chdir(cwd)  # the default output folder is ./trainaudit-compare/
    try:
        first = CliRunner().invoke(main, ["report", str(sweep), "--workers", "2"])
        second = CliRunner().invoke(main, ["report", str(sweep), "--workers", "2"])
    finally:
        os.chdir(old)
    return out, first, second


def test_folder_of_runs_finds_the_runs_and_writes_everything(sweep: Path, compared) -> None:
    out, first, second = compared
    assert runs_in_folder(sweep) == [sweep / "a", sweep / "b"]
    assert expand_runs([sweep / "a"]) == [sweep / "a"]  # a run is not a folder of runs
    assert first.exit_code == 0, first.output
    assert "comparison:" in first.stdout and "2 of 2 run(s)" in first.stdout
    for slug in ("01-a", "02-b"):
        for f in ("report.html", "summary.json", "tables/spectral.csv"):
            assert (out / "runs" / slug / f).is_file(), (slug, f)
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["format_version"] == 1 and [r["status"] for r in doc["runs"]] == ["ok", "ok"]
    assert [r["name"] for r in doc["runs"]] == ["tiny", EVIL]  # run_name from run.json
    # the second call is served from the per-run caches
    assert second.exit_code == 0, second.output
    assert second.stderr.count("(cached)") == 3 + 2 and "done in" not in second.stderr


def test_numbers_match_each_runs_own_tables(compared) -> None:
    out, _, _ = compared
    doc = json.loads((out / "comparison.json").read_text())
    growths = []
    for row in doc["runs"]:
        folder = out / row["report"].rsplit("/", 1)[0]
        summary = json.loads((folder / "summary.json").read_text())
        of = pd.read_csv(folder / "tables" / "overfitting.csv")
        assert row["final_val_loss"] == pytest.approx(of["val_loss"].iloc[-1], rel=1e-12)
        assert row["final_train_loss"] == pytest.approx(of["train_loss"].iloc[-1], rel=1e-12)
        assert row["best_val_loss"] == pytest.approx(of["val_loss"].min(), rel=1e-12)
        assert row["final_eval_step"] == of["step"].iloc[-1] == 40
        for k in ("verdict", "divergence_step", "val_min_step", "val_series"):
            assert row[k] == summary["overfitting"][k], k
        assert row["gl5_step"] == summary["overfitting"]["gl5_step"]
        assert row["tau"] == summary["tau"] and row["tau"]["class_a"] == "irregular"
        spikes = pd.read_csv(folder / "tables" / "spikes.csv")
        assert row["spikes"]["loss"] == int(((spikes["series"] == "loss") & (spikes["kind"] == "spike")).sum())
        assert row["spikes"]["non_finite"] == int((spikes["kind"] == "non-finite").sum())
        # sigma_1 growth recomputed here from the exact SVD column, tensor by tensor, from the
        # checkpoint nearest mid-run (never the first or last of three or more) to the last
        sp = pd.read_csv(folder / "tables" / "spectral.csv")
        steps = sorted(sp["step"].unique())
        last = steps[-1]
        first = min(steps[1:-1] or steps[:1], key=lambda s: abs(s - last / 2))
        a = sp[sp["step"] == first].set_index("tensor")["sigma_exact"]
        b = sp[sp["step"] == last].set_index("tensor")["sigma_exact"]
        ratios = (b / a).dropna()
        g = row["spectral_growth"]
        assert (g["first_step"], g["last_step"]) == (first, last)
        assert g["max_ratio"] == pytest.approx(ratios.max(), rel=1e-9) and g["tensor"] == ratios.idxmax()
        assert g["sigma_last"] / g["sigma_first"] == pytest.approx(g["max_ratio"], rel=1e-12)
        assert row["checkpoints"] == len(summary["run"]["checkpoints"])
        growths.append(g)
    assert [(g["first_step"], g["last_step"]) for g in growths] == [(20, 40), (0, 20)]  # b lacks step 40
    assert spectral_growth(pd.read_csv(out / "runs/01-a/tables/spectral.csv").query("step == 0")) is None


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_page_is_escaped_self_contained_and_links_to_each_report(compared) -> None:
    out, _, _ = compared
    html = (out / "comparison.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    tags = [t for t, _ in page.tags]
    assert "script" not in tags and "iframe" not in tags and "object" not in tags
    imgs = [a for t, a in page.tags if t == "img"]
    assert imgs and all(a["src"].startswith("data:image/png;base64,") for a in imgs)  # the hostile <img> is text
    hrefs = [a["href"] for t, a in page.tags if t == "a"]
    assert hrefs == ["runs/01-a/report.html", "runs/02-b/report.html"] * 2
    for h in hrefs:
        assert FOLDER_RE.match(h.rsplit("/", 1)[0]) and (out / h).is_file()
    assert not any(("http:" in v or "https:" in v or v.startswith("//")) for _, a in page.tags for v in a.values()
                   if v)
    assert "url(" not in html
    csp = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    text = "".join(page.text)
    assert "<img src=x onerror=alert(1)>" in text and "\u202e" not in html and "[U+202E]" in text


def test_unreadable_run_is_a_row_and_exit_2(tiny_demo_run: Path, tmp_path: Path,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path / "cmp"
    _seed(out / "runs" / "01-tiny", tmp_path_factory.getbasetemp())
    res = CliRunner().invoke(main, ["report", str(tiny_demo_run), str(tmp_path / "missing"), "--out", str(out),
                                    "--workers", "1"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].startswith("trainaudit: error:") and "missing" in res.stderr
    doc = json.loads((out / "comparison.json").read_text())
    assert [r["status"] for r in doc["runs"]] == ["ok", "error"]
    assert doc["runs"][1]["report"] is None and "no such file" in doc["runs"][1]["error"]
    assert "not analysed" in (out / "comparison.html").read_text(encoding="utf-8")
    assert not (tiny_demo_run / "report" / "comparison.json").exists()  # nothing written into the run


def _browser():
    """The DevTools harness of test_browser.py (loaded by path: test files are not a package)."""
    path = Path(__file__).with_name("test_browser.py")
    spec = importlib.util.spec_from_file_location("_ta_browser_harness", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_comparison_page_in_chromium(compared, tmp_path: Path) -> None:
    harness = _browser()
    if harness.CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'); .ci/run installs it")
    from PIL import Image

    out, _, _ = compared
    url = (out / "comparison.html").as_uri()
    events, png, metrics, boxes = harness.visit(url, tmp_path / "profile")
    assert harness.problems(events, url) == []
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)[:1300]  # the page proper
    assert metrics["cssContentSize"]["height"] > 1000 and img.shape[1] >= 1000
    assert img.std() > 20 and (img < 128).mean() > 0.005  # not blank: tables, text and the figure
    # the loss figure shows drawn curves (coloured pixels; text, axes and grid are grey), not only its labels
    (x0, y0, x1, y1), = boxes
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)[y0:y1, x0:x1]
    assert ((rgb.max(axis=2) - rgb.min(axis=2)) > 30).mean() > 5e-4
    (out / "screenshot.png").write_bytes(png)
