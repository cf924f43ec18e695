"""MedicalNet-compatible 3D ResNets, the Med3D multi-head network, transfer heads and safe
weight loading. See ``resnet`` (architecture), ``weights`` (loading/export), ``med3d``
(multi-head pretraining model) and ``heads`` (transfer models, freezing, parameter groups)."""

from .heads import (
    ClassificationHead,
    ClassificationNet,
    build_model,
    build_transfer_model,
    encoder_parameters,
    freeze_encoder,
    head_parameters,
    param_groups,
    unfreeze_encoder,
)
from .med3d import HeadOutput, Med3DNet
from .resnet import (
    DEPTHS,
    ENCODER_ROOTS,
    BasicBlock,
    Bottleneck,
    DownsampleA,
    MedicalNetSegHead,
    ResNet3d,
    ResNet3dEncoder,
    default_shortcut_type,
    encoder_out_channels,
    resnet3d,
    resnet3d_encoder,
)
from .weights import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LoadReport,
    MedicalNetWeightsError,
    atomic_save,
    encoder_state_dict,
    infer_medicalnet_depth,
    load_medicalnet_weights,
    read_state_dict,
    save_encoder_medicalnet,
    save_encoder_safetensors,
    unwrap_model,
)

__all__ = [
    # architecture
    "DEPTHS", "ENCODER_ROOTS", "BasicBlock", "Bottleneck", "DownsampleA", "MedicalNetSegHead",
    "ResNet3d", "ResNet3dEncoder", "default_shortcut_type", "encoder_out_channels", "resnet3d",
    "resnet3d_encoder",
    # multi-head pretraining
    "HeadOutput", "Med3DNet",
    # transfer
    "ClassificationHead", "ClassificationNet", "build_model", "build_transfer_model",
    "encoder_parameters", "freeze_encoder", "head_parameters", "param_groups", "unfreeze_encoder",
    # weights
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "LoadReport", "MedicalNetWeightsError",
    "atomic_save", "encoder_state_dict", "infer_medicalnet_depth", "load_medicalnet_weights",
    "read_state_dict", "save_encoder_medicalnet", "save_encoder_safetensors", "unwrap_model",
]
