"""d2l_memory.reporting: a script's command line and its results written to JSON and BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2l_memory.reporting import save_results, script_command


def test_script_command_quotes_the_arguments_it_was_given() -> None:
    assert script_command("chunk_prior.py", ["--docs", "2", "--out", "a b"]) == \
        "python benchmarks/chunk_prior.py --docs 2 --out 'a b'"
    assert script_command("chunk_prior.py", []) == "python benchmarks/chunk_prior.py"


def test_save_results_writes_the_raw_file_and_only_the_named_section(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "results" / "x.json"
    save_results({"a": 1}, raw, "## X\n\ntable")
    assert json.loads(raw.read_text()) == {"a": 1} and not (tmp_path / "BENCHMARKS.md").exists()
    save_results({"a": 2}, raw, "## X\n\ntable", section="x")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- BEGIN x -->\n## X\n\ntable" in text and f"`{raw.as_posix()}`" in text
