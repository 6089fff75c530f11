"""Packaging for vpl-plugin (tool configuration lives in pyproject.toml)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "vpl_plugin" / "_version.py").read_text()).group(1)

EXTRAS = {
    # OpenAI's CLIP code (import name `clip`); its pkg_resources import needs setuptools < 81.
    "clip": ["clip-anytorch>=2.5", "setuptools<81"],
    # Dense CRF, contours and resizing (CAM refinement and pseudo masks).
    "crf": ["pydensecrf2>=1.0", "opencv-python-headless>=4.5"],
    "data": ["pillow>=9"],
    "cli": ["tqdm>=4.60", "pyyaml>=5.4"],
    "viz": ["matplotlib>=3.5"],
    "decoder": ["timm>=0.9"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
# scipy: reference computations in the tests only; ruff and mypy: the checks in .ci/run.
EXTRAS["dev"] = EXTRAS["all"] + ["pytest>=7", "scipy>=1.8", "ruff>=0.5", "mypy>=1.10"]

setup(
    name="vpl-plugin",
    version=VERSION,
    description=(
        "Vision Prototype Learning (VPL, AAAI 2025) as a plug-in for CLIP-based weakly supervised "
        "semantic segmentation pipelines (CLIP-ES, CLIP-CPAL)."
    ),
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["vpl_plugin", "vpl_plugin.*"]),
    package_data={"vpl_plugin": ["py.typed", "demo/assets/*.pt", "demo/assets/*.json"]},
    install_requires=["torch>=2.0", "numpy>=1.22"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["vpl=vpl_plugin.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
