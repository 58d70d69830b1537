"""summary.json's published contract: the JSON Schema shipped in the package, checked with jsonschema."""
from __future__ import annotations

import configparser
import copy
import fnmatch
import json
import re
from pathlib import Path

import jsonschema
import pytest

from analyze.pipeline.tables import SUMMARY_SCHEMA, Finding, build_summary, summary_schema, validate_summary

ROOT = Path(__file__).resolve().parents[2]


def summary() -> dict:
    findings = [Finding("warning", "loss_spike", "m", step=5, value=7.0, threshold=6.0, metric="loss"),
                Finding("warning", "loss_spike", "3 more", metric="loss", n=3),
                Finding("info", "memorisation", "m", step=9, value=0.01, threshold=0.25)]
    return build_summary(
        run={"name": "r", "source_format": "trainaudit", "steps_logged": 10, "checkpoints": [0, 10]},
        overfitting={"verdict": "recovered", "divergence_step": None, "val_min_step": 4, "gl5_step": 6,
                     "val_series": "val", "final_gl": 2.6, "memorisation": True},
        spikes=[{"series": "loss", "kind": "spike", "first_step": 5, "peak_step": 5, "height_mad": 14.826,
                 "height_sigma": 10.0, "length": 1},
                {"series": "grad_norm", "kind": "non-finite", "first_step": 7, "peak_step": 7, "height_mad": None,
                 "height_sigma": None, "length": 2}],
        tau=None, findings=findings, notes=["n"], spike_score={"loss": 0.1, "grad_norm": None},
        checkpoint_to_keep={"best_val_step": 0, "last_stable_step": None})


def test_schema_is_a_valid_draft_2020_12_schema_and_ships_as_package_data():
    schema = summary_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pkg = cfg["options.package_data"]
    assert any(fnmatch.fnmatch(SUMMARY_SCHEMA, pat.strip()) for pat in pkg["analyze.pipeline"].split())
    assert "jsonschema" in cfg["options.extras_require"]["test"]
    assert (ROOT / "analyze" / "pipeline" / SUMMARY_SCHEMA).is_file()


def test_built_summary_is_valid_and_carries_the_new_keys():
    s = summary()
    assert validate_summary(s) == []
    json.dumps(s, allow_nan=False)
    assert s["spike_score"] == {"loss": 0.1, "grad_norm": None}
    assert s["checkpoint_to_keep"] == {"best_val_step": 0, "last_stable_step": None}
    assert s["finding_counts"] == {"error": 0, "warning": 4, "info": 1}  # the "3 more" row counts 3
    assert s["spikes"][0]["height_mad"] == pytest.approx(1.4826 * s["spikes"][0]["height_sigma"])
    assert [f["n"] for f in s["findings"]] == [1, 3, 1]


@pytest.mark.parametrize("mutate", [
    lambda s: s.pop("spike_score"),
    lambda s: s["spike_score"].pop("grad_norm"),
    lambda s: s["spike_score"].update(loss=1.5),                 # a share is at most 1
    lambda s: s["spike_score"].update(loss="0.1"),
    lambda s: s.pop("checkpoint_to_keep"),
    lambda s: s["checkpoint_to_keep"].update(best_val_step=1.5),
    lambda s: s["checkpoint_to_keep"].pop("last_stable_step"),
    lambda s: s["spikes"][0].pop("height_sigma"),
    lambda s: s["spikes"][0].update(height_mad="big"),
    lambda s: s["overfitting"].update(verdict="maybe"),
    lambda s: s["overfitting"].update(memorisation="yes"),
    lambda s: s["findings"][0].update(n=0),
    lambda s: s["findings"][0].update(severity="fatal"),
    lambda s: s["finding_counts"].pop("info"),
    lambda s: s.update(format_version=2),
    lambda s: s["run"].update(steps_logged=True),               # a bool is not an integer
    lambda s: s["notes"].append(3),
    lambda s: s.update(tau={"class_a": "a"}),
])
def test_schema_rejects_each_broken_shape(mutate):
    bad = copy.deepcopy(summary())
    mutate(bad)
    problems = validate_summary(bad)
    assert problems and all(p.startswith("$") for p in problems)


def test_docs_list_every_top_level_key_and_finding_code_table_has_the_new_codes():
    doc = (ROOT / "docs" / "summary-json.md").read_text(encoding="utf-8")
    for key in summary_schema()["properties"]:
        assert f"| `{key}` |" in doc, key
    for code in ("tau_disagreement", "memorisation", "overfitting_recovered"):
        assert re.search(rf"\| `{code}` \|", doc), code
    assert "summary.schema.json" in doc
