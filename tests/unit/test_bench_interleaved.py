"""The interleaved benchmark's summary: ratios of sums, the best stock row, greedy matches."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("interleaved", ROOT / "benchmarks" / "interleaved.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(config, repeat, prompt, outputs, seconds, temperature=0.0, drafts=0.0, accepted=0.0):
    return {"config": config, "repeat": repeat, "workload": "mtbench", "temperature": temperature, "prompt": prompt,
            "outputs": outputs, "seconds": seconds,
            "counters": {"vllm:spec_decode_num_drafts": drafts, "vllm:spec_decode_num_accepted_tokens": accepted}}


def test_summary_ratios_best_stock_and_greedy_matches():
    module = _module()
    # batches of two outputs of 2 tokens each; radar-chain's second output differs once
    same, other = [[1, 2], [3, 4]], [[1, 2], [9, 9]]
    records = []
    # two repeats of two prompts; eagle3-k2 is 1.5x / 2x no-spec in repeat 0 / 1, eagle3-k3 1.2x in both,
    # radar-chain as fast as eagle3-k2 in repeat 0 only, with one greedy output that differs
    for repeat, k2_speed in ((0, 1.5), (1, 2.0)):
        for prompt in (0, 1):
            records.append(_record("no-spec", repeat, prompt, same, 1.0))
            records.append(_record("eagle3-k2", repeat, prompt, same, 1.0 / k2_speed, drafts=4, accepted=2))
            records.append(_record("eagle3-k3", repeat, prompt, same, 1.0 / 1.2, drafts=4, accepted=4))
            records.append(_record("radar-chain", repeat, prompt, other if (repeat, prompt) == (1, 1) else same,
                                   1.0 / 1.5, drafts=2, accepted=1))
    args = argparse.Namespace(mode="batched", configs=["no-spec", "eagle3-k2", "eagle3-k3", "radar-chain"], prompts=2,
                              max_new_tokens=4, repeats=2, kv_cache_gb=1)
    document = module.summarize(records, args, started=0.0)
    (cell,) = document["cells"]
    rows = cell["rows"]
    assert cell["best_stock"] == "eagle3-k2"
    # tok/s = tokens over seconds of all the cell's prompts: k2 16 tokens in 2 / 1.5 + 2 / 2 s
    assert rows["eagle3-k2"]["tokens_per_s"] == pytest.approx(16 / (2 / 1.5 + 1.0))
    assert rows["eagle3-k2"]["vs_no_spec_by_repeat"] == pytest.approx([1.5, 2.0])
    assert rows["radar-chain"]["vs_best_stock_by_repeat"] == pytest.approx([1.0, 0.75])
    assert rows["radar-chain"]["vs_best_stock"] == pytest.approx(rows["radar-chain"]["tokens_per_s"]
                                                                  / rows["eagle3-k2"]["tokens_per_s"])
    assert rows["eagle3-k3"]["acceptance_length"] == pytest.approx(2.0)  # 1 + 16 accepted / 16 drafts
    assert (rows["radar-chain"]["greedy_match"], rows["radar-chain"]["greedy_outputs"]) == (7, 8)
    assert rows["eagle3-k2"]["greedy_match"] == 8
    text = module.markdown(document)
    assert "| radar-chain |" in text and text.startswith("# Batched, rows interleaved")
    assert all("outputs" not in record and record["num_tokens"] == [2, 2] for record in document["records"])
