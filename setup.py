"""dsl-diffusion: Discrete Stochastic Localization for masked diffusion language models, Hugging Face-native.

The repository's top-level folders install as subpackages of one namespace, ``dsl_diffusion``
(``dsl_diffusion.modeling_dsl``, ``dsl_diffusion.trainer``, ...), never as bare top-level packages:
PyPI already has packages called ``trainer``, ``pipelines`` and ``evaluation``.
"""

from setuptools import setup

SUBPACKAGES = ["modeling_dsl", "trainer", "pipelines", "evaluation", "hub_cards"]

extras = {
    "train": ["deepspeed>=0.15", "peft>=0.13", "sacremoses>=0.1"],  # sacremoses detokenizes the Brown corpus
    "eval": ["evaluate>=0.4", "mauve-text>=0.4", "faiss-cpu", "scikit-learn", "matplotlib", "gguf>=0.10"],
    "test": ["pytest>=8", "scipy"],
}
extras["all"] = sorted({req for group in extras.values() for req in group})

setup(
    name="dsl-diffusion",
    version="0.1.0",
    description="Discrete Stochastic Localization (DSL) for masked diffusion language models on Hugging Face",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[f"dsl_diffusion.{name}" for name in SUBPACKAGES],
    package_dir={f"dsl_diffusion.{name}": name for name in SUBPACKAGES},
    package_data={
        "dsl_diffusion.trainer": ["ds_configs/*.json"],
        "dsl_diffusion.hub_cards": ["templates/*.md"],
        "dsl_diffusion.evaluation": ["evaluate_modules/*/*.py"],
    },
    # torch is deliberately unpinned here: scripts/setup.sh installs the CPU wheel, GPU users bring their own.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24",  # the dataclass-style configs (`@strict` PreTrainedConfig) this code is tested with
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface-hub>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "tqdm",
    ],
    extras_require=extras,
    entry_points={
        "console_scripts": [
            "dsl-convert-mdlm=dsl_diffusion.modeling_dsl.convert_mdlm:main",
            "dsl-finetune=dsl_diffusion.trainer.finetune:main",
            "dsl-generate=dsl_diffusion.pipelines.generate:main",
            "dsl-evaluate=dsl_diffusion.evaluation.sweep:main",
            "dsl-push=dsl_diffusion.hub_cards.push:main",
            "dsl-demo=dsl_diffusion.evaluation.demo:main",
        ]
    },
)
