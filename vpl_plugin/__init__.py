"""vpl-plugin: Vision Prototype Learning for CLIP-based weakly supervised semantic segmentation."""

from vpl_plugin._version import __version__

__all__ = ["__version__"]
