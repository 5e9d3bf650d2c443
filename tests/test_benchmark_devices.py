"""``--device cuda`` of the StreamBP and Prefix Grouper benchmarks: refused with exit status 2 and a clear message
when no CUDA device is visible (in process, nothing measured); the CUDA-only settings they derive."""
import importlib
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("name, argv", [("streambp", ["--device", "cuda", "--lengths", "64"]),
                                        ("prefix_grouper", ["--device", "cuda", "--quick"])])
def test_device_cuda_without_cuda_exits_2_and_says_why(name, argv, capsys):
    bench = importlib.import_module(name)
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is visible" in err and "torch.cuda.is_available() is False" in err


def test_the_gpu_grid_is_bf16_with_offload_stored_on_the_host():
    streambp = importlib.import_module("streambp")
    assert streambp.stored_bytes("qwen2", 1024, "cuda") * 2 == streambp.stored_bytes("qwen2", 1024, "cpu")
    cfg = streambp.streambp_config("streambp_offload", type("A", (), {"chunk_size": 8, "logits_chunk_size": 4}))
    assert cfg.offload_layer_inputs and not streambp.streambp_config("streambp", cfg).offload_layer_inputs


@pytest.mark.slow
def test_gradient_errors_run_on_cpu_when_deepspeed_would_pick_cuda(tmp_path):
    """``--device cuda``'s last step (fp32 gradient errors of CPU models, in the parent) with DeepSpeed's accelerator
    set to CUDA as a GPU machine auto-detects it (``DS_ACCELERATOR=cuda`` is accepted without a GPU): the benchmark
    switches the parent to the CPU accelerator, so checkpointing keeps hidden states on the CPU (before the fix
    they moved to ``cuda:0`` and the step failed)."""
    import os
    import subprocess
    code = ("import argparse, json, sys; sys.path.insert(0, 'benchmarks'); import torch; torch.set_num_threads(1); "
            "import streambp; a = argparse.Namespace(model='reference', chunk_size=16, logits_chunk_size=16, "
            "device='cuda'); e = streambp.grad_errors(32, a); "
            "from deepspeed.accelerator import get_accelerator; "
            "print(json.dumps({'accelerator': get_accelerator().device_name(), 'errors': e}))")
    env = dict(os.environ, DS_ACCELERATOR="cuda", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accelerator"] == "cpu"
    # fp32 exactness bar of the issue: the modes' gradients equal plain autograd's to 1e-5 relative
    assert max(result["errors"].values()) <= 1e-5, result
