"""TransferQueue: exactly-once consumption under concurrent producers and consumers, complete groups only, the
staleness bound, capacity, and producer death mid-group."""
import random
import threading
import time

import pytest

from ds_ext.asyncflow.queue import TransferQueue

REQUIRED = ("response_len", "reward")


def produce(q: TransferQueue, name: str, version_of, groups: int, die_after_samples: int = None, rng=None):
    """Generate ``groups`` groups with the current weights version; optionally die after a few samples."""
    rng = rng or random.Random(0)
    written = 0
    for _ in range(groups):
        g = None
        while g is None:  # like a rollout worker: re-check its weights version while admission says no
            if q.closed:
                return
            g = q.reserve(name, version_of(), timeout=0.05)
        for i in range(q.group_size):
            if die_after_samples is not None and written == die_after_samples:
                q.producer_died(name)
                return
            time.sleep(rng.random() * 0.002)
            q.put(g.group_id, i, {"response_len": rng.randint(1, 9), "reward": float(g.slot),
                                  "prompt": (g.slot, g.index_in_slot), "version": g.version})
            written += 1
        q.complete(g.group_id, REQUIRED)


def train(q: TransferQueue, steps: int, dp_size: int, version: list, seen: list):
    """Each step: every DP rank (a thread) drains its share of the slot, then the version moves on."""
    for step in range(steps):
        def rank_loop(rank):
            while True:
                got = q.take("train", step, max_groups=2, dp_rank=rank, dp_size=dp_size, timeout=20)
                assert got is not None, "consumer timed out"
                if not got:
                    return
                for group in got:
                    seen.append((step, rank, group["meta"].group_id, group["meta"].version,
                                 [s["prompt"] for s in group["samples"]], len(group["samples"])))
        threads = [threading.Thread(target=rank_loop, args=(r,)) for r in range(dp_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        q.finish_slot(step)
        version[0] += 1


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_concurrent_producers_and_consumers_consume_each_group_once_within_the_bound(staleness):
    steps, per_step, g = 6, 4, 3
    q = TransferQueue(group_size=g, groups_per_step=per_step, max_staleness=staleness)
    version, seen = [0], []
    producers = [threading.Thread(target=produce, args=(q, f"p{i}", lambda: version[0], 100, None,
                                                        random.Random(i))) for i in range(3)]
    for t in producers:
        t.start()
    train(q, steps, 2, version, seen)
    q.close()
    for t in producers:
        t.join()
    ids = [s[2] for s in seen]
    assert len(ids) == len(set(ids)) == steps * per_step  # exactly once
    assert all(n == g for *_, n in seen)  # whole groups only
    for step, rank, _, gen_version, prompts, _ in seen:
        assert 0 <= step - gen_version <= staleness
        assert all(p[0] == step for p in prompts)  # slot V is trained at step V
    for step in range(steps):  # each DP rank gets half of every slot, and every prompt of the slot once
        assert sorted(p[1] for s in seen if s[0] == step for p in s[4][:1]) == list(range(per_step))
        assert [sum(1 for s in seen if s[0] == step and s[1] == r) for r in (0, 1)] == [2, 2]
    assert q.summary()["max_lag"] <= staleness
    if staleness >= 1:
        assert q.summary()["max_lag"] >= 1  # producers really ran ahead


def test_staleness_zero_makes_rollout_wait_for_the_new_weights():
    q = TransferQueue(group_size=2, groups_per_step=1, max_staleness=0)
    assert q.reserve("p", version=0, timeout=1).slot == 0
    assert q.reserve("p", version=0, timeout=0.3) is None  # slot 1 needs version 1
    q.finish_slot(0)
    assert q.reserve("p", version=0, timeout=0.3) is None
    assert q.reserve("p", version=1, timeout=1).slot == 1


def test_capacity_bounds_how_far_producers_run_ahead():
    q = TransferQueue(group_size=1, groups_per_step=2, max_staleness=5, capacity_slots=2)
    slots = [q.reserve("p", version=10, timeout=0.5) for _ in range(5)]
    assert [s.slot for s in slots[:4]] == [0, 0, 1, 1] and slots[4] is None


def test_a_producer_dying_mid_group_drops_the_half_group_and_another_regenerates_it():
    q = TransferQueue(group_size=4, groups_per_step=2, max_staleness=1)
    version, seen = [0], []
    produce(q, "doomed", lambda: 0, groups=2, die_after_samples=6)  # group 1 half written
    assert q.summary()["dropped_partial"] == 1
    survivor = threading.Thread(target=produce, args=(q, "ok", lambda: version[0], 3))
    survivor.start()
    train(q, 2, 1, version, seen)
    q.close()
    survivor.join()
    assert sorted(s[4][0][1] for s in seen if s[0] == 0) == [0, 1]  # slot 0 complete: prompt 1 regenerated
    assert all(n == 4 for *_, n in seen)
    assert all(s[2] != 1 for s in seen)  # the dropped group id is never handed out
    with pytest.raises(KeyError):
        q.put(1, 0, {"reward": 0.0})


def test_an_expired_lease_drops_a_silent_producers_group():
    q = TransferQueue(group_size=2, groups_per_step=1, max_staleness=1, lease_s=0.2)
    g = q.reserve("silent", version=0)
    q.put(g.group_id, 0, {"response_len": 1, "reward": 0.0})
    time.sleep(0.3)
    g2 = q.reserve("other", version=0, timeout=2)
    assert (g2.slot, g2.index_in_slot) == (0, 0) and q.summary()["dropped_partial"] == 1


def test_incomplete_groups_are_refused_and_never_handed_out():
    q = TransferQueue(group_size=2, groups_per_step=1, max_staleness=1)
    g = q.reserve("p", version=0)
    q.put(g.group_id, 0, {"response_len": 3, "reward": 1.0})
    with pytest.raises(ValueError, match="missing columns"):
        q.complete(g.group_id, REQUIRED)
    assert q.take("train", 0, 1, timeout=0.3) is None


def test_a_slow_worker_s_late_group_is_discarded_and_the_worker_keeps_generating():
    """A worker slowed past its lease: its reservation is regenerated by another worker, its late delivery is
    discarded and counted (no KeyError), and the same worker then delivers its next group; each prompt trained once."""
    import torch
    from ds_ext.asyncflow.config import AsyncFlowConfig
    from ds_ext.asyncflow.rollout import RolloutWorker
    cfg = AsyncFlowConfig(group_size=2, groups_per_step=2, max_staleness=1, lease_s=0.3)
    q = TransferQueue(group_size=2, groups_per_step=2, max_staleness=1, lease_s=0.3)
    delays = {"slow": [0.8, 0.0], "fast": [0.0]}

    def worker(name):
        w = RolloutWorker(name, lambda: torch.nn.Linear(1, 1), None, cfg, q)
        w.version = 0

        def generate_group(prompt_index):
            time.sleep(delays[name].pop(0))
            return [{"prompt_ids": torch.tensor([prompt_index]), "response_ids": torch.tensor([1]), "response_len": 1,
                     "logprobs": torch.zeros(1), "token_versions": torch.zeros(1, dtype=torch.long),
                     "reward": 0.0, "prompt_index": prompt_index, "version": 0} for _ in range(2)]
        w.generate_group = generate_group
        return w

    slow, fast = worker("slow"), worker("fast")
    first = threading.Thread(target=slow.produce_one)
    first.start()
    time.sleep(0.5)  # the slow worker's lease (0.3 s) has expired; it is still generating
    assert fast.produce_one(timeout=2)  # regenerates prompt 0 of slot 0
    first.join()
    assert slow.stats["late_discarded"] == 1 and slow.stats["groups"] == 0
    assert slow.produce_one(timeout=2) and slow.stats["groups"] == 1  # the slow worker goes on
    groups = q.take("train", 0, 2, timeout=2)
    assert sorted(g["samples"][0]["prompt_index"] for g in groups) == [0, 1]
    assert q.summary()["late_discarded"] == 1 and q.summary()["dropped_partial"] == 1


def _samples(prompt_index: int, version: int, n: int = 2) -> list:
    import torch
    return [{"prompt_ids": torch.tensor([prompt_index]), "response_ids": torch.tensor([1]), "response_len": 1,
             "logprobs": torch.zeros(1), "token_versions": torch.full((1,), version), "reward": 0.0,
             "prompt_index": prompt_index, "version": version} for _ in range(n)]


@pytest.mark.parametrize("policy", ["pace", "drop"])
def test_staleness_policy_paces_or_drops(policy):
    """max_staleness 0 with room for two slots: weights 0 are too old for slot 1. ``pace`` holds the producer at
    its reservation; ``drop`` lets it generate, discards the group on delivery and regenerates that prompt."""
    q = TransferQueue(group_size=2, groups_per_step=1, max_staleness=0, capacity_slots=2, staleness_policy=policy)
    first = q.reserve("w", 0, timeout=0.1)
    assert q.put_group(first.group_id, _samples(0, 0), ["reward"])
    second = q.reserve("w", 0, timeout=0.1)  # slot 1 with weights 0: lag 1 > 0
    if policy == "pace":
        assert second is None
    else:
        assert second is not None and second.slot == 1
        assert q.put_group(second.group_id, _samples(1, 0), ["reward"]) is False
        assert q.summary()["stale_dropped"] == 1
    assert [g["samples"][0]["prompt_index"] for g in q.take("train", 0, 1, timeout=1)] == [0]
    q.finish_slot(0)
    again = q.reserve("w", 1, timeout=0.1)  # weights 1: slot 1's prompt, generated (again) in time
    assert (again.slot, again.index_in_slot) == (1, 0)
    assert q.put_group(again.group_id, _samples(1, 1), ["reward"])
    assert [g["meta"].version for g in q.take("train", 1, 1, timeout=1)] == [1]
    assert q.summary()["max_lag"] == 0
