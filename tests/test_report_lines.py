"""A metric against a swept key, one line per series (engram report --x, results kind = "lines")."""

import pytest

from engram_core.tools.report import ReportError, line_series, plot_sweep_lines
from engram_core.tools.results import render_figure


def _agg(mean, n=3):
    return {"mean": mean, "sd": 0.1, "n": n, "values": [mean] * n}


def test_lines_group_by_series_and_sort_by_x():
    pts = [({"memory": {"type": "hrr"}, "data.n_pairs": 8}, _agg(0.5)), ({"memory": {"type": "hrr"}, "data.n_pairs": 4}, _agg(0.7)),
           ({"memory": "none", "data.n_pairs": 4}, _agg(0.1)), ({"memory": "none"}, _agg(0.2)), ({"memory": "none", "data.n_pairs": 8}, None)]
    lines = line_series(pts, "data.n_pairs", ["memory"])
    assert list(lines) == ["hrr", "none"]
    assert [x for x, _ in lines["hrr"]] == [4.0, 8.0] and lines["hrr"][0][1]["mean"] == 0.7
    assert [x for x, _ in lines["none"]] == [4.0]  # no x, or no value: left out


def test_a_key_that_was_not_swept_is_one_clear_error(tmp_path):
    sweep = {"name": "s", "keys": ["memory", "run.seed"], "plan": [], "summaries": []}
    with pytest.raises(ReportError, match="--x data.n_pairs: not a swept key; swept: memory, run.seed"):
        plot_sweep_lines(sweep, tmp_path / "x.png", "data.n_pairs", ["memory"], "eval/acc")


def test_results_lines_figure_names_lines_by_row_and_series(tmp_path):
    data = {
        f"zoo.{i:02d}": {"point": {"memory": m, "data.n_pairs": n}, "metrics": {"eval/acc": _agg(v)}, "runs": [], "status": ["completed"] * 3}
        for i, (m, n, v) in enumerate([("none", 4, 0.1), ("none", 8, 0.05), ({"type": "hrr"}, 4, 0.6), ({"type": "hrr"}, 8, 0.4)])
    }
    out = tmp_path / "f.png"
    render_figure({"id": "f", "kind": "lines", "rows": ["zoo.*"], "key": "eval/acc", "x": "data.n_pairs", "series": ["memory"]}, data, out, {"zoo": "window 2"})
    assert out.stat().st_size > 1000
