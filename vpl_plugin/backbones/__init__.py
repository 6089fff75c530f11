"""CLIP backbones: loading OpenAI checkpoints and the dense-token forward CLIP-ES uses."""

from vpl_plugin.backbones.clip import (
    CLIPDense,
    LastBlockOutput,
    Numerics,
    build_clip_from_state_dict,
    build_random_clip,
    load_clip,
    load_state_dict_file,
    numerics_for,
    resolve_exact_fp32,
    save_checkpoint,
)

__all__ = [
    "CLIPDense",
    "LastBlockOutput",
    "Numerics",
    "build_clip_from_state_dict",
    "build_random_clip",
    "load_clip",
    "load_state_dict_file",
    "numerics_for",
    "resolve_exact_fp32",
    "save_checkpoint",
]
