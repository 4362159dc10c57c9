"""`causal_backbone.state_size`: the numbers one sequence carries at inference (Zoology's
state size), as a formula, checked against what cached decoding actually keeps."""

from __future__ import annotations

import pytest
import torch

from engram_core.builtin.backbone import CausalBackbone, CausalBackboneConfig
from engram_core.components import BuildContext, DataSpec


def _backbone(window: int = 0, dim: int = 32, n_layers: int = 2) -> CausalBackbone:
    spec = DataSpec("t", vocab_size=64, max_len=48, seq_len=48)
    return CausalBackbone(CausalBackboneConfig(dim=dim, n_layers=n_layers, n_heads=4, window=window), BuildContext(spec=spec, seed=0)).eval()


def _kept_per_sequence(head: CausalBackbone, length: int, batch: int = 3) -> int:
    ids = torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = head._run(ids, use_cache=True, check=False)
    return sum(k.numel() + v.numel() for k, v in cache["kv"]) // batch


@pytest.mark.parametrize("length", [8, 40])
def test_full_attention_carries_its_whole_kv_cache(length):
    head = _backbone()
    assert head.state_size(length) == _kept_per_sequence(head, length) == 2 * 32 * length * 2


def test_a_window_carries_only_the_positions_it_can_see():
    head = _backbone(window=4)
    assert head.state_size(40) == 2 * 32 * 4 * 2  # the cache keeps every position; attention reads the last 4
    assert head.state_size(3) == 2 * 32 * 3 * 2
    assert _kept_per_sequence(head, 40) == 2 * 32 * 40 * 2


def test_completion_accuracy_reports_the_state_size():
    from engram_core.builtin.lm import CompletionAccuracy, CompletionAccuracyConfig
    from engram_core.components import Model

    head = _backbone(window=4)
    model = Model(head, None, None)
    metric = CompletionAccuracy(CompletionAccuracyConfig(), BuildContext())
    metric.reset()
    ids = torch.randint(1, 64, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 9] = ids[:, 9]
    metric.update(model, {"input_ids": ids, "labels": labels})
    assert metric.compute()["state_size"] == 2 * 32 * 4 * 2
