"""Lazy imports of optional dependencies with errors that name the pip extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> (pip extra of vpl-plugin, the distribution that provides it)
_EXTRAS = {
    "clip": ("clip", "clip-anytorch"),  # OpenAI's code; the PyPI name `clip` is another package
    "pydensecrf": ("crf", "pydensecrf2"),
    "pydensecrf.densecrf": ("crf", "pydensecrf2"),
    "pydensecrf.utils": ("crf", "pydensecrf2"),
    "cv2": ("crf", "opencv-python-headless"),
    "PIL": ("data", "pillow"),
    "PIL.Image": ("data", "pillow"),
    "matplotlib": ("viz", "matplotlib"),
    "matplotlib.pyplot": ("viz", "matplotlib"),
    "yaml": ("cli", "pyyaml"),
    "tqdm": ("cli", "tqdm"),
    "timm": ("decoder", "timm"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which extra installs it.

    Example:
        >>> cv2 = require("cv2")  # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra, dist = _EXTRAS.get(module) or _EXTRAS.get(top) or (None, top)
        hint = f"pip install 'vpl-plugin[{extra}]'" if extra else f"pip install {dist}"
        raise ImportError(
            f"vpl-plugin needs the optional package '{dist}' (import name '{module}') for this "
            f"feature, and it is not installed ({err}). Install it with: {hint}"
        ) from err
