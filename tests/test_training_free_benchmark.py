"""benchmarks/training_free.py end to end on the tiny model: calibration, the three measurements, both files."""

import json

from benchmarks.training_free import main


def test_benchmark_writes_table_and_json(tmp_path):
    out = tmp_path / "table.md"
    results = main(["--backbone", "tiny", "--texts", "3", "--max-length", "16", "--out", str(out)])
    assert list(results) == ["none", "act", "zerotuning"]
    text = out.read_text()
    assert "| held-out perplexity |" in text and "zerotuning" in text
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["calibration"]["act"]["criterion"] == "attention"
    assert payload["results"]["none"]["perplexity"] > 1
