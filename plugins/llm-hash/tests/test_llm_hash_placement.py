"""Table placements of engram_hash: the row-table seam (device, and the config of the others)."""

import pytest
import torch
from engram_llm_hash.memory import EngramHashConfig
from llm_hash_helpers import memory

from engram_core.config import ConfigError
from engram_core.nn.row_tables import DeviceRowTable


def test_device_placement_is_an_embedding_with_full_weight():
    m = memory()
    table = m.blocks["0"].table
    assert isinstance(table, DeviceRowTable) and isinstance(table, torch.nn.Embedding)
    assert table.full_weight is table.weight
    assert "blocks.0.table.weight" in m.state_dict()
    rows = torch.randint(0, table.num_embeddings, (3, 5, 4))
    assert torch.equal(table(rows), table.weight[rows])
    m.set_table_dtype(torch.bfloat16)
    assert table.weight.dtype == torch.bfloat16


def test_unknown_placement_is_one_config_error():
    with pytest.raises(ConfigError, match="placement.*must be one of 'device', 'host', 'sharded'"):
        EngramHashConfig(placement="gpu")


def test_unimplemented_placement_is_one_config_error(monkeypatch):
    from engram_core.nn import row_tables

    monkeypatch.setitem(row_tables.PLACEMENTS, "sharded", None)  # as before a placement is registered
    with pytest.raises(ConfigError, match="'sharded' is not implemented yet; use one of 'device'") as err:
        memory(placement="sharded")
    assert err.value.key == "placement"
