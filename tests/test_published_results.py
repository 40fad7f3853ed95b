"""Every number of a published report is recomputed from the raw files committed beside it.

docs/results/<study>/runs/ keeps each run's config.yaml, log.jsonl, eval.json (both BatchNorm
protocols) and done.json; the report is rewritten from a copy of them and must match, table line
for table line, the report.md that is committed.
"""

import shutil
from pathlib import Path

import pytest

from asbnn.experiments.reproduce import reproduce

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"

#: study folder -> the `asbnn reproduce` call that made it (the command in its README)
PUBLISHED = {"cpu": (["all"], "cpu", 3), "map": (["map"], "cpu", 3), "mid": (["table2"], "mid", 2),
             "mid-narrow": (["table2"], "mid-narrow", 2), "mid-long": (["table2"], "mid-long", 2)}


def _tables(report: Path) -> list[str]:
    return [line for line in report.read_text().splitlines() if line.startswith("|")]


@pytest.mark.parametrize("study", sorted(PUBLISHED))
def test_report_numbers_come_from_the_committed_runs(study, tmp_path):
    tables, scale, seeds = PUBLISHED[study]
    folder = DOCS / study
    assert (folder / "report.md").is_file() and any((folder / "runs").iterdir())
    copy = tmp_path / study
    shutil.copytree(folder / "runs", copy / "runs", ignore=shutil.ignore_patterns("*.png"))
    rewritten = reproduce(tables, scale, copy, seeds=seeds, progress=False, report_only=True)
    committed = _tables(folder / "report.md")
    assert committed and _tables(rewritten) == committed
