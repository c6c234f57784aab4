from setuptools import find_packages, setup

setup(
    name="longcat",
    version="0.1.0",
    description="A Megatron-style training stack for LongCat-Flash Mixture-of-Experts models",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"longcat.planning": ["devices.yaml"]},  # the dry run's device presets
    python_requires=">=3.10",
    # Compatible ranges for installing into your own environment; `make venv` installs the exact
    # versions of requirements.lock (see the README's "Dependencies").
    install_requires=[
        "torch>=2.9,<3",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
        "tokenizers>=0.20,<1",
        "safetensors>=0.4,<1",
        "numpy>=1.26,<3",
        "tqdm>=4.60,<5",
        "matplotlib>=3.7,<4",
        "wandb>=0.17,<1",
        "tensorboard>=2.15,<3",  # logging.tensorboard=true
    ],
    extras_require={
        # DeepSpeed ZeRO-1/2 as the data-parallel engine (parallel.dp_mode=deepspeed); the tests cover it.
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        # The HF export's default layout asks the installed transformers (5.0 and 5.25 lay out differently).
        "hf": ["transformers>=5.0,<6"],
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "hypothesis>=6,<7", "psutil>=5.9,<8",
                 "transformers>=5.0,<6", "deepspeed>=0.19,<0.20"],
        "dev": ["ruff>=0.15,<1", "mypy>=1.10,<3", "import-linter>=2.1,<3"],
    },
    entry_points={"console_scripts": ["longcat-train=longcat.cli:main"]},
)
