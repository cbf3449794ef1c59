"""Benchmark harness: RADAR against stock EAGLE-3 and no speculation (``radar-vllm bench``).

Modules, one concern each:

- :mod:`~radar_vllm.bench.measures`: pure metric arithmetic (median/spread, ratio of sums,
  acceptance length and rates from counters, greedy output matching);
- :mod:`~radar_vllm.bench.snapshots`: Prometheus counters before/after a run and their difference;
- :mod:`~radar_vllm.bench.settings`: the run's settings and the presets (main, quick, report, sampling, GPU);
- :mod:`~radar_vllm.bench.estimate`: the run-time cost model printed before a run;
- :mod:`~radar_vllm.bench.configs`: the configuration rows (no speculation, EAGLE-3 at each K,
  RADAR chain/tree, RADAR chain at a fixed depth, static tree, confidence stop);
- :mod:`~radar_vllm.bench.workloads`: prompt sets as token ids (MT-Bench turns 1 and 2,
  HumanEval, ShareGPT held-out);
- :mod:`~radar_vllm.bench.confidence`: the training-free confidence stop, written as a policy
  checkpoint;
- :mod:`~radar_vllm.bench.offline` (run in a subprocess per configuration by
  :mod:`~radar_vllm.bench.engine_process`), :mod:`~radar_vllm.bench.online` (OpenAI-compatible server on
  loopback + an asyncio client), :mod:`~radar_vllm.bench.reference_backend` (the plain PyTorch
  decoder where vLLM is not installed);
- :mod:`~radar_vllm.bench.report` and :mod:`~radar_vllm.bench.plots`: JSON, markdown, figures;
- :mod:`~radar_vllm.bench.harness`: puts it together (and makes the plain-head view of a RADAR
  checkpoint for the stock EAGLE-3 rows).

Nothing here imports vLLM: engines are built through :mod:`radar_vllm.offline.generate` inside the
worker subprocess, and the server is started with ``radar-vllm serve`` (``vllm serve``'s arguments).
"""
