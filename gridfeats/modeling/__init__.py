from gridfeats.modeling.build import build_model
from gridfeats.modeling.meta_arch import GeneralizedRCNN
from gridfeats.modeling.postprocessing import detector_postprocess

__all__ = ["GeneralizedRCNN", "build_model", "detector_postprocess"]
