"""goku-megatron: Goku-style rectified-flow video/image training on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="goku-megatron",
    version="0.1.0",
    description="Goku (arXiv 2502.04896) rectified-flow transformer trainer on Megatron-Core",
    python_requires=">=3.10",
    packages=find_packages(include=["goku_megatron", "goku_megatron.*"]),
    package_data={"goku_megatron": ["recipes/*.yaml"]},
    # torch is pinned by the README's first command (the CPU wheel); a range here keeps pip from
    # replacing it with a CUDA build on CPU machines, and accepts the NGC container's torch.
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is the newest megatron-core that installs on both Python 3.11 and 3.12.
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "pyyaml",
        "psutil",
        "tensorboard",
        "webdataset",
        "av",
        "pillow",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        # Installed from NVIDIA's channels / NGC containers, never by CI: transformer-engine[pytorch],
        # flash-attn, apex (NVIDIA's, not the PyPI package of that name), nvidia-dali-cuda120.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "goku-train=goku_megatron.train:main",
        ]
    },
)
