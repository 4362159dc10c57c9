"""Metric states declared with `add_state` (torchmetrics' convention): `reset` restores fresh
copies of the defaults, `dist_reduce` reduces each state by its declared reduction, and the
legacy way (states = what an overridden `reset` assigns) still works, with one warning per class.

Ranks are simulated in one process (each replica's `all_gather_object` answers every replica's
states, deep-copied as pickling would), and checked once over two real gloo ranks (this file
run by torchrun).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from collections import defaultdict

import pytest
import torch
import torch.distributed as torch_dist

from engram_core.components import DIST_REDUCE_FX, Metric
from engram_core.run.distributed import Dist, leave_process_group


class AllKinds(Metric):
    """One state per reduction: every declared fx, and None (the rule by type) on a count and a bool."""

    def __init__(self):
        self.note = "kept"  # not a state
        self.add_state("total", 0.0, dist_reduce_fx="sum")
        self.add_state("vector", torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("by_parity", defaultdict(float), dist_reduce_fx="sum")
        self.add_state("largest", -math.inf, dist_reduce_fx="max")
        self.add_state("smallest_each", torch.full((2,), math.inf, dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("seen", [], dist_reduce_fx="cat")
        self.add_state("seen_tensor", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="cat")
        self.add_state("ids", set(), dist_reduce_fx="union")
        self.add_state("first_value", None, dist_reduce_fx="none")
        self.add_state("count", 0)  # None: the rule by type sums numbers
        self.add_state("any_negative", False)  # ... and ORs bools

    def update(self, model, batch):
        x = batch["x"]
        self.total += float(x.sum())
        self.vector += torch.stack([x.sum(), x.max(), x.min()])
        for v in x.tolist():
            self.by_parity["even" if int(v * 4) % 2 == 0 else "odd"] += v
        self.largest = max(self.largest, float(x.max()))
        self.smallest_each = torch.minimum(self.smallest_each, torch.stack([x.min(), x[0]]))
        self.seen.extend(x.tolist())
        self.seen_tensor = torch.cat([self.seen_tensor, x])
        self.ids.update(int(v * 4) % 7 for v in x.tolist())
        if self.first_value is None:
            self.first_value = float(x[0])
        self.count += x.numel()
        self.any_negative = self.any_negative or bool((x < 0).any())

    def compute(self):
        return {"mean": self.total / max(self.count, 1)}


class Legacy(Metric):
    """A third-party metric written before add_state: its states are what `reset` assigns."""

    dist_reduce_fx = {"largest": "max"}

    def reset(self):
        self.total = 0.0
        self.count = 0
        self.largest = -math.inf
        self.seen: list[float] = []

    def update(self, model, batch):
        x = batch["x"]
        self.total += float(x.sum())
        self.count += x.numel()
        self.largest = max(self.largest, float(x.max()))
        self.seen.extend(x.tolist())

    def compute(self):
        return {"mean": self.total / max(self.count, 1), "largest": self.largest}


def _batches():
    # multiples of 1/4: every sum is exact in float64, so reduced and one-process states are equal
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-400, 400, (7 * 5,), generator=g).double() / 4
    return [{"x": values[i : i + 5]} for i in range(0, 35, 5)]  # 7 batches: uneven over 2 ranks


def _plain(value):
    """A state as JSON-comparable data (order kept for lists and tensors, sets sorted)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _states(metric: Metric) -> dict:
    return {n: _plain(getattr(metric, n)) for n in metric.state_names()}


class _SimulatedGather:
    """Rank `rank` of replicas in one process: `all_gather_object` answers every replica's states."""

    def __init__(self, states: list[dict], rank: int):
        self.states, self.rank = states, rank

    def all_gather_object(self, obj):
        return [obj if r == self.rank else copy.deepcopy(s) for r, s in enumerate(self.states)]


def _reduce_over_ranks(make, world: int = 2) -> list[Metric]:
    """`world` replicas, each updated on its block of the batches, then reduced together."""
    replicas = [make() for _ in range(world)]
    for rank, m in enumerate(replicas):
        m.reset()
        for b in Dist(rank, world, rank).block(_batches()):
            m.update(None, b)
    local = [{n: copy.deepcopy(getattr(m, n)) for n in m.state_names()} for m in replicas]
    for rank, m in enumerate(replicas):
        m.dist_reduce(_SimulatedGather(local, rank))
    return replicas


def _one_process(make) -> Metric:
    m = make()
    m.reset()
    for b in _batches():
        m.update(None, b)
    return m


# ---- declared states --------------------------------------------------------------------------


def test_states_are_the_declared_names_in_declaration_order():
    m = AllKinds()
    assert m.state_names() == ("total", "vector", "by_parity", "largest", "smallest_each", "seen", "seen_tensor",
                               "ids", "first_value", "count", "any_negative")
    assert {fx for fx in DIST_REDUCE_FX} == {"sum", "max", "min", "cat", "union", "none"}


def test_reset_restores_fresh_copies_of_the_defaults():
    m = AllKinds()
    fresh = _states(m)
    for b in _batches():
        m.update(None, b)
    assert _states(m) != fresh
    m.reset()
    assert _states(m) == fresh
    assert type(m.by_parity) is defaultdict and m.by_parity.default_factory is float
    # no aliasing: what one evaluation does to a state never reaches the default or the next evaluation
    m.seen.append(1.0)
    m.ids.add(3)
    m.by_parity["odd"] += 2.0
    m.vector += 5.0  # in place, on the tensor reset handed out
    m.reset()
    assert m.seen == [] and m.ids == set() and dict(m.by_parity) == {} and m.vector.tolist() == [0.0, 0.0, 0.0]
    assert m.note == "kept"  # an attribute that is not a state is left alone


def test_the_callers_default_object_is_copied_at_declaration():
    default = [1.0]

    class Kept(Metric):
        def __init__(self):
            self.add_state("values", default, dist_reduce_fx="cat")

        def update(self, model, batch): ...

        def compute(self):
            return {}

    m = Kept()
    default.append(2.0)  # the plugin's module-level object changes later
    m.values.append(3.0)
    m.reset()
    assert m.values == [1.0]


def test_each_reduction_over_two_ranks_equals_one_process():
    ranks = _reduce_over_ranks(AllKinds)
    one = _one_process(AllKinds)
    expected = _states(one)
    for m in ranks:
        assert _states(m) == expected  # every rank holds the states of the whole split
    # the reductions that would differ from a sum were really applied
    x = torch.cat([b["x"] for b in _batches()])
    assert expected["largest"] == float(x.max())
    assert expected["smallest_each"] == [float(x.min()), min(float(b["x"][0]) for b in _batches())]
    assert expected["seen"] == x.tolist() == expected["seen_tensor"]  # concatenated in split order
    assert expected["first_value"] == float(x[0])  # "none": rank 0's value
    assert expected["count"] == 35 and expected["any_negative"] is True
    assert ranks[1].vector.dtype == torch.float64 and ranks[1].note == "kept"


def test_one_process_dist_reduce_leaves_states_as_they_are():
    m = _one_process(AllKinds)
    before = _states(m)
    m.dist_reduce(Dist())  # world size 1: all_gather_object answers [own states]
    assert _states(m) == before


def test_a_bad_reduction_name_says_which_metric_and_state():
    class Median(Metric):
        def __init__(self):
            self.add_state("latency", [], dist_reduce_fx="median")

        def update(self, model, batch): ...

        def compute(self):
            return {}

    with pytest.raises(ValueError) as err:
        Median()
    assert str(err.value) == ("Median.add_state('latency'): unknown dist_reduce_fx 'median' "
                              "(use sum, max, min, cat, union, none, or None for the rule by type)")


@pytest.mark.parametrize("name", ["update", "reset", "ctx", "shardable", "not an identifier"])
def test_a_state_name_the_metric_api_uses_is_refused(name):
    class Clash(Metric):
        def __init__(self):
            self.add_state(name, 0)

        def update(self, model, batch): ...

        def compute(self):
            return {}

    with pytest.raises(ValueError, match=r"Clash\.add_state"):
        Clash()


def test_an_overridden_reset_calls_super_and_keeps_scratch_out_of_the_states():
    class WithScratch(Metric):
        def __init__(self):
            self.add_state("count", 0, dist_reduce_fx="sum")
            self.generator = None

        def reset(self):
            super().reset()
            self.generator = None  # per-evaluation scratch

        def update(self, model, batch):
            self.count += 1
            self.generator = self.generator or torch.Generator()

        def compute(self):
            return {"count": self.count}

    m = WithScratch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converted metric is not legacy: no warning
        m.update(None, None)
        m.reset()
    assert m.count == 0 and m.generator is None and m.state_names() == ("count",)


def test_an_overridden_reset_that_forgets_super_is_an_error():
    class Forgets(Metric):
        def __init__(self):
            self.add_state("count", 0, dist_reduce_fx="sum")

        def reset(self):
            self.scratch = None

        def update(self, model, batch):
            self.count += 1

        def compute(self):
            return {}

    m = Forgets()
    with pytest.raises(TypeError, match=r"Forgets declares states with add_state, but its reset does not call super\(\)\.reset\(\)"):
        m.reset()


def test_the_class_dict_still_names_a_reduction_with_a_warning():
    with pytest.warns(DeprecationWarning, match="dist_reduce_fx is read for one more release"):

        class OldFx(Metric):
            dist_reduce_fx = {"largest": "max"}

            def __init__(self):
                self.add_state("largest", -math.inf)

            def update(self, model, batch):
                self.largest = max(self.largest, float(batch["x"].max()))

            def compute(self):
                return {}

    ranks = _reduce_over_ranks(OldFx)
    assert ranks[0].largest == _one_process(OldFx).largest  # max, not the sum of two maxima

    class Contradicts(OldFx):
        def __init__(self):
            self.add_state("largest", -math.inf, dist_reduce_fx="sum")

    with pytest.raises(ValueError, match="contradicts the class's dist_reduce_fx"):
        Contradicts()


# ---- legacy: states assigned in an overridden reset -----------------------------------------


def test_legacy_reset_warns_once_per_class_and_still_reduces():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class LegacyCopy(Legacy):  # a class of its own, so no other test has spent its one warning
            def reset(self):
                super().reset()

        cls = LegacyCopy
        first, second = cls(), cls()
        for m in (first, second, first):
            m.reset()
        ranks = _reduce_over_ranks(cls)
    legacy = [w for w in caught if issubclass(w.category, DeprecationWarning)
              and "reset-assigned states are read for one more release" in str(w.message)]
    assert len(legacy) == 1, [str(w.message) for w in caught]
    assert "LegacyCopy: declare states with add_state in __init__" in str(legacy[0].message)
    assert legacy[0].filename == __file__  # points at the plugin's reset, not at the engine
    assert first.state_names() == ("count", "largest", "seen", "total")
    one = _one_process(cls)
    assert _states(ranks[0]) == _states(ranks[1]) == _states(one)
    assert one.largest == float(torch.cat([b["x"] for b in _batches()]).max())  # the class dict's "max"


def test_only_classes_with_their_own_reset_record_attribute_writes():
    assert AllKinds.__setattr__ is object.__setattr__  # a declared metric's writes are plain
    assert Legacy.__setattr__ is not object.__setattr__


def test_an_error_inside_a_legacy_reset_comes_out_unchanged():
    class Breaks(Metric):
        fail = True

        def reset(self):
            self.count = 0
            if self.fail:
                raise KeyError("no such split")

        def update(self, model, batch): ...

        def compute(self):
            return {}

    m = Breaks()
    with pytest.raises(KeyError, match="no such split"):
        m.reset()
    m.fail = False  # an attribute write outside reset is not recorded as a state
    with pytest.warns(DeprecationWarning):
        m.reset()
    assert m.state_names() == ("count",)


def test_legacy_reset_that_assigns_nothing_does_not_warn():
    class Stateless(Metric):
        def reset(self):
            pass

        def update(self, model, batch): ...

        def compute(self):
            return {"one": 1.0}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = Stateless()
        m.reset()
    assert m.state_names() == ()


# ---- two real gloo ranks ----------------------------------------------------------------------


def _gloo_main(out_file: str) -> None:
    """Under torchrun: each rank updates on its block of the batches, then the states are reduced."""
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    finished = False
    try:
        dist = Dist(rank, world, rank, "gloo")
        reduced = {}
        for make in (AllKinds, Legacy):
            m = make()
            m.reset()
            for b in dist.block(_batches()):
                m.update(None, b)
            m.dist_reduce(dist)
            reduced[make.__name__] = _states(m)
        gathered = dist.all_gather_object(reduced)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(gathered, f)
        finished = True
    finally:
        leave_process_group(finished)


def test_declared_and_legacy_states_reduce_exactly_over_two_gloo_ranks(tmp_path):
    out = tmp_path / "reduced.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    per_rank = json.loads(out.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = {make.__name__: _states(_one_process(make)) for make in (AllKinds, Legacy)}
    expected = json.loads(json.dumps(expected))  # as JSON has it (tuples as lists)
    assert per_rank == [expected, expected]


if __name__ == "__main__":  # torchrun tests/test_metric_state.py OUT.json (see the gloo test)
    _gloo_main(sys.argv[1])
