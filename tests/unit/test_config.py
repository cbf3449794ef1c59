"""TreeConfig: defaults, derived sizes, validation, dict round trip."""
from __future__ import annotations

import json

import pytest

from radar_vllm.core.config import TreeConfig


def test_defaults_and_derived_sizes() -> None:
    config = TreeConfig()
    assert (config.top_k, config.max_depth, config.total_tokens) == (10, 7, 60)
    assert config.max_nodes == 59
    # 10 depth-1 candidates plus 100 per further level
    assert config.max_candidates == 10 + 6 * 100
    assert config.num_candidates_at_depth(1) == 10
    assert config.num_candidates_at_depth(3) == 210


def test_largest_allowed_total_tokens() -> None:
    # top_k=3, max_depth=2: 3 + 9 = 12 candidates, so 13 tokens (root included) is the limit
    assert TreeConfig(top_k=3, max_depth=2, total_tokens=13).max_nodes == 12
    with pytest.raises(ValueError, match="total_tokens=14"):
        TreeConfig(top_k=3, max_depth=2, total_tokens=14)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"max_depth": 0}, "max_depth"),
        ({"total_tokens": 1}, "total_tokens"),
        ({"top_k": 1, "max_depth": 3, "total_tokens": 5}, "total_tokens"),
        ({"top_k": 2.0}, "top_k"),
        ({"max_depth": True}, "max_depth"),
        ({"total_tokens": "60"}, "total_tokens"),
    ],
)
def test_bad_parameters_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TreeConfig(**kwargs)


def test_dict_round_trip_through_json() -> None:
    config = TreeConfig(top_k=4, max_depth=3, total_tokens=20)
    restored = TreeConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert TreeConfig.from_dict({"top_k": 4}) == TreeConfig(top_k=4)


def test_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="topk"):
        TreeConfig.from_dict({"topk": 4})
    with pytest.raises(ValueError, match="top_k"):
        TreeConfig.from_dict({"top_k": 0})
    with pytest.raises(ValueError, match="mapping"):
        TreeConfig.from_dict([("top_k", 4)])  # type: ignore[arg-type]


def test_num_candidates_at_depth_range() -> None:
    with pytest.raises(ValueError, match="depth"):
        TreeConfig().num_candidates_at_depth(8)


def test_for_mode_gives_a_chain_or_the_given_tree() -> None:
    assert TreeConfig.for_mode("chain", 5, 10, 60) == TreeConfig(top_k=1, max_depth=5, total_tokens=6)
    assert TreeConfig.for_mode("tree", 5, 4, 20) == TreeConfig(top_k=4, max_depth=5, total_tokens=20)
    with pytest.raises(ValueError, match="mode"):
        TreeConfig.for_mode("forest", 5, 4, 20)
