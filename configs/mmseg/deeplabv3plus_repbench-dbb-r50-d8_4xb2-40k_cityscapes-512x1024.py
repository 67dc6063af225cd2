# DeepLabV3+ R-50-D8 40k Cityscapes (MMSegmentation's stock config) with a DBB-ResNet-50 backbone from
# repbench, dilated as D8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4).
_base_ = "mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py"
custom_imports = dict(imports=["backbones"], allow_failed_imports=False)
model = dict(
    pretrained=None,
    backbone=dict(_delete_=True, type="repbench.ResNet", depth=50, rep="dbb", strides=(1, 2, 1, 1),
                  dilations=(1, 1, 2, 4), out_indices=(0, 1, 2, 3), norm_eval=False, freeze="paper", pretrained=None))
# freeze="paper": the stock freezing (mmdet: stem and layer1; mmseg: none), except OREPA's linear deep stem, trainable
# at lr x0.1 (OREPA supplement); freeze="fair": every stem trainable at lr x0.1 (backbones/mm.py, frozen_indices).
optim_wrapper = dict(constructor="repbench.StemLrConstructor")
