from gridfeats.checkpoint.caffe2_names import convert_caffe2_name, convert_caffe2_state_dict
from gridfeats.checkpoint.loader import (
    BACKBONE_PREFIXES,
    CheckpointError,
    LoadReport,
    check_complete,
    load_checkpoint,
    load_state,
    match_by_suffix,
    read_checkpoint,
    sha256_file,
)

__all__ = [
    "BACKBONE_PREFIXES",
    "CheckpointError",
    "LoadReport",
    "check_complete",
    "convert_caffe2_name",
    "convert_caffe2_state_dict",
    "load_checkpoint",
    "load_state",
    "match_by_suffix",
    "read_checkpoint",
    "sha256_file",
]
