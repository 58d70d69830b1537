"""The HTML report: escaping of everything a run supplies, self-containment, atomic writes, figure cache."""
from __future__ import annotations

import errno
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analyze.config import AnalysisConfig
from analyze.pipeline.analysis import analyze_run
from analyze.pipeline.output import FigureFolder, write_report
from loaders.errors import TrainauditError
from loaders.run import CheckpointRef, ModelSpec, Run
from reports import html as H
from reports import page as P

EVIL = "<img src=x onerror=alert(1)>"
TEMPLATE_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "header", "h1", "h2", "dl", "dt", "dd",
                 "section", "p", "span", "strong", "div", "table", "caption", "thead", "tbody", "tr", "th", "td",
                 "nav", "figure", "img", "ul", "li", "code", "footer"}


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def live_problems(doc: str) -> list[str]:
    """Elements or attributes a template of ours never writes; URLs that would fetch anything."""
    p = _Collect()
    p.feed(doc)
    out = []
    for tag, attrs in p.tags:
        if tag not in TEMPLATE_TAGS:
            out.append(f"element <{tag}>")
        for k, v in attrs:
            if k.lower().startswith("on"):
                out.append(f"event attribute {k} on <{tag}>")
            if k in ("src", "href") and not (v or "").startswith("data:image/png;base64,"):
                out.append(f"{k}={v!r} on <{tag}>")
    for url in re.findall(r"url\(([^)]*)\)", p.style):
        out.append(f"css url({url})")
    return out


def hostile_run(tmp: Path, *, name: str = EVIL) -> Run:
    """A run whose every name carries markup: run, class, tensor, model name and config."""
    rng = np.random.default_rng(0)
    steps = np.arange(120)
    loss = 2.0 * np.exp(-steps / 40) + 0.3 + 0.01 * rng.standard_normal(120)
    scalars = pd.concat([pd.DataFrame({"step": steps, "series": "loss", "value": loss}),
                         pd.DataFrame({"step": steps, "series": "grad_norm", "value": 1 + 0 * loss})])
    evals = pd.DataFrame({"step": steps[::20], "series": "<b>val</b>", "loss": loss[::20] + 0.1})
    cls = pd.DataFrame([{"step": s, "cls": c, "count": 4, "loss_sum": 4.0 * (1 + i), "loss_m2": 0.1}
                        for s in steps for i, c in enumerate(["<script>", "ok"])])
    ck = tmp / "ck"
    ck.mkdir(parents=True, exist_ok=True)
    refs = []
    gen = torch.Generator().manual_seed(0)
    for j, step in enumerate((0, 60, 119)):
        p = ck / f"{j}.safetensors"
        w = torch.randn(16, 8, generator=gen) * (1 + j)
        save_file({"<script>alert(1)</script>": w, "x.bias": torch.zeros(3)}, str(p))
        refs.append(CheckpointRef(step, p, "safetensors"))
    return Run(path=tmp / EVIL, name=name, source_format="synthetic", scalars=scalars, evals=evals, class_losses=cls,
               checkpoints=refs, class_names=["<script>", "ok"],
               model=ModelSpec("<b>evil-model</b>", {"k": "<i>x</i>"}),
               meta={"created": "<svg onload=alert(1)>"})


@pytest.fixture(scope="module")
def fig_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("figures")


@pytest.fixture(scope="module")
def hostile_html(tmp_path_factory: pytest.TempPathFactory, fig_cache: Path) -> tuple[str, object]:
    tmp = tmp_path_factory.mktemp("hostile")
    res = analyze_run(hostile_run(tmp), AnalysisConfig(exact_svd=True))
    return H.render_report(res, {"<i>extra</i>": "<u>v</u>"}, figure_cache=FigureFolder(fig_cache)), res


def test_checker_catches_live_markup() -> None:
    # the control: without escaping, the payload is a live element with an event handler
    assert any("<img>" in p or "onerror" in p for p in live_problems(f"<p>{EVIL}</p>"))
    assert live_problems('<a href="javascript:alert(1)">x</a>')
    assert live_problems("<style>body{background:url(https://e.x/a.png)}</style>")
    import jinja2

    raw = jinja2.Environment().from_string("{{ x }}").render(x=EVIL)  # jinja2's default does not escape
    assert live_problems(raw)


def test_every_run_supplied_name_is_escaped(hostile_html) -> None:
    doc, res = hostile_html
    assert live_problems(doc) == []
    assert "&lt;img src=x onerror=alert(1)&gt;" in doc
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc  # tensor name (spectral table)
    assert "&lt;script&gt;" in doc  # class name
    assert "&lt;b&gt;evil-model&lt;/b&gt;" in doc  # model name in the "why not computed" line
    assert "&lt;svg onload=alert(1)&gt;" in doc  # run metadata (created) in the header
    assert "&lt;i&gt;extra&lt;/i&gt;" in doc and "&lt;u&gt;v&lt;/u&gt;" in doc  # extra header rows
    assert "&lt;b&gt;val&lt;/b&gt;" in doc  # validation series name
    assert "<script" not in doc.lower() and "<svg" not in doc.lower()
    assert "Not computed for this run" in doc  # model panels say why, they do not vanish
    assert len(res.tables["spectral"]) == 3


def test_autoescape_is_on_for_the_j2_template() -> None:
    env = P.environment()
    assert env.autoescape is True
    out = env.from_string("{{ x }}").render(x="<b>")
    assert out == "&lt;b&gt;"


def test_self_contained_and_csp(hostile_html) -> None:
    doc, res = hostile_html
    p = _Collect()
    p.feed(doc)
    metas = [dict(a) for t, a in p.tags if t == "meta"]
    assert {"http-equiv": "Content-Security-Policy",
            "content": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"} in metas
    imgs = [dict(a) for t, a in p.tags if t == "img"]
    assert imgs and all(i["src"].startswith("data:image/png;base64,") for i in imgs)
    assert not any(k in ("href",) for _, attrs in p.tags for k, _ in attrs)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:|//)", doc, re.I)
    assert "url(" not in p.style


def test_unicode_tricks_are_neutralised(tmp_path: Path, hostile_html, fig_cache: Path) -> None:
    long_tail = "x" * 1_000_000
    name = "a\x00b\ud800c\u202ed" + long_tail
    res = analyze_run(hostile_run(tmp_path, name=name), AnalysisConfig(exact_svd=True))
    doc = H.render_report(res, figure_cache=FigureFolder(fig_cache))  # hostile_html's tables: cached figures
    doc.encode("utf-8")  # no lone surrogate survives (strict encoding would raise)
    assert "\x00" not in doc and "\u202e" not in doc and "[U+202E]" in doc
    p = _Collect()
    p.feed(doc)
    spans = [dict(a) for t, a in p.tags if t == "span" and "title" in dict(a)]
    assert any(len(s["title"]) >= 1_000_000 for s in spans)  # the full name, escaped, in a title
    h1 = re.search(r"<h1>(.*?)</h1>", doc, re.S).group(1)
    assert len(re.sub(r'title="[^"]*"', "", h1)) < 500  # displayed shortened
    assert live_problems(doc) == []


def test_write_is_atomic_and_disk_full_leaves_old_report(hostile_html, fig_cache: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    doc, res = hostile_html
    target = tmp_path / "report.html"
    target.write_text("old report")

    def disk_full(_fd: int) -> None:  # data written, then the flush to disk fails (ENOSPC)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TrainauditError, match="cannot write report: no space left"):
        write_report(res, target, figure_cache=fig_cache)
    monkeypatch.undo()
    assert target.read_text() == "old report"
    assert list(tmp_path.iterdir()) == [target]  # the temp file was removed
    write_report(res, target, {"<i>extra</i>": "<u>v</u>"}, figure_cache=fig_cache)
    strip = lambda s: re.sub(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", s)  # noqa: E731
    assert strip(target.read_text(encoding="utf-8")) == strip(doc)


def test_reports_write_no_file_and_refuse_a_path_as_cache(hostile_html, tmp_path: Path, monkeypatch) -> None:
    _, res = hostile_html
    store: dict[str, str] = {"stale": "data:image/png;base64,AAAA"}
    calls = []
    monkeypatch.setattr(P, "draw_figure", lambda *a, **k: calls.append(a[0]) or "data:image/png;base64,QQ==")
    doc = H.render_report(res, figure_cache=store)
    assert "stale" not in store and len(store) == len(calls) >= 5  # pruned, every drawn figure kept
    assert doc.count('src="data:image/png;base64,QQ=="') == len(calls)
    with pytest.raises(TypeError, match="FigureFolder"):
        H.render_report(res, figure_cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_figure_cache_draws_nothing_the_second_time(hostile_html, fig_cache: Path, monkeypatch) -> None:
    first, res = hostile_html
    n_img = first.count('<img src="data:image/png;base64,')
    assert n_img >= 5 and len(list(fig_cache.glob("*.b64"))) == n_img
    calls = []
    monkeypatch.setattr(P, "draw_figure", lambda *a, **k: calls.append(a) or "data:image/png;base64,")
    second = H.render_report(res, {"<i>extra</i>": "<u>v</u>"}, figure_cache=FigureFolder(fig_cache))
    assert calls == []
    strip = lambda s: re.sub(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", s)  # noqa: E731
    assert strip(first) == strip(second)


def test_fmt_num_and_names() -> None:
    assert P.fmt_num(float("nan")) == "\u2013" and P.fmt_num(None) == "\u2013"
    assert P.fmt_num(1.23456789) == "1.235" and P.fmt_num(2.5e-7) == "2.50e-07"
    assert P.fmt_num(12345) == "12,345" and P.fmt_num(True) == "yes"
    assert P.clean_text("a\x00\x07b") == "a\ufffd\ufffdb"
    s = P.short_name("n" * 500)
    assert len(s) == 80 and "\u2026" in s


def test_template_quotes_every_attribute_and_builds_no_url_from_input() -> None:
    text = (P.TEMPLATES / "report.html.j2").read_text(encoding="utf-8")
    tags = re.findall(r"<[a-zA-Z][^<>]*>", re.sub(r"\{#.*?#\}", "", text, flags=re.S))
    assert len(tags) > 30
    for tag in tags:
        # every name=value has its value in double quotes (autoescape does not protect unquoted ones)
        for m in re.finditer(r"""\s([\w-]+)=("[^"]*"|'[^']*'|[^\s"'>]+)""", tag):
            assert m.group(2).startswith('"'), tag
    # the only src is the figure data URI the report draws itself; no href at all
    assert re.findall(r'\b(?:src|href)="([^"]*)"', text) == ["{{ uri }}"]


def test_bands_drawn_and_written_come_from_the_results_config(hostile_html, monkeypatch) -> None:
    import dataclasses
    from types import SimpleNamespace

    _, res = hostile_html
    cfg = AnalysisConfig(rho_low=1e-3, rho_high=5e-2, update_ratio_low=2e-6, update_ratio_high=3e-3)
    with_cfg = SimpleNamespace(**{**{f.name: getattr(res, f.name) for f in dataclasses.fields(res)}, "config": cfg})
    calls: dict[str, dict] = {}

    def record(draw: str, *args: object, **kwargs: object) -> str:
        calls[draw] = kwargs
        return "data:image/png;base64,"

    monkeypatch.setattr(P, "draw_figure", record)
    doc = H.render_report(with_cfg)
    assert len(res.tables["update_ratio"]) and calls["plot_update_ratio"]["healthy"] == (2e-6, 3e-3)
    assert "rho = ||G||/||W|| between 1e-3 and 5e-2 for every matrix" in doc
    assert "inside the shaded 2e-6 to 3e-3" in doc  # the text names the band the figure shades
    calls.clear()
    doc = H.render_report(res)  # a result without a config: the AnalysisConfig defaults
    default = AnalysisConfig()
    assert calls["plot_update_ratio"]["healthy"] == (default.update_ratio_low, default.update_ratio_high)
    assert "rho = ||G||/||W|| between 1e-4 and 1e-1 for every matrix" in doc
    assert "inside the shaded 1e-5 to 1e-2" in doc and "near 1e-3 per step)" in doc
