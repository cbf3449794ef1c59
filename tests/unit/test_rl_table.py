"""Round tables: validation, shard round trip, concatenation and mixture refusal."""
from __future__ import annotations

import json

import pytest
import torch

from radar_vllm.offline.rl.synthetic import make_synthetic_table
from radar_vllm.offline.rl.table import (
    RoundTable,
    check_table_conditions,
    load_round_table,
    write_shard,
)


def assert_tables_equal(a: RoundTable, b: RoundTable) -> None:
    assert torch.equal(a.states, b.states)
    assert torch.equal(a.accept_probs, b.accept_probs)
    assert torch.equal(a.tree_sizes.to(torch.int64), b.tree_sizes.to(torch.int64))
    assert torch.equal(a.prompt_index, b.prompt_index)


def test_shards_round_trip_and_concatenate(tmp_path) -> None:
    first = make_synthetic_table(7, max_depth=4, state_size=3, seed=1)
    second = make_synthetic_table(5, max_depth=4, state_size=3, seed=2)
    write_shard(first, tmp_path)
    write_shard(second, tmp_path)
    loaded = load_round_table(tmp_path)
    assert loaded.num_rounds == 12
    assert_tables_equal(loaded.select(torch.arange(7)), first)
    assert_tables_equal(loaded.select(torch.arange(7, 12)), second)
    assert loaded.metadata.num_prompts == 12
    assert loaded.metadata.num_rounds == 12


def test_interrupted_shard_without_metadata_is_ignored(tmp_path) -> None:
    table = make_synthetic_table(4, max_depth=3, state_size=2)
    path = write_shard(table, tmp_path)
    (tmp_path / "shard-00007.safetensors").write_bytes(path.read_bytes())  # no JSON beside it
    assert load_round_table(tmp_path).num_rounds == 4


@pytest.mark.parametrize("field,value", [
    ("head_id", "another-head"), ("temperature", 0.0), ("top_k", 5), ("split", "heldout"),
])
def test_mixtures_are_refused(tmp_path, field, value) -> None:
    table = make_synthetic_table(4, max_depth=3, state_size=2)
    write_shard(table, tmp_path)
    other = make_synthetic_table(4, max_depth=3, state_size=2, seed=3)
    setattr(other.metadata, field, value)
    write_shard(other, tmp_path)
    with pytest.raises(ValueError, match=f"refusing to mix.*{field}"):
        load_round_table(tmp_path)


def test_depth_mixture_is_refused(tmp_path) -> None:
    write_shard(make_synthetic_table(4, max_depth=3, state_size=2), tmp_path / "a")
    write_shard(make_synthetic_table(4, max_depth=4, state_size=2), tmp_path / "b")
    with pytest.raises(ValueError, match="max_depth"):
        load_round_table([tmp_path / "a", tmp_path / "b"])


def test_invalid_tables_are_refused(tmp_path) -> None:
    table = make_synthetic_table(3, max_depth=3, state_size=2)
    probs = table.accept_probs.clone()
    probs[0, 0, 0] += 0.5
    with pytest.raises(ValueError, match="sum to 1"):
        RoundTable(table.states, probs, table.tree_sizes, table.prompt_index, table.metadata)
    probs = torch.zeros_like(table.accept_probs)
    probs[:, :, -1] = 1.0  # 3 accepted after 1 call: impossible
    with pytest.raises(ValueError, match="more accepted tokens than draft calls"):
        RoundTable(table.states, probs, table.tree_sizes, table.prompt_index, table.metadata)
    with pytest.raises(ValueError, match="shape"):
        RoundTable(table.states[:, :2], table.accept_probs, table.tree_sizes,
                   table.prompt_index, table.metadata)
    write_shard(table, tmp_path)
    (tmp_path / "shard-00000.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_round_table(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_round_table(tmp_path / "missing")


def test_requested_conditions_are_checked() -> None:
    table = make_synthetic_table(3, max_depth=3, state_size=2, temperature=1.0)
    check_table_conditions(table.metadata, temperature=1.0, max_depth=3)
    with pytest.raises(ValueError, match="temperature=1.0.*temperature=0.0"):
        check_table_conditions(table.metadata, temperature=0.0)
    with pytest.raises(ValueError, match="max_depth"):
        check_table_conditions(table.metadata, max_depth=7)


def test_split_by_round_is_disjoint_and_seeded() -> None:
    table = make_synthetic_table(50, max_depth=3, state_size=2)
    first, second = table.split(0.2, seed=4)
    again_first, _ = table.split(0.2, seed=4)
    assert first.num_rounds == 40 and second.num_rounds == 10
    assert torch.equal(first.prompt_index, again_first.prompt_index)
    joined = torch.cat([first.prompt_index, second.prompt_index]).sort().values
    assert torch.equal(joined, torch.arange(50))
    meta = json.loads(json.dumps(first.metadata.to_dict()))
    assert meta["num_rounds"] == 40
