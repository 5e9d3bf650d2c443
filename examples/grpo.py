"""Async GRPO on your task: rollout workers generate while the DeepSpeed trainer learns (AsyncFlow).

    ds-ext --config configs/grpo_vllm.json examples/grpo.py --model /data/qwen-dir --prompts math.jsonl \
        --reward my_rewards:exact_answer
    ds-ext --config configs/grpo_async.json examples/grpo.py            # the built-in addition task
    ds-ext --config configs/grpo_sync.json examples/grpo.py             # "max_staleness": 0, the sync baseline

The command line lives in :mod:`ds_ext.grpo.cli` (``--help`` lists every flag); this file is its entry point.
"""
from ds_ext.distributed import shutdown
from ds_ext.grpo.cli import main

if __name__ == "__main__":
    main()
    shutdown()  # gloo torn down while the interpreter is alive (ds_ext.distributed.shutdown)
