# Cascade Mask R-CNN R-50-FPN 1x (MMDetection's stock config) with a RepOpt-VGG-B1 / RepVGG-B1 backbone from repbench
# (RepOptimizers Table 7). RepVGG-B1's stages give 128, 256, 512 and 2048 channels: the FPN takes those.
# The downstream optimizer is the stock SGD for both rows: the paper does not say whether the RepOptimizer was used
# downstream; repbench's choice, recorded with every run (the RepOpt-VGG target trains as the plain net it is).
_base_ = "mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py"
custom_imports = dict(imports=["backbones"], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type="repbench.RepVGG", arch="repoptvgg_b1", rep="repopt", out_indices=(0, 1, 2, 3),
                  frozen_stages=1, norm_eval=True, freeze="paper", pretrained=None),
    neck=dict(in_channels=[128, 256, 512, 2048]))
optim_wrapper = dict(constructor="repbench.StemLrConstructor")
