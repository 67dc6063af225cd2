# UperNet 40k Cityscapes (MMSegmentation's stock config) with a RepOpt-VGG-B1 / RepVGG-B1 backbone from repbench
# (RepOptimizers Table 7), undilated as the stock UperNet. Stages of 128, 256, 512 and 2048 channels; the auxiliary
# FCN head reads the third (512). Downstream optimizer: the stock SGD for both rows (the paper does not say; see the
# detection config).
_base_ = "mmseg::upernet/upernet_r50_4xb2-40k_cityscapes-512x1024.py"
custom_imports = dict(imports=["backbones"], allow_failed_imports=False)
model = dict(
    pretrained=None,
    backbone=dict(_delete_=True, type="repbench.RepVGG", arch="repoptvgg_b1", rep="repopt", out_indices=(0, 1, 2, 3),
                  norm_eval=False, freeze="paper", pretrained=None),
    decode_head=dict(in_channels=[128, 256, 512, 2048]),
    auxiliary_head=dict(in_channels=512))
optim_wrapper = dict(constructor="repbench.StemLrConstructor")
