from setuptools import find_packages, setup

setup(
    name="seer-engine",
    version="0.1.0",
    description="SEER-style self-supervised pretraining (SwAV + RegNetY) with Triton kernels, DALI and DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "dataloading*", "benchmarks*"]),
    package_data={"engine": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "deepspeed>=0.16",
        "pyyaml",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={"dali": ["nvidia-dali-cuda130"], "test": ["pytest", "pytest-benchmark", "pytest-timeout"]},
    entry_points={"console_scripts": ["seer=engine.cli:main"]},
)
