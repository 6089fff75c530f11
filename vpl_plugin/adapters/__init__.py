"""Pipeline adapters: each wraps one CLIP-based WSSS pipeline behind :class:`CAMAdapter`."""

from vpl_plugin.adapters.base import CAMAdapter, CAMOutput, create_adapter, list_adapters, register_adapter
from vpl_plugin.adapters.clip_es import CLIPESAdapter, CLIPESConfig, text_prototype_set
from vpl_plugin.adapters.clip_cpal import CLIPCPALAdapter, CLIPCPALConfig

__all__ = [
    "CAMAdapter",
    "CAMOutput",
    "CLIPCPALAdapter",
    "CLIPCPALConfig",
    "CLIPESAdapter",
    "CLIPESConfig",
    "create_adapter",
    "list_adapters",
    "register_adapter",
    "text_prototype_set",
]
