"""Triton kernels of radar_vllm, installed as ``radar_vllm.kernels``.

Each kernel sits in its own folder beside a plain-torch reference with the same signature; the
reference is also the CPU fallback. The public launchers below route every call through
``dispatch.use_triton``: the Triton kernel for CUDA tensors, the reference elsewhere (override
with ``RADAR_KERNEL_BACKEND`` or ``dispatch.force_backend``). Triton is imported only when a
Triton kernel actually runs.

  * ``policy_step``: fused stop-policy step (LSTM cell, MLP head, softmax, continue flag). Called
    by the runtime: ``radar_vllm.core.policy.PolicyRunner.step``, after every draft call.
  * ``tree_mask``: ancestor bitmasks, depths and the optional dense mask of a ragged tree batch.
  * ``tree_attention``: paged tree attention of the verification pass.
    These two are the **GPU verify path**, not called by the runtime yet: on vLLM's CPU platform
    tree rows are verified with vLLM's own CPU kernel (``radar_vllm/vllm/attention.py``), and tree
    mode on CUDA is refused at start-up (``radar_vllm.vllm.engine_plan.plan_engine``). Their call
    site will be the CUDA counterpart of ``RadarTreeCPUAttentionImpl._apply_plan`` in
    ``radar_vllm/vllm/attention.py`` (one launch per layer for all tree rows of a step, the
    ``TreeVerifyPlan`` converted to ``parents``/``num_nodes`` tensors there). Their correctness
    and speed are measured by ``benchmarks/bench_kernels.py``.

``python -m radar_vllm.kernels.compile_check`` compiles every kernel for an NVIDIA architecture
without a GPU; ``fixtures`` holds the input builders and per-dtype tolerances of the tests.
"""
from .dispatch import BACKEND_ENV, force_backend, use_triton
from .policy_step import PolicyStepWeights, pack_policy_weights, policy_step
from .tree_attention import tree_attention
from .tree_mask import MAX_TREE_NODES, NO_PARENT, TreeMask, num_mask_words, tree_mask, unpack_ancestor_bits

__all__ = [
    "BACKEND_ENV",
    "MAX_TREE_NODES",
    "NO_PARENT",
    "PolicyStepWeights",
    "TreeMask",
    "force_backend",
    "num_mask_words",
    "pack_policy_weights",
    "policy_step",
    "tree_attention",
    "tree_mask",
    "unpack_ancestor_bits",
    "use_triton",
]
