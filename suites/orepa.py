"""OREPA (Hu et al., CVPR 2022): the tables of ../shared/papers/orepa-cvpr2022.md, values as printed."""

from .base import PaperValue, Row, Table

PAPER = "orepa"
_T4 = "OREPA Table 4"


def _row(group, rep, acc, mem, time, arch, variant=None, source=_T4):
    where = f"{source}, {group} / {rep}"
    return Row(name=f"{group}/{rep}", arch=arch, rep=rep.lower().replace("-", "_") if rep != "None" else "none",
               variant=variant, group=group,
               paper={"top1": PaperValue(acc, where), "train_memory": PaperValue(mem, where),
                      "time_per_batch": PaperValue(time, where)})


def _orepa_vgg(row: Row) -> Row:
    # Table 4 labels OREPA-VGG rows "OREPA"; the block is OREPA-VGG (OREPA 3x3 + RepVGG's 1x1 and identity).
    return Row(row.name, row.arch, "orepa_vgg", row.variant, row.group, row.paper)


TABLE4 = Table(
    paper=PAPER, name="table4",
    title="Comparison with other re-parameterization models (ImageNet, 120 epochs)",
    metrics=("top1", "train_memory", "time_per_batch"),
    rows=(
        _row("ResNet-18", "None", "71.21", "4.2G", "0.086s", "resnet18"),
        _row("ResNet-18", "DBB", "71.77", "7.5G", "0.241s", "resnet18"),
        _row("ResNet-18", "OREPA", "72.13", "5.2G", "0.120s", "resnet18"),
        _row("ResNet-34", "None", "74.13", "5.2G", "0.116s", "resnet34"),
        _row("ResNet-34", "DBB", "74.83", "11.1G", "0.424s", "resnet34"),
        _row("ResNet-34", "OREPA", "75.04", "6.7G", "0.182s", "resnet34"),
        _row("ResNet-50", "None", "76.70", "10.3G", "0.204s", "resnet50"),
        _row("ResNet-50", "DBB", "76.89", "13.7G", "0.380s", "resnet50"),
        _row("ResNet-50", "OREPA", "77.31", "11.2G", "0.252s", "resnet50"),
        _row("ResNet-101", "None", "77.71", "14.5G", "0.382s", "resnet101"),
        _row("ResNet-101", "DBB", "78.02", "19.7G", "0.641s", "resnet101"),
        _row("ResNet-101", "OREPA", "78.29", "16.1G", "0.445s", "resnet101"),
        _row("RepVGG-A0", "RepVGG", "72.41", "3.8G", "0.100s", "repvgg_a0"),
        _orepa_vgg(_row("RepVGG-A0", "OREPA", "73.04", "4.2G", "0.136s", "repvgg_a0")),
        _row("RepVGG-A1", "RepVGG", "74.46", "4.8G", "0.121s", "repvgg_a1"),
        _orepa_vgg(_row("RepVGG-A1", "OREPA", "74.85", "5.5G", "0.147s", "repvgg_a1")),
        _row("RepVGG-A2", "RepVGG", "76.48", "5.8G", "0.170s", "repvgg_a2"),
        _orepa_vgg(_row("RepVGG-A2", "OREPA", "76.72", "7.4G", "0.210s", "repvgg_a2")),
    ),
    baselines={"ResNet-18": "ResNet-18/None", "ResNet-34": "ResNet-34/None", "ResNet-50": "ResNet-50/None",
               "ResNet-101": "ResNet-101/None", "RepVGG-A0": "RepVGG-A0/RepVGG", "RepVGG-A1": "RepVGG-A1/RepVGG",
               "RepVGG-A2": "RepVGG-A2/RepVGG"},
)

TABLES = (TABLE4,)
