"""goku-megatron: Goku-style rectified-flow video/image training on Megatron-Core."""
from setuptools import find_packages, setup

# The real-data path (issue 3): DALI decoding (its CUDA 12 wheel also runs CPU pipelines, ~1 GB),
# optical-flow motion scores, the CogVideoX VAE and the FLAN-T5 encoder. The toy run needs none.
DATA = [
    "nvidia-dali-cuda120==2.4.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
    "opencv-python-headless",
    "diffusers>=0.32",
    "transformers>=4.46",
    "sentencepiece",
]

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
        "safetensors",  # goku-data convert-checkpoint
        "einops",  # megatron-core's parallel_state builds hybrid FSDP's groups with it
    ],
    extras_require={
        "data": DATA,
        # Weights & Biases beside TensorBoard (train.wandb_project); training never needs it.
        "wandb": ["wandb"],
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", *DATA, "wandb"],
        # Installed from NVIDIA's channels / NGC containers, never by CI: transformer-engine[pytorch],
        # flash-attn, apex (NVIDIA's, not the PyPI package of that name).
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "goku-train=goku_megatron.cli.train:main",
            "goku-sample=goku_megatron.cli.sample:main",
            "goku-eval=goku_megatron.cli.eval:main",
            "goku-plan=goku_megatron.cli.plan:main",
            "goku-data=goku_megatron.cli.data:main",
        ]
    },
)
