from setuptools import find_packages, setup

setup(
    name="longcat",
    version="0.1.0",
    description="A Megatron-style training stack for LongCat-Flash Mixture-of-Experts models",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.9",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "matplotlib",
        "wandb",
    ],
    extras_require={
        # DeepSpeed ZeRO-1/2 as the data-parallel engine (parallel.dp_mode=deepspeed); the tests cover it.
        "deepspeed": ["deepspeed>=0.19"],
        "test": ["pytest", "pytest-timeout", "hypothesis", "psutil", "transformers>=5.0", "deepspeed>=0.19"],
    },
    entry_points={"console_scripts": ["longcat-train=longcat.cli:main"]},
)
