"""Detectron2's default config as of commit ffff8ac (v0.1.1, 2020-04-01), plus grid-feats' keys.

Why a frozen copy of an old default set: the grid-feats-vqa checkpoints were trained with
Detectron2@ffff8ac, and yacs merges a YAML *into* the defaults, so every default value and its
Python type (tuple vs list: yacs converts a merged value to the default's type) shapes the
effective config. ``cfg.dump()`` of a config built here must equal the reference dump key by key,
so nothing may be added, removed or retyped; keys that later Detectron2 versions introduced are
dropped on load instead (see ``gridfeats.config.newer_keys``).

Values were taken from the reference effective dump (docs/detectron2-facts.md Appendix A) with the
grid-feats YAML settings undone, and cross-checked against Detectron2's source of that era.
Comments say what a key controls only where the name does not.
"""

from __future__ import annotations

from gridfeats.config.node import CfgNode as CN

_C = CN()

#: Config nodes (and leaf keys) gridfeats adds to Detectron2@ffff8ac's: backbones it does not have,
#: the grid-extraction rule, the image root of json datasets and rank-invariant DDP training. They
#: hold only gridfeats' settings, so every Detectron2 key keeps its reference default; dumps carry
#: them, and comparisons with the reference dump leave exactly these out.
GRIDFEATS_NODES = (
    "MODEL.VIT",
    "MODEL.HF",
    "MODEL.GRID",
    "DATASETS.IMAGE_ROOT",
    "SOLVER.RANK_INVARIANT",
)


def is_gridfeats_key(name: str) -> bool:
    """Whether the dotted key ``name`` is gridfeats' own (in or equal to a ``GRIDFEATS_NODES``
    entry) rather than Detectron2's."""
    return any(name == node or name.startswith(node + ".") for node in GRIDFEATS_NODES)


# Config schema version; v2 files merge without any upgrade step.
_C.VERSION = 2

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.LOAD_PROPOSALS = False
_C.MODEL.MASK_ON = False
_C.MODEL.KEYPOINT_ON = False
_C.MODEL.DEVICE = "cuda"
_C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
# Checkpoint path or URL-like name (detectron2://, catalog://) to initialise from.
_C.MODEL.WEIGHTS = ""
# Per-channel normalisation in INPUT.FORMAT order (BGR). MSRA/Detectron1 weights fold the std
# into conv1, hence std 1.
_C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
_C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]

# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------
_C.INPUT = CN()
# Train short side: picked from the tuple ("choice") or sampled in [min, max] ("range").
_C.INPUT.MIN_SIZE_TRAIN = (800,)
_C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
_C.INPUT.MAX_SIZE_TRAIN = 1333
# Test short side (0 disables resizing) and long-side cap.
_C.INPUT.MIN_SIZE_TEST = 800
_C.INPUT.MAX_SIZE_TEST = 1333
_C.INPUT.CROP = CN({"ENABLED": False})
_C.INPUT.CROP.TYPE = "relative_range"
_C.INPUT.CROP.SIZE = [0.9, 0.9]
# Channel order the model expects; "BGR" is PIL RGB flipped.
_C.INPUT.FORMAT = "BGR"
_C.INPUT.MASK_FORMAT = "polygon"

# ---------------------------------------------------------------------------------------------
# Datasets and loader
# ---------------------------------------------------------------------------------------------
_C.DATASETS = CN()
_C.DATASETS.TRAIN = ()
_C.DATASETS.PROPOSAL_FILES_TRAIN = ()
_C.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = 2000
_C.DATASETS.TEST = ()
_C.DATASETS.PROPOSAL_FILES_TEST = ()
_C.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = 1000
# gridfeats: the folder the json files' ``file_name`` entries are relative to, for every TRAIN and
# TEST json. "" = ROOT/images beside ROOT/annotations/NAME.json (grid-feats-vqa's and
# make-synthetic's layout). Relative paths resolve against the working directory.
_C.DATASETS.IMAGE_ROOT = ""

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 4
# Batch landscape and portrait images separately.
_C.DATALOADER.ASPECT_RATIO_GROUPING = True
_C.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
_C.DATALOADER.REPEAT_THRESHOLD = 0.0
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

# ---------------------------------------------------------------------------------------------
# Backbone, FPN, proposal generator, anchors
# ---------------------------------------------------------------------------------------------
_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
# Number of leading stages (stem = 1) whose parameters are frozen.
_C.MODEL.BACKBONE.FREEZE_AT = 2

_C.MODEL.FPN = CN()
_C.MODEL.FPN.IN_FEATURES = []
_C.MODEL.FPN.OUT_CHANNELS = 256
_C.MODEL.FPN.NORM = ""
_C.MODEL.FPN.FUSE_TYPE = "sum"

_C.MODEL.PROPOSAL_GENERATOR = CN()
_C.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
_C.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = 0

_C.MODEL.ANCHOR_GENERATOR = CN()
_C.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
# One inner list per feature map (or a single list shared by all); ratios are h/w.
_C.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
_C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
_C.MODEL.ANCHOR_GENERATOR.ANGLES = [[-90, 0, 90]]
# Anchor centre offset in units of the feature stride (0.0 = cell top-left corner).
_C.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0

# ---------------------------------------------------------------------------------------------
# RPN
# ---------------------------------------------------------------------------------------------
_C.MODEL.RPN = CN()
_C.MODEL.RPN.HEAD_NAME = "StandardRPNHead"
_C.MODEL.RPN.IN_FEATURES = ["res4"]
# Drop training anchors reaching this many pixels outside the image; -1 keeps all.
_C.MODEL.RPN.BOUNDARY_THRESH = -1
_C.MODEL.RPN.IOU_THRESHOLDS = [0.3, 0.7]
_C.MODEL.RPN.IOU_LABELS = [0, -1, 1]
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5
_C.MODEL.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
_C.MODEL.RPN.SMOOTH_L1_BETA = 0.0
_C.MODEL.RPN.LOSS_WEIGHT = 1.0
# Per-image top-k before and after NMS.
_C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 12000
_C.MODEL.RPN.PRE_NMS_TOPK_TEST = 6000
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2000
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
_C.MODEL.RPN.NMS_THRESH = 0.7

# ---------------------------------------------------------------------------------------------
# ROI heads
# ---------------------------------------------------------------------------------------------
_C.MODEL.ROI_HEADS = CN()
_C.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
# Foreground classes only; background is the extra last logit.
_C.MODEL.ROI_HEADS.NUM_CLASSES = 80
_C.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
_C.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.5]
_C.MODEL.ROI_HEADS.IOU_LABELS = [0, 1]
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
_C.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True

_C.MODEL.ROI_BOX_HEAD = CN()
# Empty for C4 models, whose box head is the res5 stage.
_C.MODEL.ROI_BOX_HEAD.NAME = ""
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
_C.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0
_C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
# 0 = adaptive: ceil(roi_size / bin_size) samples per bin.
_C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
_C.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
_C.MODEL.ROI_BOX_HEAD.NUM_FC = 0
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
_C.MODEL.ROI_BOX_HEAD.NUM_CONV = 0
_C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
_C.MODEL.ROI_BOX_HEAD.NORM = ""
_C.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
_C.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES = False

_C.MODEL.ROI_BOX_CASCADE_HEAD = CN()
_C.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS = (
    (10.0, 10.0, 5.0, 5.0),
    (20.0, 20.0, 10.0, 10.0),
    (30.0, 30.0, 15.0, 15.0),
)
_C.MODEL.ROI_BOX_CASCADE_HEAD.IOUS = (0.5, 0.6, 0.7)

_C.MODEL.ROI_MASK_HEAD = CN()
_C.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
_C.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
_C.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 0
_C.MODEL.ROI_MASK_HEAD.NUM_CONV = 0
_C.MODEL.ROI_MASK_HEAD.CONV_DIM = 256
_C.MODEL.ROI_MASK_HEAD.NORM = ""
_C.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = False
_C.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlignV2"

_C.MODEL.ROI_KEYPOINT_HEAD = CN()
_C.MODEL.ROI_KEYPOINT_HEAD.NAME = "KRCNNConvDeconvUpsampleHead"
_C.MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION = 14
_C.MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO = 0
_C.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = (512,) * 8
_C.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = 17
_C.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE = 1
_C.MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS = True
_C.MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT = 1.0
_C.MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE = "ROIAlignV2"

# ---------------------------------------------------------------------------------------------
# Segmentation, panoptic, RetinaNet (unused by grid-feats, kept so dumps round-trip)
# ---------------------------------------------------------------------------------------------
_C.MODEL.SEM_SEG_HEAD = CN()
_C.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
_C.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
_C.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
_C.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 54
_C.MODEL.SEM_SEG_HEAD.CONVS_DIM = 128
_C.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
_C.MODEL.SEM_SEG_HEAD.NORM = "GN"
_C.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT = 1.0

_C.MODEL.PANOPTIC_FPN = CN()
_C.MODEL.PANOPTIC_FPN.INSTANCE_LOSS_WEIGHT = 1.0
_C.MODEL.PANOPTIC_FPN.COMBINE = CN({"ENABLED": True})
_C.MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH = 0.5
_C.MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT = 4096
_C.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = 0.5

_C.MODEL.RETINANET = CN()
_C.MODEL.RETINANET.NUM_CLASSES = 80
_C.MODEL.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
_C.MODEL.RETINANET.NUM_CONVS = 4
_C.MODEL.RETINANET.IOU_THRESHOLDS = [0.4, 0.5]
_C.MODEL.RETINANET.IOU_LABELS = [0, -1, 1]
_C.MODEL.RETINANET.PRIOR_PROB = 0.01
_C.MODEL.RETINANET.SCORE_THRESH_TEST = 0.05
_C.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 1000
_C.MODEL.RETINANET.NMS_THRESH_TEST = 0.5
_C.MODEL.RETINANET.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
_C.MODEL.RETINANET.FOCAL_LOSS_GAMMA = 2.0
_C.MODEL.RETINANET.FOCAL_LOSS_ALPHA = 0.25
_C.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA = 0.1

# ---------------------------------------------------------------------------------------------
# ResNet / ResNeXt (backbone stages and the C4 res5 head)
# ---------------------------------------------------------------------------------------------
_C.MODEL.RESNETS = CN()
_C.MODEL.RESNETS.DEPTH = 50
_C.MODEL.RESNETS.OUT_FEATURES = ["res4"]
# 1 = ResNet, > 1 = ResNeXt.
_C.MODEL.RESNETS.NUM_GROUPS = 1
_C.MODEL.RESNETS.NORM = "FrozenBN"
_C.MODEL.RESNETS.WIDTH_PER_GROUP = 64
# Stride on the 1x1 conv (MSRA ResNets) rather than the 3x3 (Caffe2/FAIR and torch models).
_C.MODEL.RESNETS.STRIDE_IN_1X1 = True
_C.MODEL.RESNETS.RES5_DILATION = 1
_C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
_C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
# Deformable 3x3 convs per stage res2..res5; modulated = DCNv2, else DCNv1.
_C.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, False, False]
_C.MODEL.RESNETS.DEFORM_MODULATED = False
_C.MODEL.RESNETS.DEFORM_NUM_GROUPS = 1

# ---------------------------------------------------------------------------------------------
# ViT and Hugging Face backbones (gridfeats; not in Detectron2). Written by
# `gridfeats convert-backbone` for MoCo v3 / MAE / DINO / HF sources, see docs/backbones.md.
# Listed in GRIDFEATS_NODES: every other key is Detectron2@ffff8ac's.
# ---------------------------------------------------------------------------------------------
_C.MODEL.VIT = CN()
_C.MODEL.VIT.PATCH_SIZE = 16
_C.MODEL.VIT.EMBED_DIM = 768
_C.MODEL.VIT.DEPTH = 12
# Not readable from the weights (qkv is [3D, D] for any count): MoCo v3 ViT-S 12, DINO ViT-S 6.
_C.MODEL.VIT.NUM_HEADS = 12
_C.MODEL.VIT.MLP_RATIO = 4.0
_C.MODEL.VIT.QKV_BIAS = True
_C.MODEL.VIT.LN_EPS = 1e-6
# Side of the square patch grid the stored position table was made for (224 / 16 = 14).
_C.MODEL.VIT.PRETRAIN_GRID = 14
# Stored table: "learned" (DINO), "sincos-rows-first" (MoCo v3), "sincos-cols-first" (MAE).
_C.MODEL.VIT.POS_EMBED = "learned"
# Resize rule for other grids: "dino" (scale_factor + 0.1), "bicubic" (size-based,
# align_corners False: MAE fine-tuning, ViTDet), "sincos" (recompute the fixed table).
_C.MODEL.VIT.POS_INTERP = "bicubic"
_C.MODEL.VIT.DROP_PATH_RATE = 0.0

# Grid features (gridfeats). RES5_DILATION: the res5 dilation ResNet grids are read with.
# 1 = grid-feats-vqa's extract_grid_feature.py (stride-32 C5 map, even for a detector trained with
# RES5_DILATION 2); 2 = the dilated stride-16 map the detector itself was trained on (what a small
# detector trained briefly from scratch needs: its weights never saw res5 run undilated).
_C.MODEL.GRID = CN()
_C.MODEL.GRID.RES5_DILATION = 1

_C.MODEL.HF = CN()
# A transformers class: ViTModel, ViTMAEModel, Dinov2Model, Dinov2WithRegistersModel,
# CLIPVisionModel or SiglipVisionModel.
_C.MODEL.HF.MODEL_CLASS = "ViTModel"
# The vision model's config.json as a mapping (any keys; the weights come from MODEL.WEIGHTS).
_C.MODEL.HF.CONFIG = CN(new_allowed=True)

# ---------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
_C.SOLVER.MAX_ITER = 40000
_C.SOLVER.BASE_LR = 0.001
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.WEIGHT_DECAY = 0.0001
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.STEPS = (30000,)
_C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
_C.SOLVER.WARMUP_ITERS = 1000
_C.SOLVER.WARMUP_METHOD = "linear"
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# Images per iteration summed over all workers.
_C.SOLVER.IMS_PER_BATCH = 16
_C.SOLVER.BIAS_LR_FACTOR = 1.0
_C.SOLVER.WEIGHT_DECAY_BIAS = _C.SOLVER.WEIGHT_DECAY
_C.SOLVER.CLIP_GRADIENTS = CN({"ENABLED": False})
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
# gridfeats (listed in GRIDFEATS_NODES). False: Detectron2's behaviour, each rank normalises its
# losses over its own images and samples with its own RNG. True: N torchrun ranks train like one
# process with the same global batch (equal weights up to float rounding): every image's anchors
# and proposals are sampled from a generator seeded from (SEED, its global stream position), and
# loss_cls / loss_box_reg / loss_attr are normalised by counts summed over all ranks. Only exact
# with FrozenBN or no norm (not BN's batch statistics), images of one size within a batch (padding
# changes the border features) and DATALOADER.ASPECT_RATIO_GROUPING False (refused otherwise under
# more than one rank: the buckets are per rank).
_C.SOLVER.RANK_INVARIANT = False

# ---------------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.EXPECTED_RESULTS = []
# Evaluate every this many iterations during training; 0 = only at the end.
_C.TEST.EVAL_PERIOD = 0
_C.TEST.KEYPOINT_OKS_SIGMAS = []
_C.TEST.DETECTIONS_PER_IMAGE = 100
_C.TEST.AUG = CN({"ENABLED": False})
_C.TEST.AUG.MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
_C.TEST.AUG.MAX_SIZE = 4000
_C.TEST.AUG.FLIP = True
_C.TEST.PRECISE_BN = CN({"ENABLED": False})
_C.TEST.PRECISE_BN.NUM_ITER = 200

# ---------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------
_C.OUTPUT_DIR = "./output"
# Negative = a fresh random seed per run.
_C.SEED = -1
_C.CUDNN_BENCHMARK = False
_C.VIS_PERIOD = 0
# Scratch space for quick experiments; never read by gridfeats.
_C.GLOBAL = CN()
_C.GLOBAL.HACK = 1.0


def add_attribute_config(cfg: CN) -> CN:
    """Add grid-feats-vqa's attribute-head keys to ``cfg`` (in place) and return it.

    The grid-feats YAMLs set ``MODEL.ATTRIBUTE_ON``, so these keys must exist before a YAML is
    merged, or the merge fails with "Non-existent config key". Values are grid-feats' HEAD.
    """
    # Build the attribute predictor and its loss.
    cfg.MODEL.ATTRIBUTE_ON = False
    # Width of the per-instance attribute label row (padding = -1).
    cfg.INPUT.MAX_ATTR_PER_INS = 16
    cfg.MODEL.ROI_ATTRIBUTE_HEAD = CN()
    # Class-embedding size concatenated with the box feature to predict attributes.
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM = 256
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM = 512
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.LOSS_WEIGHT = 0.2
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES = 400
    # Multipliers on loss_rpn_loc / loss_box_reg, applied by the training step.
    cfg.MODEL.RPN.BBOX_LOSS_WEIGHT = 1.0
    cfg.MODEL.ROI_BOX_HEAD.BBOX_LOSS_WEIGHT = 1.0
    return cfg


def detectron2_defaults() -> CN:
    """A fresh, mutable copy of the pure Detectron2@ffff8ac defaults (no attribute keys)."""
    return _C.clone()
