"""Markdown summary of a RADAR checkpoint's gate-cost tables (one section per table, i.e. per machine).

    python benchmarks/gate_table_report.py radar_vllm/checkpoints/smollm2-135m-radar \
        --out benchmarks/results/gate_costs_smollm2.md

Reads the tables the checkpoint's ``"radar": {"gate_costs": ...}`` names (one file or a list) and
renders each with :func:`radar_vllm.offline.gate_calibration.gate_table_markdown`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from radar_vllm.core.config import RadarConfig
from radar_vllm.core.draft_gate import load_gate_table
from radar_vllm.offline.gate_calibration import gate_table_markdown

INTRO = (
    "What an engine's depth gate starts from at each batch size on the machine a table was measured on: "
    "per depth cap, tokens emitted per request per second as the gate estimates them (tokens from the "
    "per-depth acceptance on ShareGPT train prompts, step times measured at that batch size). The gate "
    "keeps measuring from there; these numbers only spare it the first sweep of every cap. Bold: where it "
    "starts. An engine uses the first table measured on its own machine (CPU model and core count); "
    "elsewhere it measures from scratch."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="RADAR checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    args = parser.parse_args()
    section = json.loads((args.checkpoint / "config.json").read_text(encoding="utf-8")).get("radar")
    if section is None:
        raise SystemExit(f"{args.checkpoint} has no \"radar\" section in config.json")
    paths = RadarConfig.from_dict(section).gate_cost_paths(args.checkpoint)
    if not paths:
        raise SystemExit(f"{args.checkpoint} names no gate-cost table (radar.gate_costs)")
    parts = [f"# Gate-cost tables of `{args.checkpoint.name}`", "",
             f"Written by `python benchmarks/gate_table_report.py {args.checkpoint} --out {args.out}`; how each "
             "table was measured: benchmarks/results/README.md.", "", INTRO, ""]
    for path in paths:
        parts.append(gate_table_markdown(load_gate_table(path), path.name))
    args.out.write_text("\n".join(parts).rstrip() + "\n", encoding="utf-8")
    print(args.out.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
