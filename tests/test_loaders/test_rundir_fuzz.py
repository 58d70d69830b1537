"""Property tests of our run-dir parsers: random and mutated bytes of valid files end in a
Run (with warnings) or in TrainauditError - never in another exception.

>= 2,000 examples per parser in CI (CI=true), 300 locally (TRAINAUDIT_FUZZ_EXAMPLES overrides).
One ``st.binary`` draw encodes each example (``decode``, as in test_foreign_fuzz.py): nested
``lists(tuples(...))`` strategies cost 2.5 ms an example in hypothesis alone.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders import RunLogger, TrainauditError
from loaders.errors import DataWarnings
from loaders.rundir import _read_class_log, _read_eval_log, read_run_dir, read_train_log

from fuzzbytes import decode  # tests/fuzzbytes.py (pythonpath = tests)

PARSERS = {  # file -> the parser that reads it alone (read_run_dir reads them all)
    "train.csv": lambda d, w: read_train_log(d, w),
    "class_losses.csv": lambda d, w: _read_class_log(d, w),
    "eval.jsonl": lambda d, w: _read_eval_log(d, w),
    "run.json": lambda d, w: read_run_dir(d),
}

EXAMPLES = int(os.environ.get("TRAINAUDIT_FUZZ_EXAMPLES", "2000" if os.environ.get("CI") else "300"))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "run"
    with RunLogger(d, class_names=["a", "b,c"], flush_every=4) as log:
        for s in range(12):
            log.log_step(s, loss=1.0 / (s + 1), grad_norm=float(s), lr=1e-3)
            log.log_class_losses(s, __import__("torch").tensor([0.5, 1.5, 2.5]), __import__("torch").tensor([0, 1, 1]))
        log.log_eval(5, loss=0.7, class_losses={"a": (0.6, 3)})
        log.log_eval(10, split="test", loss=0.9)
    return d


@pytest.mark.parametrize("name", ["train.csv", "class_losses.csv", "eval.jsonl", "run.json"])
def test_mutated_files_end_in_a_run_or_the_project_error(template: Path, tmp_path: Path, name: str) -> None:
    work = tmp_path / "run"
    work.mkdir()
    if name == "run.json":  # the metadata parser alone: the logs beside it are absent
        (work / "run.json").write_bytes((template / "run.json").read_bytes())
    original = (template / name).read_bytes()
    parse = PARSERS[name]

    count = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=400))
    def check(blob: bytes) -> None:
        count[0] += 1
        (work / name).write_bytes(decode(blob, [original]))
        warnings = DataWarnings()
        try:
            parse(work, warnings)
        except TrainauditError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(work))
            return
        assert all(isinstance(w, str) and "\n" not in w for w in warnings)

    check()
    assert count[0] >= EXAMPLES


def test_run_json_from_a_newer_format_is_refused(template: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    shutil.copytree(template, work)
    meta = json.loads((work / "run.json").read_text())
    (work / "run.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(TrainauditError, match="format_version 2 is newer"):
        read_run_dir(work)


@pytest.mark.parametrize("content,expect_rows,expect_warning", [
    (b"step,loss,grad_norm,lr,wall_time\n1,2.0,3.0,,1.0\n2,2", [1], "incomplete final line"),
    (b"\xef\xbb\xbfstep,loss,grad_norm,lr,wall_time\r\n1,2.0,3.0,,1.0\r\n", [1], None),
    (b"step,loss,grad_norm,lr,wall_time\n1,2.0,3.0,,1.0\nxx,yy\n3,1.0,1.0,,1.0\n", [1, 3], ":3: malformed row"),
    (b"step,loss,grad_norm,lr,wall_time\n1,nan,inf,,1.0\n2,1.0,1.0,,1.0\n\x00\x00\x00", [1, 2], "NUL bytes"),
    (b"step,loss,grad_norm,lr,wall_time\n-1,2.0,3.0,,1.0\n1.5,2.0,3.0,,1.0\n2,1,1,,1\n", [2], "1 row with a negative step dropped"),
    (b"step,loss,grad_norm,lr,wall_time\n-1,2.0,3.0,,1.0\n1.5,2.0,3.0,,1.0\n2,1,1,,1\n", [2], "1 row with a non-integer step"),
])
def test_hand_built_train_logs(template: Path, tmp_path: Path, content: bytes, expect_rows: list[int],
                               expect_warning: str | None) -> None:
    work = tmp_path / "run"
    shutil.copytree(template, work)
    (work / "train.csv").write_bytes(content)
    run = read_run_dir(work)
    assert run.series("loss")["step"].tolist() == expect_rows
    if expect_warning is None:
        assert not [w for w in run.warnings if "train.csv" in w]
    else:
        assert any(expect_warning in w for w in run.warnings), run.warnings
