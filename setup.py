#!/usr/bin/env python
"""ocz_d2: object-centric zero-shot semantic segmentation on Detectron2.

This file imports nothing beyond setuptools: torch and Detectron2 are installed first
(see INSTALL.md), so a build of this package never needs them.
"""

from pathlib import Path

from setuptools import find_packages, setup

_version = {}
exec((Path(__file__).parent / "ocz_d2" / "version.py").read_text(), _version)

setup(
    name="ocz_d2",
    version=_version["__version__"],
    description="Object-centric zero-shot semantic segmentation (OC-ZSS) for Detectron2",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ocz_d2", "ocz_d2.*"]),
    package_data={"ocz_d2": ["data/splits/*.yaml", "modeling/backbone/clip_configs/*.json"]},
    python_requires=">=3.10",
    # torch, torchvision and detectron2 are deliberately not listed: pip would replace a working
    # CUDA/CPU build by another one. INSTALL.md says how to install them.
    install_requires=[
        "open_clip_torch>=2.24",
        "timm>=0.9",
        "scipy>=1.10",
        "numpy>=1.24",
        "pillow>=9",
        "opencv-python-headless>=4.8",
        "pyyaml>=6",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.5", "selenium>=4.20"],
        # the web page (tools/web_demo.py); requirements-web.txt has the tested versions
        "web": ["gradio>=6,<7", "gradio_client>=2"],
    },
)
