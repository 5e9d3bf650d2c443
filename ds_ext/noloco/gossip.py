"""Random pairing of replicas and the point-to-point shard exchange with a timeout.

Pairing: every rank computes ``numpy.random.default_rng(seed + outer_step + 1).permutation(num_replicas)`` and
reads it as consecutive pairs (as the reference code does), so all ranks agree without a message. With an odd
number of replicas the last replica of the permutation has no partner that round: it applies the outer step with
its own pseudo-gradient only. The permutation changes every round, so every replica keeps mixing over time.

Exchange: rank k of replica A and rank k of replica B (same stage, same ZeRO shard index) swap their flat fp32
shards with ``isend``/``irecv`` on the shard-peer group, tagged by the outer step. A partner that is dead or slower
than the timeout makes the exchange give up (``None``); the caller skips that mixing. Abandoned requests are kept
alive (and their waiting thread keeps waiting), so a late message lands in its own round's buffer instead of in
freed memory or in a later round, and the link stays usable.
"""
from __future__ import annotations

import logging
import threading
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
        """Send ``tensor`` to global rank ``peer`` and receive its tensor; ``None`` on failure or timeout.

        The requests are waited on in a helper thread without a gloo timeout: a gloo ``wait(timeout)`` that expires
        closes the pair for good, so one late partner would cut the link for every later round.
        """
        received = torch.empty_like(tensor)
        errors: List[BaseException] = []
        done = threading.Event()
        try:
            requests = [dist.irecv(received, src=peer, group=self.group, tag=tag),
                        dist.isend(tensor, dst=peer, group=self.group, tag=tag)]
        except RuntimeError as exc:  # a peer known dead fails at once
            return self._give_up(peer, tag, exc, (received, tensor))

        def wait_all():
            try:
                for req in requests:
                    req.wait()
            except BaseException as exc:  # gloo raises RuntimeError (DistBackendError) for a dead peer
                errors.append(exc)
            finally:
                done.set()

        threading.Thread(target=wait_all, name=f"ds_ext-noloco-exchange-{tag}", daemon=True).start()
        if not done.wait(self.timeout_s):
            return self._give_up(peer, tag, TimeoutError(f"no answer in {self.timeout_s:.1f} s"),
                                 (requests, received, tensor))
        if errors:
            return self._give_up(peer, tag, errors[0], (requests, received, tensor))
        return received

    def _give_up(self, peer: int, tag: int, exc: BaseException, keep: tuple) -> None:
        log.warning("ds_ext::noloco exchange with rank %d (tag %d) failed: %s", peer, tag,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self._abandoned.append(keep)
        return None
