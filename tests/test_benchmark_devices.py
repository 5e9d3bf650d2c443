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
