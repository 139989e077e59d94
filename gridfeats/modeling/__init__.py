from gridfeats.modeling.detector import GeneralizedRCNN, postprocess

__all__ = ["GeneralizedRCNN", "postprocess"]
