"""The vLLM engine's weight sync on GPUs (``-m cuda``; skipped without CUDA and vLLM): the file path into an engine on
the GPU, and with two GPUs the NCCL broadcast path (trainer on cuda:1, engine on cuda:0); after every push the
engine's probe log-probs equal the trainer's."""
import threading

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# fp32 on both sides (the directory is saved in fp32 and the engine loads dtype "auto"); GPU kernels (TF32 off by
# default in vLLM's fp32 path) differ from the eager forward by summation order only
REL = 1e-4


class _Ref:
    """An in-process stand-in for an RPC RRef of the worker."""

    def __init__(self, worker):
        self.worker = worker

    def rpc_async(self):
        worker = self.worker

        class _Call:
            def set_weights(self, version, handle):
                fut = torch.futures.Future()
                worker.set_weights(version, handle)
                fut.set_result(True)
                return fut
        return _Call()


def _setup(tmp_path):
    from ds_ext.asyncflow.config import AsyncFlowConfig
    from ds_ext.asyncflow.hf_policy import HFPolicy
    from ds_ext.asyncflow.queue import TransferQueue
    from ds_ext.grpo.task import build_task
    from ds_ext.asyncflow.vllm_engine import VLLMRolloutWorker
    from ds_ext.models.hf import load_hf_model
    from tests.hf_dirs import make_model_dir, qwen2_config
    from transformers import AutoTokenizer
    model_dir = make_model_dir(tmp_path / "qwen", qwen2_config(hidden_size=128, intermediate_size=256,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               num_key_value_heads=2))
    (tmp_path / "p.jsonl").write_text("".join(f'{{"prompt": "Say {i}", "answer": "{i}"}}\n' for i in range(8)))
    cfg = AsyncFlowConfig(enabled=True, group_size=4, groups_per_step=2, max_new_tokens=8, max_staleness=1,
                          rollout={"engine": "vllm", "model_dir": str(model_dir), "shm_dir": str(tmp_path)})
    task = build_task(str(tmp_path / "p.jsonl"), "ds_ext.grpo.rewards:exact_match",
                      AutoTokenizer.from_pretrained(model_dir))
    queue = TransferQueue(cfg.group_size, cfg.groups_per_step, cfg.max_staleness)
    worker = VLLMRolloutWorker("w", None, task, cfg, queue)
    policy = HFPolicy(load_hf_model(str(model_dir), init="pretrained", dtype=torch.float32))
    return cfg, queue, worker, policy


def _update(policy):
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))


def test_file_push_into_a_gpu_engine(tmp_path):
    from ds_ext.asyncflow.vllm_sync import BucketWriter, probe_for, relative_error
    cfg, queue, worker, policy = _setup(tmp_path)
    writer = BucketWriter(str(tmp_path), 0.1, probe=probe_for(policy))
    for version in range(3):
        if version:
            _update(policy)
        worker.set_weights(version, writer.write(version, policy))
        worker.run(max_groups=(version + 1) * cfg.groups_per_step)
        assert relative_error(worker.stats["probe_logprobs"][version], writer.probes[version]) <= REL
        queue.take("train", version, cfg.groups_per_step, timeout=5)
        queue.finish_slot(version)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: trainer cuda:1, engine cuda:0")
def test_nccl_push_into_a_gpu_engine(tmp_path):
    from ds_ext.asyncflow.queue import TransferQueue
    from ds_ext.asyncflow.vllm_nccl import NCCLWeightPusher
    from ds_ext.asyncflow.vllm_sync import probe_for, relative_error, trainer_probe_logprobs
    cfg, queue, worker, policy = _setup(tmp_path)
    policy = policy.to("cuda:1")
    probe = probe_for(policy)
    pusher = NCCLWeightPusher({"w": _Ref(worker)}, TransferQueue(4, 2, 1), "127.0.0.1", 29651, bucket_mb=0.1)
    for version in range(3):
        _update(policy)
        # the engine receives at its next step boundary, in its loop: run it beside the (blocking) push
        loop = threading.Thread(target=worker.run, kwargs={"max_groups": (version + 1) * cfg.groups_per_step})
        with torch.cuda.device(1):
            loop.start()
            pusher.push(version, policy)
        loop.join()
        assert relative_error(worker.stats["probe_logprobs"][version],
                              trainer_probe_logprobs(policy, probe).cpu()) <= REL
        queue.take("train", version, cfg.groups_per_step, timeout=5)
        queue.finish_slot(version)
