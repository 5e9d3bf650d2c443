"""The recovery journal on megatron-core's distributed optimizer (2 processes sharing one replica, so each rank holds
half of the fp32 main params and Adam state): killed with SIGKILL mid-run, the resumed run ends bit-identical to a
run that never stopped."""
import os
import signal

import pytest
import torch

pytest.importorskip("megatron.core")

from dist import run_distributed  # noqa: E402
from test_megatron import _flat, _init_megatron  # noqa: E402

pytestmark = pytest.mark.slow

STEPS, KILL_RANK, KILL_STEP = 10, 1, 7


def _journal_body(journal_dir, kill_at_step):
    import torch.distributed as dist
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ds_ext.megatron.journal import journal_for
    from ds_ext.megatron.model import parse_ds_ext, tiny_gpt
    from ds_ext.megatron.noloco import MegatronShards
    from ds_ext.megatron.shims import cpu_shims
    _init_megatron()
    rank = dist.get_rank()
    with cpu_shims():
        model = tiny_gpt(None, seed=0)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                                  grad_reduce_in_fp32=True), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True,
                                                     clip_grad=0.5), [ddp])
        journal = None
        if journal_dir is not None:
            ext = parse_ds_ext({"ds_ext": {"recovery": {"journal_dir": journal_dir, "base_interval": 4,
                                                        "fsync": "never"}}})
            journal = journal_for(opt, [ddp], ext.recovery)
        start = journal.step if journal else 0
        for step in range(start + 1, STEPS + 1):
            if journal:
                journal.before_forward()
            if kill_at_step == step and rank == KILL_RANK:
                os.kill(os.getpid(), signal.SIGKILL)
            data = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1000 * rank + step))
            ddp.zero_grad_buffer()
            opt.zero_grad()
            ddp(data, None, None, labels=torch.roll(data, -1, 1)).mean().backward()
            finalize_model_grads([ddp])
            opt.step()
            if journal:
                journal.commit(step)
        shards = MegatronShards(opt, [ddp])
        inner = shards.optimizers[0].optimizer
        adam = torch.cat([torch.cat([inner.state[t][k].reshape(-1) for k in ("exp_avg", "exp_avg_sq")])
                          for t in shards.tensors])
        out = {"flat": _flat(model), "shard": shards.read(), "adam": adam, "start": start}
        if journal:
            journal.close()
    return out


def test_megatron_journal_kill_and_resume_is_bit_identical(tmp_path):
    reference = run_distributed(_journal_body, world_size=2, args=(None, None), timeout=120)
    journal_dir = str(tmp_path / "journal")
    run_distributed(_journal_body, world_size=2, args=(journal_dir, KILL_STEP), timeout=120, may_die=(KILL_RANK,),
                    group_dies_with=True)
    assert sorted(os.listdir(journal_dir)) == ["rank00000", "rank00001"]
    resumed = run_distributed(_journal_body, world_size=2, args=(journal_dir, None), timeout=120)
    for ref, res in zip(reference, resumed):
        # the killed rank had finished step KILL_STEP - 1 (its forward of KILL_STEP waited for that record)
        assert res["start"] == KILL_STEP - 1
        assert ref["shard"].numel() < ref["flat"].numel()  # each rank really holds a shard
        assert torch.equal(res["flat"], ref["flat"])
        assert torch.equal(res["shard"], ref["shard"])
        assert torch.equal(res["adam"], ref["adam"])
    assert not torch.equal(reference[0]["shard"], reference[1]["shard"][:reference[0]["shard"].numel()])


def test_checkpoint_free_recovery_is_refused_on_megatron_with_what_to_do(tmp_path):
    """megatron-core runs resume from the journal alone: asking for checkpoint-free recovery there is an error that
    names the setting, not a silently ignored flag. ``parse_ds_ext`` already refuses it at config time
    (tests/test_megatron_example.py); a config built without it is refused by the journal itself."""
    from ds_ext.megatron.journal import journal_for
    from ds_ext.recovery.config import RecoveryConfig
    for recovery in ({"journal_dir": str(tmp_path), "checkpoint_free": {"enabled": True}},
                     {"checkpoint_free": {"enabled": True}}):
        cfg = RecoveryConfig.model_validate(recovery)
        with pytest.raises(ValueError, match=r"checkpoint_free.enabled is true, .* Set ds_ext.recovery."
                                             r"checkpoint_free.enabled to false"):
            journal_for(None, [], cfg)
