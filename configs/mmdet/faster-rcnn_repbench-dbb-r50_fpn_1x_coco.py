# Faster R-CNN R-50-FPN 1x (MMDetection's stock config) with a DBB-ResNet-50 backbone from repbench.
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
custom_imports = dict(imports=["backbones"], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type="repbench.ResNet", depth=50, rep="dbb", out_indices=(0, 1, 2, 3),
                  frozen_stages=1, norm_eval=True, freeze="paper", pretrained=None))
# freeze="paper": the stock freezing (mmdet: stem and layer1; mmseg: none), except OREPA's linear deep stem, trainable
# at lr x0.1 (OREPA supplement); freeze="fair": every stem trainable at lr x0.1 (backbones/mm.py, frozen_indices).
optim_wrapper = dict(constructor="repbench.StemLrConstructor")
