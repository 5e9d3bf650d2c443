"""Random pairing of replicas and the point-to-point shard exchange with a timeout.

Pairing: every rank computes ``numpy.random.default_rng(seed + outer_step + 1).permutation(num_replicas)`` and
reads it as consecutive pairs (as the reference code does), so all ranks agree without a message. With an odd
number of replicas the last replica of the permutation has no partner that round: it applies the outer step with
its own pseudo-gradient only. The permutation changes every round, so every replica keeps mixing over time.

Exchange: rank k of replica A and rank k of replica B (same stage, same ZeRO shard index) swap their flat fp32
shards with ``isend``/``irecv`` on the shard-peer group, tagged by the outer step. A partner that is dead or slower
than the timeout makes the exchange give up (``None``); the caller skips that mixing. Abandoned requests are kept
alive so that a late message lands in its own buffer instead of in freed memory or in a later round.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("ds_ext.noloco")


def pairing(num_replicas: int, outer_step: int, seed: int = 0) -> List[tuple]:
    """Pairs of replica indices for ``outer_step``; with an odd count, the leftover replica is a 1-tuple."""
    perm = np.random.default_rng(seed + outer_step + 1).permutation(num_replicas).tolist()
    groups = [tuple(perm[i:i + 2]) for i in range(0, num_replicas - 1, 2)]
    if num_replicas % 2:
        groups.append((perm[-1],))
    return groups


def partner_of(replica: int, num_replicas: int, outer_step: int, seed: int = 0) -> Optional[int]:
    """The replica that ``replica`` mixes with at ``outer_step``, or None when it sits out (odd count)."""
    for group in pairing(num_replicas, outer_step, seed):
        if replica in group:
            return next((r for r in group if r != replica), None)
    raise ValueError(f"replica {replica} is not in 0..{num_replicas - 1}")


class ShardExchange:
    """Swap a flat tensor with one peer rank over ``group``; never blocks longer than ``timeout_s``."""

    def __init__(self, group, timeout_s: float):
        self.group, self.timeout_s = group, timeout_s
        self._abandoned: List[tuple] = []  # (requests, buffers) of exchanges that timed out

    def swap(self, tensor: torch.Tensor, peer: int, tag: int) -> Optional[torch.Tensor]:
        """Send ``tensor`` to global rank ``peer`` and receive its tensor; ``None`` on failure or timeout."""
        received = torch.empty_like(tensor)
        requests = []
        deadline = time.monotonic() + self.timeout_s
        try:
            requests.append(dist.irecv(received, src=peer, group=self.group, tag=tag))
            requests.append(dist.isend(tensor, dst=peer, group=self.group, tag=tag))
            for req in requests:
                left = max(deadline - time.monotonic(), 0.001)
                req.wait(timeout=timedelta(seconds=left))
        except RuntimeError as exc:  # gloo raises RuntimeError (DistBackendError) for timeouts and dead peers
            log.warning("ds_ext::noloco exchange with rank %d (tag %d) failed: %s", peer, tag,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._abandoned.append((requests, received, tensor))
            return None
        return received
