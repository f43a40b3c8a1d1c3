"""ixc25-ms: InternLM-XComposer-2.5 on MindSpore."""
from setuptools import find_packages, setup

setup(
    name="ixc25-ms",
    version="0.1.0",
    description="InternLM-XComposer-2.5 (IXC2.5) reimplemented on MindSpore, with converters and PyTorch parity tests",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["ixc25_ms", "ixc25_ms.*", "converters", "converters.*",
                                    "parity_tests", "parity_tests.*", "scripts", "scripts.*"]),
    # the fused CPU decode kernels (compiled on first use) and the embedded default model
    package_data={"ixc25_ms": ["csrc/*.cc", "csrc/*.h", "default_model/*"]},
    install_requires=[
        "mindspore==2.10.0",
        "numpy==1.26.4",
        "sentencepiece==0.2.3",
        "safetensors==0.8.0",
        "pillow==13.0.0",
        "tqdm==4.70.1",
        "av==18.1.0",
    ],
    extras_require={
        # torch always pinned: an unpinned torch pulls several GB of CUDA
        "test": ["torch==2.13.0", "pytest==9.2.0"],
    },
    entry_points={
        "console_scripts": [
            "ixc25-demo=scripts.demo:main",
            "ixc25-chat=scripts.chat_cli:main",
            "ixc25-convert=converters.cli:main",
            "ixc25-parity=ixc25_ms.parity.cli:main",
            "ixc25-bench=scripts.bench:main",
            "ixc25-finetune=ixc25_ms.train.cli:main",
            "ixc25-merge=ixc25_ms.train.merge:main",
            "ixc25-tower-warmup=ixc25_ms.train.tower_warmup:main",
            "ixc25-eval=ixc25_ms.eval:main",
        ]
    },
)
