"""The results pipeline: published tables equal their JSON, JSON names recipes that validate,
and a page runs from an empty cache into JSON, tables and figures."""

import json
import shutil
import tomllib
from pathlib import Path

import attrs
import pytest

from engram_core.testing.cli import run_cli
from engram_core.tools import results as R

SPEC = """
[[rows]]
id = "mlp"
recipe = "recipes/minimal.toml"
overrides = ["stages.0.steps=30", "stages.0.eval_every=15", "stages.0.warmup_steps=5"]
seeds = [0, 1]
label = "MLP"

[[rows]]
id = "width"
recipe = "recipes/minimal.toml"
overrides = ["stages.0.steps=30", "stages.0.eval_every=15", "stages.0.warmup_steps=5",
             'sweep."head.hidden"=[16, 32]', 'sweep."run.seed"=[3, 4]']

[[tables]]
id = "main"
rows = ["mlp", "width.*"]
columns = [{ key = "eval/loss", label = "eval loss", fmt = ".4f" }]

[[tables]]
id = "grid"
header = ["what", "loss"]
cells = [["mlp", "@mlp:eval/loss"], ["narrow", "@width.00:train:eval/loss"]]

[[figures]]
id = "bars"
rows = ["mlp", "width.*"]
key = "eval/loss"
"""

PAGE_MD = """# trial

Prose stays as written.

<!-- results:table main -->
<!-- results:end -->

<!-- results:table grid -->
<!-- results:end -->

<!-- results:figure bars -->
<!-- results:end -->
"""


@pytest.mark.parametrize("name", R.list_pages())
def test_every_published_page_equals_what_its_json_renders(name):
    """A hand-edited number, a table the JSON does not back, or JSON whose recipe no longer
    exists or validates fails here (and so in CI)."""
    problems = R.check_page(R.load_page(name))
    assert not problems, "\n".join(problems)


def test_every_page_has_data_behind_its_tables():
    for name in R.list_pages():
        page = R.load_page(name)
        data = R.load_data(page)
        for t in page.tables:
            refs = t.get("rows") or R._cell_rows(t)
            # a table may wait for its rows only with the reason on the page (`pending`)
            assert R._rows_matching(data, refs) or t.get("pending"), f"{name}: table {t['id']} has no JSON behind it"


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    """A two-row page (one with a sweep over a width and run.seed) run by the pipeline."""
    root = tmp_path_factory.mktemp("results")
    (root / "trial.toml").write_text(SPEC)
    (root / "trial.md").write_text(PAGE_MD)
    page = R.load_page(root / "trial.toml")
    written = R.run_page(page, jobs=2, allow_dirty=True)
    (root / "trial.md").write_text(R.render_page(page))
    return page, written


def test_a_page_runs_into_one_json_per_row(trial):
    page, written = trial
    assert sorted(p.name for p in written) == ["mlp.json", "width.00.json", "width.01.json"]
    d = json.loads((page.data_dir / "mlp.json").read_text())
    for key in ("recipe", "overrides", "seeds", "commit", "device", "versions", "wall_time_s", "metrics", "runs", "host"):
        assert key in d, key
    assert d["seeds"] == [0, 1] and d["status"] == ["completed", "completed"]
    assert d["versions"]["torch"] and "transformers" in d["versions"]
    agg = d["metrics"]["eval/loss"]
    values = [r["metrics"]["eval/loss"] for r in d["runs"]]
    assert agg["values"] == values and agg["n"] == 2
    assert agg["mean"] == pytest.approx(sum(values) / 2)
    assert d["runs"][0]["curves"]["train:eval/loss"][0][0] == 15  # eval curve against the step
    assert "train:last:train/loss" in d["metrics"]  # what the stage trained to
    curve = d["runs"][0]["curves"]["train:eval/loss"]  # early stopping read off the curve
    best = min(curve, key=lambda sv: sv[1])
    assert d["runs"][0]["metrics"]["train:min:eval/loss"] == best[1]
    assert d["runs"][0]["metrics"]["train:argmin:eval/loss"] == best[0]
    # a sweep over run.seed becomes the rows' seeds, the other key the rows
    w = json.loads((page.data_dir / "width.00.json").read_text())
    assert w["point"] == {"head.hidden": 16} and w["seeds"] == [3, 4]
    # what the runs ran (their run directory's recipe.toml), defaults included, without the
    # keys the pipeline sets per run; one record per row, the seeds having run the same recipe
    ran = tomllib.loads(d["resolved_recipe"])
    assert ran["stages"][0]["steps"] == 30 and ran["stages"][0]["weight_decay"] == 0.0
    assert "seed" not in ran["run"] and "out_dir" not in ran["run"]
    assert tomllib.loads(w["resolved_recipe"])["head"]["hidden"] == 16
    assert not any("resolved_recipe" in r for r in d["runs"] + w["runs"])


def test_tables_and_figures_are_rendered_from_the_json(trial):
    page, _ = trial
    text = page.md_file.read_text()
    assert "Prose stays as written." in text
    d = json.loads((page.data_dir / "mlp.json").read_text())["metrics"]["eval/loss"]
    assert f"{d['mean']:.4f} ± {d['sd']:.4f}" in text
    assert "| head.hidden=16 |" in text and "![bars](figures/trial-bars.png)" in text
    assert (page.md_file.parent / "figures" / "trial-bars.png").stat().st_size > 1000
    assert R.check_page(page) == []  # the recorded resolved recipes equal today's, sweep points included


def test_a_hand_edited_number_fails_the_check(trial, tmp_path):
    page, _ = trial
    copy = tmp_path / "page"
    shutil.copytree(page.spec_file.parent, copy)
    page2 = R.load_page(copy / "trial.toml")
    d = json.loads((page2.data_dir / "mlp.json").read_text())["metrics"]["eval/loss"]
    shown = f"{d['mean']:.4f}"
    md = page2.md_file.read_text()
    page2.md_file.write_text(md.replace(shown, f"{d['mean'] - 0.5:.4f}", 1))
    problems = R.check_page(page2)
    assert any("block table main differs" in p for p in problems), problems


def test_json_naming_a_missing_or_invalid_recipe_fails_the_check(trial, tmp_path):
    page, _ = trial
    copy = tmp_path / "page"
    shutil.copytree(page.spec_file.parent, copy)
    page2 = R.load_page(copy / "trial.toml")
    f = page2.data_dir / "width.01.json"
    d = json.loads(f.read_text())
    f.write_text(json.dumps(d | {"recipe": "recipes/gone.toml"}))
    f2 = page2.data_dir / "mlp.json"
    f2.write_text(json.dumps(json.loads(f2.read_text()) | {"overrides": ["head.hiden=3"]}))
    problems = "\n".join(R.check_page(page2))
    assert "recipes/gone.toml does not exist" in problems
    assert "does not validate" in problems and "hiden" in problems


def test_the_pipeline_refuses_uncommitted_code(monkeypatch, tmp_path):
    (tmp_path / "p.toml").write_text(SPEC)
    monkeypatch.setattr(R, "source_commit", lambda: ("abc", ["engram_core/train/engine.py"]))
    with pytest.raises(R.EngramError, match="uncommitted changes .*engram_core/train/engine.py"):
        R.run_page(R.load_page(tmp_path / "p.toml"))


def test_engram_results_cli(tmp_path):
    r = run_cli("results", "check", str(tmp_path / "nope.toml"), tool="engram")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no results page spec" in r.stderr
    r = run_cli("results", "list", tool="engram", plugins=None)
    assert r.returncode == 0 and "qwen-compressor" in r.stdout
    r = run_cli("results", "run", "memory-zoo", "--resume", tool="engram")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--keep DIR --resume" in r.stderr


def test_a_failed_run_is_recorded_not_hidden(tmp_path):
    spec = SPEC.split("[[rows]]")[1].replace('"stages.0.steps=30"', '"stages.0.steps=30", "stages.0.lr=1e9"')
    (tmp_path / "f.toml").write_text("[[rows]]" + spec.replace("seeds = [0, 1]", "seeds = [0]"))
    page = R.load_page(tmp_path / "f.toml")
    R.run_page(page, allow_dirty=True)
    d = json.loads((page.data_dir / "mlp.json").read_text())
    assert d["status"] == ["failed"] and d["metrics"] == {} and "log_tail" in d["runs"][0]
    assert R.fmt_cell(d["metrics"].get("eval/loss"), ".3f") == "—"





def select_page(tmp_path, row_id: str, train: str, then_seeds: str, more_rows: str = ""):
    """A page whose row `row_id` sweeps the minimal recipe's rate over [1e-5, 3e-3] and
    selects on eval/loss, then runs `then_seeds`; `train` is its stage overrides (TOML list
    items), `more_rows` further [[rows]] tables."""
    spec = tmp_path / "sel.toml"
    spec.write_text(f'''
[[rows]]
id = "{row_id}"
recipe = "recipes/minimal.toml"
overrides = [{train},
             'sweep."stages.0.lr"=[1e-5, 3e-3]', 'select={{ metric = "eval/loss", mode = "min", then = {{ "run.seed" = {then_seeds} }} }}']
{more_rows}
[[tables]]
id = "main"
rows = ["*"]
columns = [{{ key = "eval/loss", label = "eval loss", fmt = ".4f" }}]
''')
    (tmp_path / "sel.md").write_text("# sel\n\n<!-- results:table main -->\n<!-- results:end -->\n")
    return R.load_page(spec)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_select_row_records_the_choice_and_the_winners_seeds(tmp_path, capsys, jobs):
    """A row whose recipe has [select] runs its sweep whole: the JSON records which point won on
    the selection metric, and its metrics are the winner's seeds. With --jobs 2 and one row,
    the sweep runs its two points at once and the row is the same."""
    page = select_page(tmp_path, "chosen_lr", '"stages.0.steps=30", "stages.0.eval_every=15", "stages.0.warmup_steps=5"', "[1, 2]")
    (written,) = R.run_page(page, allow_dirty=True, jobs=jobs)
    assert ("[select] sweeps 2 points at a time" in capsys.readouterr().out) == (jobs == 2)
    d = json.loads(written.read_text())
    sel = d["selection"]
    assert sel["metric"] == "eval/loss" and sel["mode"] == "min"
    assert sel["chosen"]["value"] == min(v for v in sel["values"].values() if v is not None)
    assert d["point"] == sel["chosen"]["point"] and d["seeds"] == [0, 1, 2]
    assert d["metrics"]["eval/loss"]["n"] == 3
    assert R._point_cell(d, "point:stages.0.lr") == f"{sel['chosen']['point']['stages.0.lr']:g}"  # the table shows the rate
    lost = next(label for label in sel["values"] if label != sel["chosen"]["label"])  # every point's value, the winner marked
    assert R._selection_cell(d, f"selection:{sel['chosen']['label']}", ".4f") == f"**{sel['chosen']['value']:.4f}** (chosen)"
    assert R._selection_cell(d, f"selection:{lost}", ".4f") == format(sel["values"][lost], ".4f")
    assert R._selection_cell(d, "selection:no such point", ".4f") == "—"
    assert not [p for p in R.check_page(page) if "does not validate" in p or "another recipe" in p]


def test_a_scatter_figure_puts_each_row_at_its_x_metric(tmp_path):
    """`kind = "scatter"`: Zoology's accuracy against state size, one point per row."""
    def row(acc, size):
        agg = lambda v: {"mean": v, "sd": 0.0, "n": 2, "values": [v, v]}  # noqa: E731
        return {"metrics": {"eval/acc": agg(acc), "eval/state_size": agg(size)}, "runs": []}

    data = {"attention": row(0.99, 16384.0), "hrr": row(0.4, 1088.0), "none": {"metrics": {}, "runs": []}}
    out = tmp_path / "f.png"
    R.render_figure({"id": "s", "kind": "scatter", "rows": ["*"], "key": "eval/acc", "x": "eval/state_size", "logx": True,
                     "hline": 0.1}, data, out)
    assert out.stat().st_size > 1000


def test_a_scatter_marks_a_row_made_in_part(tmp_path, monkeypatch):
    """A row with fewer completed seeds than it runs (a deadline stopped the rest) is drawn
    hollow and its label says how many seeds its point is, so one seed is not read as a mean."""
    import matplotlib.axes

    drawn, labels = [], []
    errorbar, annotate = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda ax, *a, **kw: drawn.append(kw.get("mfc")) or errorbar(ax, *a, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda ax, text, *a, **kw: labels.append(text) or annotate(ax, text, *a, **kw))

    def row(label, values):
        agg = lambda v: {"mean": v[0], "sd": 0.0, "n": len(v), "values": v}  # noqa: E731
        return {"label": label, "seeds": [0, 1, 2], "metrics": {"eval/acc": agg(values), "eval/state_size": agg([576.0] * len(values))}, "runs": []}

    data = {"a": row("attention", [0.99, 0.99, 0.99]), "h": row("hrr", [0.2])}
    R.render_figure({"id": "s", "kind": "scatter", "rows": ["*"], "key": "eval/acc", "x": "eval/state_size"}, data, tmp_path / "f.png")
    assert drawn == [None, "none"]
    assert labels == ["attention", "hrr, 1 of 3 seeds"]


def test_labels_of_nearby_points_do_not_overlap():
    """Rows at nearby points (the zoo's memories at similar state sizes, all near 1.0) get
    labels whose drawn boxes do not overlap, whatever the labels' lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.6), dpi=110)
    ax.set_xscale("log")
    points = [(1536, 0.995), (2560, 0.984), (4608, 0.984), (6144, 0.997), (16384, 0.994), (512, 0.045), (513, 0.045)]
    notes = [ax.annotate(f"a long entrant label number {i} (window 2)", xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
             for i, xy in enumerate(points)]
    for x, y in points:
        ax.plot(x, y, "o")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    boxes = lambda: [n.get_window_extent(renderer) for n in notes]  # noqa: E731
    assert any(a.overlaps(b) for i, a in enumerate(boxes()) for b in boxes()[i + 1:])  # the case the placement is for
    R.place_labels(notes, renderer)
    placed = boxes()
    assert not any(a.overlaps(b) for i, a in enumerate(placed) for b in placed[i + 1:])
    assert notes[0].xyann == (4, 3)  # the first label keeps its place
    plt.close(fig)


def test_a_figure_draws_every_reference_level(tmp_path, monkeypatch):
    """`hline` and `hlines`: Zoology's figure draws chance and the bag-of-values floor."""
    import matplotlib.axes

    drawn = []
    axhline = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda ax, y, **kw: drawn.append((y, kw.get("label"))) or axhline(ax, y, **kw))
    agg = {"mean": 0.5, "sd": 0.0, "n": 1, "values": [0.5]}
    data = {"a": {"metrics": {"eval/acc": agg, "eval/state_size": agg}, "runs": []}}
    R.render_figure({"id": "s", "kind": "scatter", "rows": ["*"], "key": "eval/acc", "x": "eval/state_size", "hline": 0.01,
                     "hline_label": "chance", "hlines": [[0.25, "floor"], [0.5]]}, data, tmp_path / "f.png")
    assert drawn == [(0.01, "chance"), (0.25, "floor"), (0.5, None)]


def test_a_grid_made_in_parts_renders_and_names_the_rows_still_to_make(tmp_path):
    """A device session's deadline stops a [select] row's seeds (no summary: status "timeout",
    no wall time) and leaves other rows unmade: the table still renders, and its provenance
    line names the rows not made yet."""
    spec = tmp_path / "grid.toml"
    spec.write_text('''
[[rows]]
id = "g_attention"
recipe = "recipes/minimal.toml"

[[rows]]
id = "g_window"
recipe = "recipes/minimal.toml"

[[tables]]
id = "main"
rows = ["g_*"]
pending = "the next GPU session"
columns = [{ key = "eval/acc", label = "acc" }]
''')
    (tmp_path / "grid.md").write_text("# grid\n\n<!-- results:table main -->\n<!-- results:end -->\n")
    page = R.load_page(spec)
    stopped = R._run_record(tmp_path / "never-finished", 1, unfinished="timeout")
    assert stopped["status"] == "timeout" and stopped["wall_time_s"] is None
    agg = {"mean": 0.99, "sd": None, "n": 1, "values": [0.99]}
    data = {"g_attention": {"page": "grid", "status": ["completed", "timeout"], "wall_time_s": [120.0, None],
                            "device": ["H100"], "commit": "0123456789abcdef", "metrics": {"eval/acc": agg}, "runs": []}}
    text = R.render_page(page, draw=False, data=data)
    assert "not made yet: g_window (the next GPU session)" in text and "2.0 min of runs" in text
    assert "no run finished yet" not in text and "<sub>1 row, 1 completed seed (mean" in text
    # the next call's deadline stops every run of g_window's sweep: the row has a JSON, no value
    data["g_window"] = {"page": "grid", "status": ["timeout"], "wall_time_s": [None], "device": ["H100"],
                        "commit": "0123456789abcdef", "metrics": {}, "runs": [{"seed": 0, "status": "timeout", "points_reached": []}]}
    text = R.render_page(page, draw=False, data=data)
    assert "no run finished yet: g_window (timeout), how far each got in its JSON's `points_reached`" in text
    assert "not made yet" not in text and "2 rows: 1 with 1 completed seed, 1 with 0 (mean" in text


def test_a_winner_seed_stopped_before_it_began_keeps_its_seed(tmp_path):
    """The deadline can stop a [select] row after its choice, before a `then` seed wrote its
    recipe: the row still records that seed (from the sweep's plan) as not finished, and the
    row's JSON is written (on the H100 a seed None failed the rows' sort and lost the row)."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    subprocess.run([sys.executable, "-m", "engram_core.run", "recipes/minimal.toml", "stages.0.steps=10", "stages.0.eval_every=5",
                    "stages.0.warmup_steps=2", 'sweep."stages.0.lr"=[1e-5, 3e-3]',
                    'select={ metric = "eval/loss", mode = "min", then = { "run.seed" = [1, 2] } }', "--out", str(runs), "--quiet"],
                   cwd=R.checkout(), check=True, capture_output=True)
    (sweep_dir,) = runs.glob("*/*-sweep")
    plan = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    last = next(e for e in plan if e.get("selected") and e["point"]["run.seed"] == 2)
    for name in ("recipe.toml", "summary.json"):  # as if the deadline came before seed 2 began
        (sweep_dir / last["dir"] / name).unlink()
    records = R.winner_runs(sweep_dir, json.loads((sweep_dir / "selection.json").read_text()), unfinished="timeout")
    assert [(r["seed"], r["status"]) for r in records] == [(0, "completed"), (1, "completed"), (2, "timeout")]
    page = select_page(tmp_path, "w", '"stages.0.steps=10"', "[1, 2]")
    job = R.Job(row_id="w", row=page.rows[0], point=None, point_label="", seed=0)
    d = json.loads(R._write_row(page, job, list(reversed(records)), {"commit": "0" * 40}).read_text())
    assert d["seeds"] == [0, 1, 2] and d["status"] == ["completed", "completed", "timeout"]


def test_a_sweep_stopped_before_its_choice_records_how_far_each_point_got(tmp_path):
    """A device session's deadline can stop a [select] row mid-sweep; its JSON then keeps each
    started point's last step, steps/s and eval curve (what the next session sizes its
    deadline from), and a point that never started is left out."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    subprocess.run([sys.executable, "-m", "engram_core.run", "recipes/minimal.toml", "stages.0.steps=20", "stages.0.eval_every=10",
                    "stages.0.warmup_steps=2", 'sweep."stages.0.lr"=[1e-5, 3e-3]', "--out", str(runs), "--quiet"],
                   cwd=R.checkout(), check=True, capture_output=True)
    (sweep_dir,) = runs.glob("*/*-sweep")
    (sweep_dir / "001" / "recipe.toml").unlink()  # as if the deadline came before the second point began
    reached = R.sweep_reached(runs)
    assert [p["label"] for p in reached] == ["stages.0.lr=1e-05"]
    (point,) = reached
    assert point["step"] == 20 and point["steps_per_s"] > 0
    assert [s for s, _ in point["curves"]["train:eval/loss"]] == [10, 20]
    assert "stages.0.lr=1e-05 at step 20 (" in R._reached_text(reached)
    assert R.sweep_reached(tmp_path / "nothing") == []


def test_a_page_run_goes_on_where_an_earlier_call_stopped(tmp_path, capsys, monkeypatch):
    """A grid larger than one device session: `--keep DIR` then `--keep DIR --resume` at the
    same commit keeps the sweep points and runs an earlier call finished, runs the rest, and
    writes the row an uninterrupted run writes; another commit, or a folder that is not a
    kept page run, is refused with nothing changed."""
    plain = '''
[[rows]]
id = "plain"
recipe = "recipes/minimal.toml"
overrides = ["stages.0.steps=10"]
'''
    page = select_page(tmp_path, "chosen_lr", '"stages.0.steps=20", "stages.0.eval_every=10", "stages.0.warmup_steps=2"', "[1]",
                       more_rows=plain)
    work = tmp_path / "work"
    first = {p.name: json.loads(p.read_text()) for p in R.run_page(page, allow_dirty=True, keep=work)}
    # as if the deadline had stopped the first call after the sweep's first point: the second
    # point, the choice and the winner's seed not made, the plain row's run not finished
    (sweep_dir,) = (work / "chosen_lr" / "seed0" / "runs").glob("*/*-sweep")
    (sweep_dir / "selection.json").unlink()
    kept = sweep_dir / "000" / "summary.json"
    kept_before = kept.read_text()
    for d in ("001", "002"):
        shutil.rmtree(sweep_dir / d)
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    (sweep_dir / "sweep.json").write_text(json.dumps({**plan, "points": plan["points"][:2]}))
    (plain_run,) = (work / "plain" / "seed0" / "runs").glob("*/*/summary.json")
    plain_run.write_text(json.dumps({**json.loads(plain_run.read_text()), "status": "running"}))
    shutil.rmtree(plain_run.parent / "checkpoints")  # stopped before its first checkpoint

    second = {p.name: json.loads(p.read_text()) for p in R.run_page(page, allow_dirty=True, keep=work, resume=True)}
    assert kept.read_text() == kept_before  # the finished point was not run again
    assert len(list((work / "plain" / "seed0" / "runs").glob("*/*/summary.json"))) == 2  # the unfinished run, with no checkpoint, ran anew
    for name, row in second.items():
        assert row["page_run_calls"] == 2 and "made in 2 calls" in row["cache"]
        assert row["metrics"]["eval/loss"]["values"] == first[name]["metrics"]["eval/loss"]["values"]
        if "selection" in row:
            assert row["selection"] == first[name]["selection"]

    marker = (work / R.PAGE_RUN_FILE).read_text()
    monkeypatch.setattr(R, "source_commit", lambda: ("f" * 40, []))
    with pytest.raises(R.EngramError, match="goes on only at the commit it began"):
        R.run_page(page, allow_dirty=True, keep=work, resume=True)
    with pytest.raises(R.EngramError, match="already holds a page run"):
        R.run_page(page, allow_dirty=True, keep=work)
    assert (work / R.PAGE_RUN_FILE).read_text() == marker
    with pytest.raises(R.EngramError, match="not a page run's folder"):
        R.run_page(page, allow_dirty=True, keep=tmp_path / "elsewhere", resume=True)
    assert not (tmp_path / "elsewhere").exists()


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads live processes from /proc")
def test_a_deadline_stops_a_sweep_and_every_point_it_started(tmp_path, capsys):
    """The page's deadline reaches a [select] row mid-sweep, its points in processes of their
    own: none goes on running after the pipeline returns (a SIGKILL of the sweep alone left
    them as orphans), and the row's record says how far each point got."""
    page = select_page(tmp_path, "slow", '"stages.0.steps=1000000", "stages.0.eval_every=20", "stages.0.log_every=20"', "[1]")
    work = tmp_path / "work"
    (written,) = R.run_page(page, jobs=2, allow_dirty=True, keep=work, deadline_s=25)
    assert _processes_naming(str(work)) == []
    (run,) = json.loads(written.read_text())["runs"]
    assert run["status"] == "timeout"
    assert sorted(p["label"] for p in run["points_reached"]) == ["stages.0.lr=0.003", "stages.0.lr=1e-05"]
    assert all(p["step"] >= 20 for p in run["points_reached"])
    assert "reached stages.0.lr=" in capsys.readouterr().out


def test_checkpointed_runs_go_on_from_their_checkpoint_and_record_the_rows_recipe(tmp_path):
    """`--checkpoint-every N` makes every train stage save every N steps (the cadence is not
    part of the row's recorded recipe: it does not change what a run computes, so the row
    still checks against its page); a run an earlier call stopped after a checkpoint goes on
    from it on --resume instead of starting again."""
    plain = '''
[[rows]]
id = "plain"
recipe = "recipes/minimal.toml"
overrides = ["stages.0.steps=40", "stages.0.eval_every=20"]
'''
    page = select_page(tmp_path, "chosen_lr", '"stages.0.steps=20", "stages.0.eval_every=10", "stages.0.warmup_steps=2"', "[1]",
                       more_rows=plain)
    work = tmp_path / "work"
    first = {p.name: json.loads(p.read_text()) for p in R.run_page(page, allow_dirty=True, keep=work, checkpoint_every=5)}
    for row in first.values():
        assert row["checkpoint_every"] == 5
        assert "checkpoint_every" not in row["resolved_recipe"]
    ran = [tomllib.loads(p.read_text()) for p in work.glob("**/recipe.toml") if (p.parent / "summary.json").exists()]
    assert ran and all(r["stages"][0]["checkpoint_every"] == 5 and r["stages"][1]["kind"] == "eval" for r in ran)
    assert not [p for p in R.check_page(page) if "resolves to" in p or "does not validate" in p]

    # as if the deadline had stopped the plain row's run after its last checkpoint
    (summary,) = (work / "plain" / "seed0" / "runs").glob("*/*/summary.json")
    assert (summary.parent / "checkpoints" / "last.pt").is_file()
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted"}))
    second = {p.name: json.loads(p.read_text()) for p in R.run_page(page, allow_dirty=True, keep=work, resume=True, checkpoint_every=5)}
    assert list((work / "plain" / "seed0" / "runs").glob("*/*/summary.json")) == [summary]  # resumed, not run anew
    assert set(second["plain.json"]["status"]) == {"completed"}
    assert second["plain.json"]["metrics"]["eval/loss"]["values"] == first["plain.json"]["metrics"]["eval/loss"]["values"]


def test_the_recorded_recipe_leaves_out_the_checkpoint_cadence():
    from engram_core.tools import row_recipe

    recorded = '[run]\nname = "x"\n\n[[stages]]\nname = "train"\nsteps = 10\ncheckpoint_every = 0\n'
    today = '[run]\nname = "x"\n\n[[stages]]\nname = "train"\nsteps = 10\n'
    assert row_recipe.differences(recorded, today) == []
    assert row_recipe.differences(recorded, today.replace("steps = 10", "steps = 11")) == [("stages.0.steps", 10, 11)]
    assert "checkpoint_every" not in row_recipe.normalised(tomllib.loads(recorded))


def test_a_row_stopped_after_its_choice_is_completed_from_its_json(tmp_path, capsys, monkeypatch):
    """A deadline stops a [select] row in its `then` seeds and its kept work folder is gone with
    the machine: `--complete` runs only the chosen point's missing seeds, from the row's JSON,
    and the row is the one an uninterrupted page run writes (same choice, same values), with
    the commit of the seeds it added recorded. A row `engram results stale` would list, or one
    asked for on another device, is refused with its JSON untouched."""
    from engram_core.tools import stale

    head = R._git("rev-parse", "HEAD")
    monkeypatch.setattr(R, "source_commit", lambda: (head, []))  # the rows' commit is the checkout's HEAD
    page = select_page(tmp_path, "chosen_lr", '"stages.0.steps=20", "stages.0.eval_every=10", "stages.0.warmup_steps=2"', "[1, 2]")
    (path,) = R.run_page(page, allow_dirty=True)
    whole = json.loads(path.read_text())
    # as if the deadline had stopped seeds 1 and 2: the JSON keeps the choice and seed 0
    stopped = {**whole, "status": ["completed", "timeout", "timeout"], "wall_time_s": [whole["wall_time_s"][0], None, None],
               "metrics": R.aggregate([whole["runs"][0]["metrics"]]),
               "runs": [whole["runs"][0], *({"seed": s, "status": "timeout", "wall_time_s": None, "metrics": {}} for s in (1, 2))]}
    path.write_text(json.dumps(stopped))

    for device, refusal in [("cpu", "made with no --device, not --device cpu")]:
        with pytest.raises(R.EngramError, match=refusal):
            R.run_page(page, allow_dirty=True, complete=True, device=device)
    path.write_text(json.dumps({**stopped, "commit": "f" * 40}))
    with pytest.raises(R.EngramError, match="cannot be completed: commit not found .*re-make it whole"):
        R.run_page(page, allow_dirty=True, complete=True)
    assert json.loads(path.read_text())["commit"] == "f" * 40  # refused before anything ran: the JSON as it was
    path.write_text(json.dumps(stopped))

    capsys.readouterr()
    (again,) = R.run_page(page, allow_dirty=True, complete=True)
    assert "chosen_lr seed 1: completed" in capsys.readouterr().out
    d = json.loads(again.read_text())
    assert d["selection"] == whole["selection"] and d["point"] == whole["point"] and d["commit"] == whole["commit"]
    assert d["seeds"] == [0, 1, 2] and d["status"] == ["completed"] * 3
    assert d["metrics"]["eval/loss"]["values"] == whole["metrics"]["eval/loss"]["values"]  # what the sweep's own seeds gave
    (entry,) = d["completed"]
    assert entry["seeds"] == [1, 2] and entry["commit"] == head and "--complete" in entry["command"]
    assert [r.get("commit") for r in d["runs"]] == [None, head, head]
    assert not any("resolved_recipe" in r for r in d["runs"])  # the added seeds ran the row's recipe
    assert not [p for p in R.check_page(page) if "another recipe" in p or "does not validate" in p]
    git = stale.Git(R.checkout())
    assert stale.stale_row(R.checkout(), git, page.name, "chosen_lr", d)["reasons"] == []
    later = {**d, "completed": [{**entry, "commit": "e" * 40}]}  # every commit a row was made at is compared
    assert stale.stale_row(R.checkout(), git, page.name, "chosen_lr", later)["reasons"][0] == stale.COMMIT_NOT_FOUND
    footer = R._provenance(["*"], {"chosen_lr": later})
    assert f"commit {', '.join(sorted([head[:10], 'e' * 10]))};" in footer  # the table names both commits
    assert "chosen_lr: all 3 seeds completed, nothing to add" in _complete_refusal(page, capsys)
    page = attrs.evolve(page, rows=(*page.rows, R.Row(id="plain", recipe="recipes/minimal.toml", overrides=("stages.0.steps=10",))))
    with pytest.raises(R.EngramError, match="row plain has no \\[select\\]"):  # named: refused
        R.run_page(page, ["plain"], allow_dirty=True, complete=True)
    assert "plain: no [select], nothing to complete" in _complete_refusal(page, capsys, ["*"])  # matched by a glob: passed over


def _complete_refusal(page, capsys, only=None) -> str:
    with pytest.raises(R.RecipeError, match="has seeds to complete"):
        R.run_page(page, only, allow_dirty=True, complete=True)
    return capsys.readouterr().out
