"""Attachment points: registration checks, describe, the core backbone's three points
(KV-cache generation = full forward), mqar, and the mask rules."""

import attrs
import pytest
import torch

from engram_core.builtin.backbone import CausalBackbone, CausalBackboneConfig, check_write_before_read, derive_masks
from engram_core.builtin.mqar import MQARConfig, MQARDataset, generate_mqar
from engram_core.components import BuildContext, DataSpec, Memory, Model
from engram_core.hookspecs import hookimpl
from engram_core.points import check_memory_implements
from engram_core.registry import load_registry
from engram_core.testing.points import ContextPointContract, LayerPointContract, TracePointContract


@attrs.frozen
class Empty:
    pass


# ---- three small memories written only against the points -----------------------------------


class ShiftLayer(Memory):
    """layer: adds a learned embedding of the previous token (looks back at ids only)."""

    def __init__(self, cfg=None, build=None, width=16, vocab=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.gate = torch.nn.Parameter(torch.tensor(0.5))

    def layer_indices(self):
        return (0,)

    def apply_layer(self, index, hidden, ids):
        if index != 0:
            return hidden
        prev = torch.nn.functional.pad(ids, (1, 0))[:, :-1][:, -hidden.shape[1]:]
        return hidden + self.gate * self.emb(prev)


class MeanContext(Memory):
    """context: two prefix vectors, the masked mean of the token embeddings and its negative."""

    def __init__(self, cfg=None, build=None, width=16, vocab=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.width = width

    def context_shape(self):
        return 2, self.width

    def write_context(self, ids, mask):
        m = (torch.ones_like(ids) if mask is None else mask).unsqueeze(-1).float()
        mean = (self.emb(ids) * m).sum(1) / m.sum(1).clamp_min(1)
        return torch.stack([mean, -mean], 1)


class SumTrace(Memory):
    """trace: the masked sum of projected states; reads project it by the query."""

    def __init__(self, cfg=None, build=None, width=16):
        super().__init__()
        self.v = torch.nn.Linear(width, width, bias=False)
        self.q = torch.nn.Linear(width, width, bias=False)

    def empty_trace(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.v.out_features, device=device, dtype=dtype)

    def write_trace(self, states, write_mask, key_states=None):
        w = torch.ones(states.shape[:2]) if write_mask is None else write_mask.to(states.dtype)
        return (self.v(states) * w.unsqueeze(-1)).sum(1)

    def read_trace(self, trace, queries):
        return torch.tanh(self.q(queries)) * trace.unsqueeze(1)


class TestShiftLayerContract(LayerPointContract):
    width = 16
    vocab_size = 32

    def make_memory(self, seed):
        return ShiftLayer(width=self.width, vocab=self.vocab_size)

    def close(self, memory):
        memory.gate.data.zero_()


class TestMeanContextContract(ContextPointContract):
    width = 16
    vocab_size = 32

    def make_memory(self, seed):
        return MeanContext(width=self.width, vocab=self.vocab_size)


class TestSumTraceContract(TracePointContract):
    width = 16

    def make_memory(self, seed):
        return SumTrace(width=self.width)


# ---- registration and describe -----------------------------------------------------------------


def _module(name, **hooks):
    import types

    mod = types.ModuleType(name)
    for k, v in hooks.items():
        setattr(mod, k, v)
    return mod


def test_a_memory_that_does_not_implement_its_point_breaks_only_its_plugin():
    class NoTrace(Memory):
        def write_trace(self, states):  # too few parameters, and no read/empty
            return states

    @hookimpl
    def engram_memories(register):
        register("no_trace", NoTrace, Empty, points=("trace",))

    reg = load_registry(extra={"bad": _module("bad", engram_memories=engram_memories)})
    err = reg.plugins["bad"].error
    assert "provides 'trace' but does not implement engram_core.points.TracePoint" in err
    assert "empty_trace" in err and "read_trace" in err and "write_trace (takes 1 positional arguments, the point passes 3)" in err
    assert "core:causal_backbone" in reg.components["heads"]  # the rest still loads


def test_every_installed_memory_implements_the_points_it_names():
    reg = load_registry()
    assert not [p for p in reg.plugins.values() if p.broken]
    for comp in reg.components["memories"].values():
        assert check_memory_implements(comp.factory, comp.points) == [], comp.qualified


def test_describe_shows_the_point_and_its_signature():
    from io import StringIO

    from rich.console import Console

    from engram_core.cli import _describe

    buf = StringIO()
    _describe(Console(file=buf, width=200), "head", "causal_backbone")
    text = buf.getvalue()
    assert "point 'trace' (calls engram_core.points.TracePoint)" in text
    assert "write_trace(states, write_mask, key_states=None)" in text
    assert "point 'context'" in text and "point 'layer'" in text


# ---- the backbone ------------------------------------------------------------------------------


def _backbone(memory_cls=None, point=None, window=0, seed=0, **kw):
    torch.manual_seed(seed)
    spec = DataSpec("t", vocab_size=32, max_len=24)
    head = CausalBackbone(CausalBackboneConfig(dim=16, n_layers=2, n_heads=2, window=window), BuildContext(spec=spec))
    memory = memory_cls(**kw) if memory_cls else None
    model = Model(head, memory, point).eval()
    return model


@pytest.mark.parametrize("memory_cls,point", [(None, None), (ShiftLayer, "layer"), (MeanContext, "context"), (SumTrace, "trace")])
@pytest.mark.parametrize("window", [0, 3])
def test_generation_with_cache_equals_without(memory_cls, point, window):
    model = _backbone(memory_cls, point, window)
    prompt = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
    a = model.head.generate(prompt, 6, use_cache=True)
    b = model.head.generate(prompt, 6, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("memory_cls,point", [(ShiftLayer, "layer"), (MeanContext, "context"), (SumTrace, "trace")])
def test_each_point_changes_the_logits_only_where_the_memory_reads(memory_cls, point):
    model = _backbone(memory_cls, point)
    plain = _backbone()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    write = torch.zeros_like(ids)
    write[:, :6] = 1
    read = 1 - write
    with torch.no_grad():
        with_mem = model.head(ids, None, write, read)
        without = plain.head(ids, None, write, read)
    assert with_mem.shape == without.shape == (2, 12, 32)
    assert not torch.allclose(with_mem, without)
    if point == "trace":  # the trace adds only at read positions, after the write region
        assert torch.allclose(with_mem[:, :6], without[:, :6], atol=1e-6)


def test_a_read_before_a_write_is_refused():
    w = torch.tensor([[1, 1, 0, 1]])
    r = torch.tensor([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="writes at position 3 but reads from position 2"):
        check_write_before_read(w, r)


def test_masks_follow_from_completion_labels():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, 4, -100, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    write, read = derive_masks(labels, mask)
    assert write.tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert read.tolist() == [[0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]


def test_window_limits_what_a_position_sees():
    model = _backbone(window=2)
    ids = torch.randint(0, 32, (1, 10), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % 32
    with torch.no_grad():
        a, b = model.head(ids), model.head(other)
    # two blocks of window 2 reach back two positions: position 3 onwards cannot see token 0
    assert torch.allclose(a[0, 3:], b[0, 3:], atol=1e-6)
    assert not torch.allclose(a[0, :2], b[0, :2])


def test_classification_batches_read_as_one_token_completions():
    spec = DataSpec("t", vocab_size=32, seq_len=8, label_offset=20)
    head = CausalBackbone(CausalBackboneConfig(dim=16, n_layers=1, n_heads=2), BuildContext(spec=spec))
    view = head.completion_view({"tokens": torch.randint(0, 20, (3, 8)), "label": torch.tensor([0, 1, 5])})
    assert view["input_ids"][:, -1].tolist() == [20, 21, 25]
    assert view["labels"][:, :-1].eq(-100).all() and view["labels"][:, -1].tolist() == [20, 21, 25]
    assert view["read_mask"][0].tolist() == [0] * 7 + [1, 1] and view["write_mask"][0].tolist() == [1] * 7 + [0, 0]


# ---- mqar --------------------------------------------------------------------------------------


def test_mqar_is_seeded_and_scores_each_query_once():
    cfg = MQARConfig(n_pairs=4, seq_len=24, vocab_size=32, n_train=16, n_eval=8)
    a, b = generate_mqar(cfg, 16, 5), generate_mqar(cfg, 16, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], generate_mqar(cfg, 16, 6)["input_ids"])
    ids, labels = a["input_ids"], a["labels"]
    for i in range(16):
        pairs = {int(ids[i, 2 * j]): int(ids[i, 2 * j + 1]) for j in range(4)}
        assert len(pairs) == 4 and all(1 <= k < 16 for k in pairs) and all(16 <= v < 32 for v in pairs.values())
        scored = (labels[i] != -100).nonzero().flatten().tolist()
        assert len(scored) == 4 and all(t >= 8 for t in scored)
        for t in scored:  # the scored value follows its key, and is the key's value in the context
            assert pairs[int(ids[i, t - 1])] == int(labels[i, t]) == int(ids[i, t])
    assert a["write_mask"][:, :8].eq(1).all() and a["write_mask"][:, 8:].eq(0).all()


@pytest.mark.parametrize("spacing", ["random", "power", "packed"])
def test_mqar_spacings(spacing):
    d = MQARDataset(MQARConfig(n_pairs=3, seq_len=40, vocab_size=16, query_spacing=spacing, n_train=32, n_eval=8))
    pos = (d._splits["train"]["labels"] != -100).nonzero()[:, 1]
    assert pos.min() >= 7
    if spacing == "packed":
        assert sorted(set(pos.tolist())) == [7, 9, 11]


def test_mqar_bad_settings_are_one_line():
    from engram_core.config import ConfigError

    with pytest.raises(ConfigError, match="cannot hold 8 pairs"):
        MQARConfig(n_pairs=8, seq_len=20)
