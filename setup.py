from setuptools import find_packages, setup

setup(
    name="ddpm_ms",
    version="0.1.0",
    description="Denoising Diffusion Probabilistic Models in MindSpore (Ascend, GPU, CPU)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ddpm_ms", "ddpm_ms.*"]),
    package_data={"ddpm_ms.kernels": ["*.cc", "*.h"]},  # C++ sources, compiled on first use
    python_requires=">=3.9,<3.13",
    install_requires=[
        "mindspore>=2.3",
        "download",
        "numpy<2",  # MindSpore 2.10 is built against NumPy 1.x (Tensor ops fail under NumPy 2)
        "matplotlib",
        "tqdm",
        "pyyaml",
        # OpenBLAS (AVX-512 aware) for the CPU convolution kernels; optional at run time
        'scipy-openblas32>=0.3.28; platform_system == "Linux"',
    ],
    extras_require={
        "test": ["pytest", "nbclient", "nbformat", "ipykernel"],
        "bench": ["torch==2.13.0"],
    },
    entry_points={
        "console_scripts": [
            "ddpm-train=ddpm_ms.train:console_main",
            "ddpm-sample=ddpm_ms.sample:console_main",
            "ddpm-gif=ddpm_ms.gif:console_main",
            "ddpm-figures=ddpm_ms.figures:console_main",
            "ddpm-evaluate=ddpm_ms.evaluate:console_main",
        ]
    },
)
