"""larvess: large-vocabulary semantic segmentation (ESS + LarvSeg)."""
