"""VPL phase 2: a segmentation decoder on a frozen CLIP encoder, trained with cross-entropy on the
phase-1 pseudo masks and regional semantic contrast (RSC) against the frozen vision prototypes
(``docs/vpl.md#phase-2-the-decoder``).

* :mod:`~vpl_plugin.phase2.losses`: :func:`masked_average_pool` (Eq. 12), :func:`rsc_loss` /
  :class:`RSCLoss` (Eq. 13), :func:`segmentation_logits`, :class:`Phase2Loss` (Eq. 14).
* :mod:`~vpl_plugin.phase2.backbones`: frozen per-block token-map encoders (OpenAI CLIP, timm).
* :mod:`~vpl_plugin.phase2.decoder`: :class:`PrototypeSegmenter`, save / load.
* :mod:`~vpl_plugin.phase2.segment`: multi-scale + flip inference, CRF, label PNGs.
* :mod:`~vpl_plugin.phase2.data` / :mod:`~vpl_plugin.phase2.train`: the pseudo-mask dataset with
  the paper's augmentation and :func:`train_segmenter` (SGD, poly, resumable, DDP under torchrun).

timm (``pip install 'vpl-plugin[decoder]'``) is needed to build the decoder; importing this
package does not need it.
"""

from vpl_plugin.phase2.backbones import (
    BACKBONE_FAMILIES,
    OpenAICLIPBackbone,
    TimmCLIPBackbone,
    backbone_from_description,
    create_backbone,
)
from vpl_plugin.phase2.data import PseudoMaskDataset
from vpl_plugin.phase2.decoder import (
    DecoderConfig,
    PrototypeSegmenter,
    SegmentationDecoder,
    build_segmenter,
    load_segmenter,
    read_segmenter_checkpoint,
    save_segmenter,
)
from vpl_plugin.phase2.losses import (
    IGNORE_INDEX,
    Phase2Loss,
    RSCLoss,
    masked_average_pool,
    rsc_from_similarity,
    rsc_loss,
    segmentation_logits,
)
from vpl_plugin.phase2.segment import (
    DEFAULT_SCALES,
    predict_probabilities,
    segment_dataset,
    segment_image,
)
from vpl_plugin.phase2.train import TrainConfig, evaluate_segmenter, train_segmenter

__all__ = [
    "BACKBONE_FAMILIES",
    "DEFAULT_SCALES",
    "DecoderConfig",
    "IGNORE_INDEX",
    "OpenAICLIPBackbone",
    "Phase2Loss",
    "PrototypeSegmenter",
    "PseudoMaskDataset",
    "RSCLoss",
    "SegmentationDecoder",
    "TimmCLIPBackbone",
    "TrainConfig",
    "backbone_from_description",
    "build_segmenter",
    "create_backbone",
    "evaluate_segmenter",
    "load_segmenter",
    "masked_average_pool",
    "predict_probabilities",
    "read_segmenter_checkpoint",
    "rsc_from_similarity",
    "rsc_loss",
    "save_segmenter",
    "segment_dataset",
    "segment_image",
    "segmentation_logits",
    "train_segmenter",
]
