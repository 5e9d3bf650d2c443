"""Every wrapper of a private attention op against that op's schema, meta registration and input layout, on CPU.

The merged attention op (:mod:`ds_ext.ops.attention`) calls private aten ops whose CUDA kernels cannot run here.
Each handle in :mod:`ds_ext.ops.attention_kernels` is replaced by a *contract op* that

1. binds the call to the op's schema (argument names, kinds, types, defaults): torch 2.13's live schema, or torch
   2.11's recorded in ``tests/fixtures/torch_2_11_sdpa_ops.json`` (the GPU image runs 2.11);
2. checks the inputs' memory layout where the CUDA kernel assumes one (the fixture's ``inputs``: e.g. the efficient
   backward reads ``out`` with row stride ``H * D``);
3. returns the op's meta outputs: live, the real meta registration (the op called on ``meta`` tensors); for 2.11,
   the recorded output specs (shapes, strides, dtypes, the log-sum-exp padding).

Then the wrappers run end to end on ``meta`` tensors (forward and backward of merged parts) and their results are
checked against the kernel contract: ``out [B, H, L, D]`` in q's dtype, ``lse [B, H, L]`` fp32, gradients shaped
and typed like q, k, v. The recorded specs are themselves checked against the live meta registrations (identical in
2.11 and 2.13 for fp32 inputs).
"""
import json
import math
import os

import pytest
import torch

import ds_ext.ops.attention_kernels as kernels
from ds_ext.ops.attention import Part, chunk_attention, merged_attention
from ds_ext.prefix_grouper.attention import row_parts

FIXTURE = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "torch_2_11_sdpa_ops.json")))
HANDLES = {  # module attribute -> aten op
    "CPU_FLASH_FORWARD": "_scaled_dot_product_flash_attention_for_cpu",
    "CPU_FLASH_BACKWARD": "_scaled_dot_product_flash_attention_for_cpu_backward",
    "CUDA_FLASH_FORWARD": "_scaled_dot_product_flash_attention",
    "CUDA_FLASH_BACKWARD": "_scaled_dot_product_flash_attention_backward",
    "CUDA_EFFICIENT_FORWARD": "_scaled_dot_product_efficient_attention",
    "CUDA_EFFICIENT_BACKWARD": "_scaled_dot_product_efficient_attention_backward",
}
VERSIONS = ["live", "2.11"]
BF16, FP32 = torch.bfloat16, torch.float32


def schema(version: str, op: str):
    if version == "live":
        return getattr(torch.ops.aten, op).default._schema
    return torch._C.parse_schema("aten::" + FIXTURE["ops"][op]["schema"])


def _type_ok(arg, value) -> bool:
    t = str(arg.type)
    if t.startswith("Optional[") and t.endswith("]"):
        t = t[9:-1] + "?"
    if value is None:  # None binds to Tensor (an undefined tensor) and to optionals
        return t.startswith("Tensor") or t.endswith("?")
    if t.startswith("Tensor"):
        return isinstance(value, torch.Tensor)
    if t == "List[bool]":
        return isinstance(value, (list, tuple)) and len(value) == arg.N and all(isinstance(b, bool) for b in value)
    return isinstance(value, {"float": (float, int), "bool": bool, "int": int, "SymInt": int}[t.rstrip("?")])


def bind(sch, args, kwargs) -> dict:
    """The call's arguments by name, as the dispatcher would bind them (raises AssertionError otherwise)."""
    positional = [a for a in sch.arguments if not a.kwarg_only]
    assert len(args) <= len(positional), f"{sch.name}: {len(args)} positional arguments, schema takes {len(positional)}"
    bound = {a.name: v for a, v in zip(positional, args)}
    names = {a.name: a for a in sch.arguments}
    for key, value in kwargs.items():
        assert key in names and key not in bound, f"{sch.name}: unexpected or repeated argument {key!r}"
        bound[key] = value
    for a in sch.arguments:
        if a.name not in bound:
            assert a.has_default_value(), f"{sch.name}: argument {a.name!r} missing"
            bound[a.name] = a.default_value
        assert _type_ok(a, bound[a.name]), f"{sch.name}: {a.name}={bound[a.name]!r} is not a {a.type}"
    return bound


def _sizes(b):
    q, k, v = b["query"], b["key"], b["value"]
    return dict(B=q.size(0), H=q.size(1), Lq=q.size(2), D=q.size(3), Hk=k.size(1), Lk=k.size(2), Dv=v.size(3))


def check_inputs(op: str, b: dict) -> None:
    """The CUDA kernel's input layout assumptions (the fixture's ``inputs``; the same in 2.11 and 2.13)."""
    n = _sizes(b)
    for name, rules in FIXTURE["ops"][op].get("inputs", {}).items():
        t = b[name]
        for rule in rules:
            ok = {"last_dim_contiguous": lambda: t.stride(-1) == 1,
                  "contiguous": lambda: t.is_contiguous(),
                  "rows_interleave_heads": lambda: t.size(2) <= 1 or t.stride(2) == t.size(1) * t.size(3),
                  "lse_rows_padded_32": lambda: (tuple(t.shape) == (n["B"], n["H"], math.ceil(n["Lq"] / 32) * 32)
                                                 and t.stride(2) == 1),
                  "lse_rows": lambda: tuple(t.shape) == (n["B"], n["H"], n["Lq"])}[rule]()
            assert ok, f"{op}: {name} {tuple(t.shape)} strides {t.stride()} breaks the kernel's layout: {rule}"


def _meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) \
        else t


def recorded_outputs(op: str, b: dict):
    """The op's outputs from the fixture's specs (see its ``output_spec``)."""
    n = _sizes(b)

    def dim(x):
        if isinstance(x, int):
            return x
        return math.ceil(n[x[7:-1]] / 32) * 32 if x.startswith("ceil32(") else n[x]
    outs = []
    for spec in FIXTURE["ops"][op]["outputs"]:
        if spec is None or isinstance(spec, str):
            outs.append(spec if spec is None else n[spec])
        elif "like" in spec:
            outs.append(torch.empty_like(b[spec["like"]]))
        else:
            dtype = getattr(torch, spec["dtype"]) if hasattr(torch, spec["dtype"]) else b[spec["dtype"]].dtype
            device = spec.get("device", b["query"].device)
            shape = [dim(x) for x in spec["shape"]]
            perm = spec.get("permute", list(range(len(shape))))
            outs.append(torch.empty_permuted(shape, perm, dtype=dtype, device=device))
    return tuple(outs)


class ContractOp:
    """A stand-in for one aten op (see the module docstring); ``calls`` counts its calls."""

    def __init__(self, version: str, op: str):
        self.version, self.op, self.calls = version, op, 0
        self.schema = schema(version, op)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        b = bind(self.schema, args, kwargs)
        check_inputs(self.op, b)
        if self.version == "live":
            return getattr(torch.ops.aten, self.op)(*[_meta(a) for a in args],
                                                    **{k: _meta(v) for k, v in kwargs.items()})
        return recorded_outputs(self.op, b)


@pytest.fixture(params=VERSIONS)
def contract(request, monkeypatch):
    ops = {}
    for attr, op in HANDLES.items():
        ops[op] = ContractOp(request.param, op)
        monkeypatch.setattr(kernels, attr, ops[op])
    return ops


def meta(*shape, dtype=FP32):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)


def check_grads(inputs, dtype):
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype


CASES = [("cuda_flash", BF16), ("cuda_efficient", BF16), ("cuda_efficient", FP32), ("cpu_flash", FP32)]


@pytest.mark.parametrize("kernel, dtype", CASES)
def test_each_wrapper_meets_the_kernel_contract_on_the_ops_meta_outputs(kernel, dtype, contract):
    """forward -> (out [B, H, L, D] q's dtype, lse [B, H, L] fp32); backward with the merged (contiguous) out ->
    gradients like q, k, v (grouped heads 4/2, 13 rows: the efficient lse is padded to 32 and sliced back)."""
    q, k, v = meta(2, 4, 13, 16, dtype=dtype), meta(2, 2, 13, 16, dtype=dtype), meta(2, 2, 13, 16, dtype=dtype)
    impl = kernels.KERNELS[kernel]
    out, lse = impl.forward(q, k, v, True, 0.25)
    assert out.shape == q.shape and out.dtype == dtype and out.stride(-1) == 1
    assert lse.shape == q.shape[:3] and lse.dtype == FP32
    merged = torch.empty(q.shape, dtype=dtype, device="meta")  # what MergedAttention saves: contiguous [B, H, L, D]
    grads = impl.backward(torch.empty_like(merged), q, k, v, merged, torch.empty(q.shape[:3], device="meta"),
                          True, 0.25)
    assert [(g.shape, g.dtype) for g in grads] == [(t.shape, t.dtype) for t in (q, k, v)]
    assert sum(op.calls for op in contract.values()) == 2


@pytest.mark.parametrize("kernel, dtype", CASES)
def test_merged_parts_forward_and_backward_reach_every_op_with_valid_layouts(kernel, dtype, contract):
    """Prefix Grouper's parts (query row slices, merged in fp32 under bf16) and a StreamBP chunk (prefix +
    diagonal block): each part's forward and backward op bind to the schema and see the layouts their kernels read."""
    q, k, v = meta(1, 4, 13, 16, dtype=dtype), meta(1, 2, 13, 16, dtype=dtype), meta(1, 2, 13, 16, dtype=dtype)
    out = merged_attention(q, row_parts(k, v, 5, [2, 4]), kernel=kernel)
    assert out.shape == q.shape and out.dtype == dtype
    out.backward(torch.empty_like(out))
    check_grads((q, k, v), dtype)
    qc, kc, vc = meta(2, 4, 5, 16, dtype=dtype), meta(2, 2, 11, 16, dtype=dtype), meta(2, 2, 11, 16, dtype=dtype)
    chunk = merged_attention(qc, [Part(kc, vc, False, kv_rows=(0, 6)), Part(kc, vc, True, kv_rows=(6, 11))],
                             kernel=kernel)
    chunk.backward(torch.empty_like(chunk))
    check_grads((qc, kc, vc), dtype)
    fwd = HANDLES[kernel.upper() + "_FORWARD"]
    bwd = HANDLES[kernel.upper() + "_BACKWARD"]
    assert contract[fwd].calls == 4 + 2 and contract[bwd].calls == 4 + 2  # one call per part, both passes


def test_chunk_attention_reaches_the_efficient_kernel_with_valid_layouts(contract, monkeypatch):
    """StreamBP's call site: bf16 chunk attention on "CUDA" with compute capability 7.5 selects the efficient
    kernel; the block form (prefix buffer + chunk K/V) runs both passes through the contract ops."""
    real = kernels.facts
    monkeypatch.setattr(kernels, "facts", lambda q, k: real(q, k)._replace(device="cuda", capability=(7, 5)))
    q, k, v = meta(1, 4, 6, 16, dtype=BF16), meta(1, 2, 8, 16, dtype=BF16), meta(1, 2, 8, 16, dtype=BF16)
    kb, vb = meta(1, 2, 6, 16, dtype=BF16), meta(1, 2, 6, 16, dtype=BF16)
    out = chunk_attention(q, k, v, 8, block=(kb, vb))
    out.backward(torch.empty_like(out))
    check_grads((q, k, v, kb, vb), BF16)
    assert contract[HANDLES["CUDA_EFFICIENT_BACKWARD"]].calls == 2


@pytest.mark.parametrize("op", sorted(FIXTURE["ops"]))
def test_the_recorded_2_11_ops_match_the_live_ones(op):
    """The 2.11 schemas bind like 2.13's (names, kinds, types, defaults), and the recorded output specs give the
    live meta registrations' shapes, strides and dtypes (fp32; grouped and ungrouped heads, 13 and 64 rows)."""
    old, new = schema("2.11", op), schema("live", op)
    describe = (lambda s: [(a.name, str(a.type), a.kwarg_only, a.default_value) for a in s.arguments]
                + [str(r.type) for r in s.returns])
    assert describe(old) == describe(new)
    for hk, rows in ((2, 13), (4, 64)):
        hk = 4 if "efficient" in op else hk  # the efficient op has no grouped heads
        q, k, v = (torch.empty(2, 4, rows, 16, device="meta"), torch.empty(2, hk, rows, 16, device="meta"),
                   torch.empty(2, hk, rows, 16, device="meta"))
        args = {"query": q, "key": k, "value": v, "out": torch.empty_like(q), "grad_out": torch.empty_like(q),
                "grad_out_": torch.empty_like(q), "dropout_p": 0.0, "is_causal": True, "return_debug_mask": False,
                "compute_log_sumexp": True, "attn_bias": None, "cum_seq_q": None, "cum_seq_k": None,
                "max_q": rows, "max_k": rows, "philox_seed": torch.empty(2, dtype=torch.uint64, device="meta"),
                "philox_offset": torch.empty((), dtype=torch.uint64, device="meta"),
                "grad_input_mask": [True, True, True, False],
                "logsumexp": torch.empty(2, 4, math.ceil(rows / 32) * 32 if "efficient" in op else rows,
                                         device="meta")}
        call = [args[a.name] for a in new.arguments if not a.kwarg_only]
        live = getattr(torch.ops.aten, op)(*call, scale=0.25)
        live = live if isinstance(live, tuple) else (live,)
        recorded = recorded_outputs(op, bind(old, call, {"scale": 0.25}))
        assert len(live) == len(recorded)
        for a, b in zip(live, recorded):
            if isinstance(a, torch.Tensor):
                assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype), op
            else:
                assert a == b, op
