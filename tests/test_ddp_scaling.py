"""benchmarks/ddp_scaling.py: the row arithmetic, and its tiny CPU check (gloo, 1 and 2 ranks) end to end."""

import json

import pytest

from benchmarks.ddp_scaling import add_speedups, main, summarise


def timer_json(world: int, steps_per_s: float, first_loss: float, peak=None) -> dict:
    return {
        "world_size": world,
        "steps": 10,
        "steps_per_s_median": steps_per_s,
        "steps_per_s_mean": steps_per_s * 0.99,
        "first_loss": first_loss,
        "peak_mem_gib": peak,
    }


def test_summarise_counts_every_rank_batch_per_step():
    row = summarise([timer_json(2, 4.0, 11.0, 20.0), timer_json(2, 3.9, 11.5, 21.0)], batch=8, length=2048)
    assert row["tokens_per_s_total"] == pytest.approx(8 * 2048 * 2 * 4.0 * 0.99)  # rank 0 mean, both ranks
    assert row["world_size"] == 2 and row["first_loss"] == 11.0
    assert row["first_loss_per_rank"] == [11.0, 11.5]
    assert row["peak_mem_gib"] == 21.0 and row["peak_mem_gib_per_rank"] == [20.0, 21.0]
    assert summarise([timer_json(1, 4.0, 11.0)], 8, 2048)["peak_mem_gib"] is None  # CPU: no peak memory


def test_speedup_efficiency_and_targets_against_the_one_device_row():
    rows = add_speedups(
        [
            {"devices": 1, "tokens_per_s_total": 100.0},
            {"devices": 2, "tokens_per_s_total": 191.0},
            {"devices": 4, "tokens_per_s_total": 360.0},
            {"devices": 8, "error": "needs 8 devices"},
        ]
    )
    assert [r["speedup"] for r in rows[:3]] == pytest.approx([1.0, 1.91, 3.6]) and rows[3]["speedup"] is None
    assert [r["efficiency"] for r in rows[:3]] == pytest.approx([1.0, 0.955, 0.9])
    assert [r["target"] for r in rows] == [None, 1.9, 3.7, None]
    assert [r["meets_target"] for r in rows] == [None, True, False, None]


def test_no_speedup_without_a_one_device_result():
    rows = add_speedups([{"devices": 1, "error": "OOM"}, {"devices": 2, "tokens_per_s_total": 191.0}])
    assert rows[1]["speedup"] is None and rows[1]["efficiency"] is None and rows[1]["meets_target"] is None


def test_tiny_cpu_check_runs_one_and_two_ranks(tmp_path):
    out = tmp_path / "ddp.json"
    rows = main(["--tiny", "--devices", "1,2", "--json", str(out), "--work", str(tmp_path / "work")])
    assert [r["devices"] for r in rows] == [1, 2]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    one, two = rows
    assert [one["world_size"], two["world_size"]] == [1, 2]
    assert one["tokens_per_s_total"] > 0 and two["tokens_per_s_total"] > 0
    assert two["tokens_per_s_total"] == pytest.approx(2 * 64 * 2 * two["steps_per_s_mean"])
    assert one["speedup"] == 1.0
    assert two["speedup"] == pytest.approx(two["tokens_per_s_total"] / one["tokens_per_s_total"])
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert two["target"] == 1.9 and two["meets_target"] == (two["speedup"] >= 1.9)
    # rank 0 trains on the 1-device batch (same first loss); rank 1 on its own (weak scaling)
    assert two["first_loss_per_rank"][0] == pytest.approx(one["first_loss"], rel=1e-5)
    assert two["first_loss_per_rank"][1] != pytest.approx(one["first_loss"], rel=1e-5)
    assert json.loads(out.read_text())["rows"] == rows
