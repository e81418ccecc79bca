from setuptools import find_packages, setup

# The YAML files stay in the top-level configs/ directory and are installed as the data files of
# ddpm_ms.configs, a package that package_dir maps onto configs/ (so load_config("quick") works
# after a non-editable install). configs/ needs no __init__.py: a package listed explicitly in
# `packages` is built from its directory whether or not it has one, and at run time
# ddpm_ms/configs/ is only read as a directory (ddpm_ms.config.packaged_config_dir), never imported.
CONFIGS_PACKAGE = "ddpm_ms.configs"

setup(
    name="ddpm_ms",
    version="0.1.0",
    description="Denoising Diffusion Probabilistic Models in MindSpore (Ascend, GPU, CPU)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ddpm_ms", "ddpm_ms.*"]) + [CONFIGS_PACKAGE],
    package_dir={CONFIGS_PACKAGE: "configs"},
    package_data={
        "ddpm_ms.models.kernels": ["*.cc", "*.h"],  # C++ sources, compiled on first use
        CONFIGS_PACKAGE: ["*.yaml"],
    },
    python_requires=">=3.9,<3.13",
    install_requires=[
        # >=2.5: mindspore.set_device / get_current_device and mindspore.device_context (ddpm_ms.utils.device)
        # appear in 2.5. <2.11: 2.10 is the only version tested; raise the cap once a newer one is.
        "mindspore>=2.5,<2.11",
        "download",
        "numpy<2",  # MindSpore 2.10 is built against NumPy 1.x (Tensor ops fail under NumPy 2)
        "matplotlib",
        "pillow",  # image folders are decoded with PIL (matplotlib needs it too)
        "tqdm",
        "pyyaml",
        # OpenBLAS (AVX-512 aware) for the CPU convolution kernels; optional at run time
        'scipy-openblas32>=0.3.28; platform_system == "Linux"',
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "ruff", "nbclient", "nbformat", "ipykernel", "diffusers", "safetensors",
                 "onnx<1.19", "onnxruntime<1.23",  # newer ones need NumPy 2 (ml_dtypes), which breaks MindSpore 2.10
                 "tensorboardX", "tensorboard"],
        # log_tensorboard: the event-file writer, and the viewer (whose event reader the tests use)
        "tensorboard": ["tensorboardX", "tensorboard"],
        "onnx": ["onnxruntime<1.23"],  # ddpm-sample --exported FILE.onnx
        # ddpm-convert: diffusers folders <-> checkpoints (safetensors via NumPy; .bin files also need torch)
        "convert": ["safetensors"],
        "bench": ["torch==2.13.0"],
    },
    entry_points={
        "console_scripts": [
            "ddpm-train=ddpm_ms.train:console_main",
            "ddpm-sample=ddpm_ms.sample:console_main",
            "ddpm-gif=ddpm_ms.gif:console_main",
            "ddpm-figures=ddpm_ms.figures:console_main",
            "ddpm-evaluate=ddpm_ms.evaluate:console_main",
            "ddpm-export=ddpm_ms.export:console_main",
            "ddpm-convert=ddpm_ms.convert:console_main",
            "ddpm-inpaint=ddpm_ms.inpaint:console_main",
            "ddpm-img2img=ddpm_ms.img2img:console_main",
        ]
    },
)
