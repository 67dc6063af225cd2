# Faster R-CNN R-50-FPN 1x (MMDetection's stock config) with an OREPA-ResNet-50 backbone from repbench.
# OREPA's supplement: the linear deep stem is not frozen, its learning rate is divided by 10.
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
custom_imports = dict(imports=["backbones"], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type="repbench.ResNet", depth=50, rep="orepa", out_indices=(0, 1, 2, 3),
                  frozen_stages=-1, norm_eval=True, pretrained=None))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={"backbone.net.stem": dict(lr_mult=0.1)}))
