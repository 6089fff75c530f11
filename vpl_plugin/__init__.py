"""vpl-plugin: Vision Prototype Learning for CLIP-based weakly supervised semantic segmentation.

The core (prototype learning, metrics) needs only torch and numpy; CLIP, OpenCV, the dense CRF and
plotting are optional and imported where used.

Example:
    >>> import torch, vpl_plugin
    >>> x = torch.nn.functional.normalize(torch.randn(100, 8), dim=-1)
    >>> q = torch.softmax(torch.randn(100, 3), dim=-1)
    >>> w = vpl_plugin.learn_vision_prototypes(x, q, torch.eye(3, 8), iters=5)
    >>> w.shape
    torch.Size([3, 8])
"""

from vpl_plugin._version import __version__
from vpl_plugin.adapters import (
    CAMAdapter,
    CAMOutput,
    CLIPCPALAdapter,
    CLIPCPALConfig,
    CLIPESAdapter,
    CLIPESConfig,
    create_adapter,
    list_adapters,
)
from vpl_plugin.backbones import CLIPDense, build_random_clip, load_clip
from vpl_plugin.data.classes import COCO, VOC, ClassSpec
from vpl_plugin.adapters.cpal_bank import build_context_bank
from vpl_plugin.cpal import ContextBank
from vpl_plugin.dropin import (
    DropInPrototypes,
    check_imports,
    learn_vision_prototypes_for,
    use_logit_scale,
    vision_logit_scale,
)
from vpl_plugin.metrics import MeanIoU, confusion_matrix, evaluate_cams, evaluate_masks, mean_iou
from vpl_plugin.pipeline import collect_learning_set, generate_cams, learn_from_dataset
from vpl_plugin.prototypes import (
    PrototypeSet,
    build_targets,
    learn_vision_prototypes,
    modality_gap,
    seeds_from_cams,
    shift_text_prototypes,
)

__all__ = [
    "CAMAdapter",
    "CAMOutput",
    "CLIPCPALAdapter",
    "CLIPCPALConfig",
    "CLIPDense",
    "CLIPESAdapter",
    "CLIPESConfig",
    "COCO",
    "ClassSpec",
    "ContextBank",
    "DropInPrototypes",
    "MeanIoU",
    "PrototypeSet",
    "VOC",
    "__version__",
    "build_context_bank",
    "build_random_clip",
    "build_targets",
    "check_imports",
    "collect_learning_set",
    "confusion_matrix",
    "create_adapter",
    "evaluate_cams",
    "evaluate_masks",
    "generate_cams",
    "learn_from_dataset",
    "learn_vision_prototypes",
    "learn_vision_prototypes_for",
    "list_adapters",
    "load_clip",
    "mean_iou",
    "modality_gap",
    "seeds_from_cams",
    "shift_text_prototypes",
    "use_logit_scale",
    "vision_logit_scale",
]
