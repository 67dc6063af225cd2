"""RepNeXt (Li, Yang, He, Qi; ../shared/papers/repnext.md): its tables, values exactly as printed. The models are
backbones/repnext.py's (RepUnit 1/2/3, rRep and sRep deploy levels, the ConvNeXt chain of Table 5); every run's cost
probes measure each form of its model (Row.forms: train / rRep / rRep with Linear pointwise layers / sRep), in one
process, interleaved with its group's ConvNeXt. Tables 2-6 run (Table 6 cost-only, on the device's columns).

Cells printed as a chain "a ->r b ->s c" are split by form: ``*_train`` (the training form), the plain metric (rRep:
``params_deploy``, ``macs_deploy``, ``latency``, ``throughput``), ``throughput_linear`` (Table 4's bracket: rRep with
the pointwise convs as Linear layers) and ``*_srep`` (shortcut re-parameterized). Tables 2 and 3 print "a ->r b" for
the full re-parameterization, whose 52 M parameters are sRep's: their b is stored as sRep. Latencies are ms at batch
1 on an A100 (fp32) unless a column says otherwise; throughputs images/s at batch 128.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Ordering, PaperValue, Recipe, Row, Table

PAPER = "repnext"

# ImageNet (RepNeXt Sec. 4.1 and Table 4's caption): 450 epochs, global batch 1024 (8 x 128 here), AdamW at lr 1e-3,
# cosine with a 20-epoch linear warm-up, 224x224. "Typical training schemes, including data augmentation,
# regularization and EMA" are not named: the suite takes ConvNeXt's where it has them (weight decay 0.05, label
# smoothing 0.1, RandAugment magnitude 9) and applies neither Mixup / CutMix, random erasing nor EMA (recorded gaps).
# Smoke: plumbing (one step, every form measured at 32x32). Mini: the digits as ImageNet (5 epochs, 2 x 32, AdamW at
# 1e-3, 3 seeds); inference as the paper's: batch-1 latency and batch-128 throughput at 224x224, every form of a row
# interleaved with its group's ConvNeXt in one process.
_ADAMW = dict(adaptive_lr=1e-3, weight_decay=0.05, decay_1d=False)
IMAGENET = {
    "smoke": Recipe(dataset="synthetic", resolution=32, batch=2, devices=1, epochs=1, max_iters=1, checkpoints=False,
                    cost_batch=2, cost_resolution=32, cost_warmup=1, cost_steps=1, latency_batch=1,
                    throughput_batch=2, **_ADAMW),
    "mini": Recipe(dataset="digits", resolution=32, batch=32, devices=2, epochs=5, warmup_epochs=1.0, seeds=3,
                   cost_batch=8, cost_resolution=224, cost_warmup=2, cost_steps=5, latency_batch=1,
                   throughput_batch=128, **_ADAMW),
    "paper": Recipe(dataset="imagenet", resolution=224, batch=128, devices=8, epochs=450, warmup_epochs=20.0,
                    label_smoothing=0.1, randaugment=9, **_ADAMW),
}

_NOT_BUILT = "quoted, not run: not among the suite's architectures (and not built by torchvision)"
_FIXED_SIZE = ("quoted, not run: torchvision fixes its input size (position embeddings / attention windows) when it "
               "builds it, and a run trains and times one model at two resolutions (mini: 32 and 224)")
ARCHS = {  # printed model name -> (arch, rep, why a row is only quoted); "" where the suite builds it
    "ResNet50": ("resnet50", "none", ""), "ResNet101": ("resnet101", "none", ""),
    "ResNet152": ("resnet152", "none", ""),
    "ViT-B": ("vit_b_16", "none", _FIXED_SIZE), "MobileNetV3-S": ("mobilenet_v3_small", "none", ""),
    "MobileNetV3-L": ("mobilenet_v3_large", "none", ""),
    "EffNet-B3": ("efficientnet_b3", "none", ""), "EffNet-B4": ("efficientnet_b4", "none", ""),
    "EffNet-B5": ("efficientnet_b5", "none", ""),
    "DeiT-S": ("deit_s", "none", _NOT_BUILT), "DeiT-B": ("deit_b", "none", _NOT_BUILT),
    "RepVGG-B1": ("repvgg_b1", "repvgg", ""), "RepVGG-B2": ("repvgg_b2", "repvgg", ""),
    "RepLKNet-31B": ("replknet_31b", "replk", _NOT_BUILT), "RepGhost-2.0x": ("repghostnet_2.0x", "repghost", _NOT_BUILT),
    "MaxViT-T": ("maxvit_t", "none", _FIXED_SIZE), "Swin-T": ("swin_t", "none", ""),
    "Swin-S": ("swin_s", "none", ""), "Swin-B": ("swin_b", "none", ""),
    "ConvNeXt-T": ("convnext_t", "none", ""), "ConvNeXt-S": ("convnext_s", "none", ""),
    "ConvNeXt-B": ("convnext_b", "none", ""),
    "RepNeXt-u1-T": ("repnext_t", "repnext", ""), "RepNeXt-u2-T": ("repnext_t", "repnext", ""),
    "RepNeXt-u3-T": ("repnext_t", "repnext", ""), "RepNeXt-u3-S": ("repnext_s", "repnext", ""),
    "RepNeXt-u3-B": ("repnext_b", "repnext", ""),
    "Lc2pwconv-T": ("lc2pwconv_t", "none", ""), "Ln2bn-T": ("ln2bn_t", "none", ""),
    "Shortcut-act-T": ("shortcut_act_t", "none", ""), "Shortcut-act-S": ("shortcut_act_s", "none", ""),
    "Shortcut-act-B": ("shortcut_act_b", "none", ""),
    "RepNeXt-u3-T-rRep": ("repnext_t", "repnext", ""), "RepNeXt-u3-T-sRep": ("repnext_t", "repnext", ""),
}


def _forms(arch: str) -> tuple[str, ...]:
    """The forms measured beside the deployed one: RepNeXt's train / sRep / Linear-pointwise, Shortcut-act's train /
    sRep, the training form of any other re-parameterized network."""
    if arch.startswith("repnext"):
        return ("train", "srep", "linear")
    return ("train", "srep") if arch.startswith("shortcut_act") else ("train",)


def _row(source: str, name: str, group: str = "", **printed: str) -> Row:
    arch, rep, why = ARCHS[name]
    unit = name.split("-")[1] if name.startswith("RepNeXt-u") else None
    return Row(name, arch, rep, {"unit": unit} if unit else None, group,
               {metric: PaperValue(text, f"{source}, {name}") for metric, text in printed.items()}, declared=why,
               optimizer="adamw", forms=() if why else _forms(arch))


def _declared(name: str, title: str, source: str, metrics: tuple[str, ...], rows: tuple[Row, ...],
              notes: tuple[str, ...] = ()) -> Table:
    return Table(PAPER, name, f"{title} (declared; runner in a later issue)", source, metrics, rows, {},
                 paper_regime=None, notes=notes)


def _small(source: str, flops_unit: str, values) -> tuple[Row, ...]:
    """Tables 2 and 3: params (M), FLOPs, latency (ms), top-1; RepNeXt rows print "train ->r re-parameterized"."""
    rows = []
    for name, params, flops, latency, top1 in values:
        p, f, lat = (v.split("->") for v in (params, flops, latency))
        printed = dict(params_train=f"{p[0]} M", macs_train=f"{f[0]} {flops_unit}", latency_train=f"{lat[0]} ms",
                       top1=top1)
        if len(p) > 1:
            printed.update(params_srep=f"{p[1]} M", macs_srep=f"{f[1]} {flops_unit}", latency_srep=f"{lat[1]} ms")
        rows.append(_row(source, name, **printed))
    return tuple(rows)


# ImageWoof (Table 2) and CIFAR-100 at 64x64 (Table 3): the paper's captions (300 / 600 epochs, batch 512, lr 5e-4,
# AdamW, 20 warm-up epochs) with the ImageNet recipe's unnamed choices above. Smoke and mini as ImageNet's (the
# digits as ImageFolder / as CIFAR-100 pickles), the training-form and sRep latency at the table's resolution.
_FINE = dict(adaptive_lr=5e-4, weight_decay=0.05, decay_1d=False, warmup_epochs=20.0, label_smoothing=0.1,
             batch=128, devices=4)
_SMALL_MINI = dict(cost_resolution=224, throughput_batch=16)
WOOF = {"smoke": IMAGENET["smoke"], "mini": replace(IMAGENET["mini"], **_SMALL_MINI),
        "paper": Recipe(dataset="imagewoof", resolution=224, epochs=300, randaugment=9, **_FINE)}
CIFAR = {"smoke": replace(IMAGENET["smoke"], dataset="synthetic_cifar"),
         "mini": replace(IMAGENET["mini"], dataset="digits_cifar", **{**_SMALL_MINI, "cost_resolution": 64}),
         "paper": Recipe(dataset="cifar100", resolution=64, epochs=600, cost_resolution=64, **_FINE)}

_SMALL_METRICS = ("top1", "params_train", "params_srep", "macs_train", "macs_srep", "latency_train", "latency_srep")
_T2 = "RepNeXt Table 2"
TABLE2 = Table(
    PAPER, "table2", "ImageWoof (300 epochs, batch 512, lr 5e-4, 224x224)", _T2, _SMALL_METRICS,
    _small(_T2, "B", (("ResNet50", "26", "4.1", "9.3", "87.7"), ("ViT-B", "85", "16.9", "12.1", "72.8"),
                      ("ConvNeXt-T", "29", "4.5", "10.7", "88.0"),
                      ("RepNeXt-u1-T", "29->52", "4.4->8.2", "10.4->6.4", "90.5"),
                      ("RepNeXt-u2-T", "29->52", "4.6->8.2", "12.2->6.4", "90.7"),
                      ("RepNeXt-u3-T", "29->52", "4.5->8.2", "11.9->6.4", "90.8"))),
    WOOF, paper_regime=None,
)
_T3 = "RepNeXt Table 3"
TABLE3 = Table(
    PAPER, "table3", "CIFAR-100 (600 epochs, batch 512, lr 5e-4, 64x64)", _T3, _SMALL_METRICS,
    _small(_T3, "x10M", (("ResNet50", "26", "34", "10.6", "77.2"), ("ViT-B", "85", "22", "12.3", "68.9"),
                         ("ConvNeXt-T", "29", "37", "10.9", "78.6"),
                         ("RepNeXt-u1-T", "29->52", "36->67", "10.8->6.3", "79.7"),
                         ("RepNeXt-u2-T", "29->52", "37->67", "12.8->6.3", "79.4"),
                         ("RepNeXt-u3-T", "29->52", "37->67", "12.6->6.3", "79.8"))),
    CIFAR, paper_regime=None,
    notes=("FLOPs are printed in units of 10M (x10M) at 64x64.",),
)

_T4 = "RepNeXt Table 4"
_FORMS = ("train", "", "srep")  # the chain's forms in print order; "" the rRep (plain metric names)


def _t4_row(name: str, params: str, flops: str, latency: str, throughput: str, top1: str) -> Row:
    printed = {"top1": top1}
    for metric, cell, unit in (("params", params, "M"), ("macs", flops, "G"), ("latency", latency, "ms"),
                               ("throughput", throughput, "img/s")):
        values = [v.strip() for v in cell.split("->")]
        if len(values) == 2:  # "train ->r rRep"
            forms = ("train", "")
        elif len(values) == 3:
            forms = _FORMS
        else:
            forms = ("train",)
        for form, value in zip(forms, values):
            if metric == "throughput" and "(" in value:  # rRep (rRep with Linear pointwise layers)
                value, linear = value.replace(")", "").split("(")
                printed["throughput_linear"] = f"{linear.strip()} {unit}"
            base = {"params": "params_deploy", "macs": "macs_deploy"}.get(metric, metric) if form == "" else \
                f"{metric}_{form}"
            printed[base] = f"{value.strip()} {unit}"
    size = name.rsplit("-", 1)[-1] if name.startswith(("ConvNeXt-", "RepNeXt-", "Swin-")) else ""
    return _row(_T4, name, size, **printed)


def _form_orderings(source: str, size: str, baseline: str) -> tuple[Ordering, ...]:
    """RepNeXt-u3-<size>'s forms and <baseline> in latency and in throughput, in the order the printed values put
    them (Table 4: A100). A plain model's one printed value is stored as its training form's (``_t4_row``)."""
    row = f"RepNeXt-u3-{size}"
    return (Ordering(f"batch-1 latency of RepNeXt-u3-{size}'s forms and {baseline}", source, "latency",
                     ((row, "latency_train"), (row, "latency"), (row, "latency_srep"), (baseline, "latency_train"))),
            Ordering(f"batch-128 throughput of RepNeXt-u3-{size}'s forms and {baseline}", source, "throughput",
                     ((row, "throughput_train"), (row, "throughput"), (row, "throughput_linear"),
                      (row, "throughput_srep"), (baseline, "throughput_train"))))


TABLE4 = Table(
    PAPER, "table4", "ImageNet-1K (450 epochs, batch 1024, lr 1e-3, 224x224): train -> rRep -> sRep", _T4,
    ("top1", "params_train", "params_deploy", "params_srep", "macs_train", "macs_deploy", "macs_srep",
     "latency_train", "latency", "latency_srep", "throughput_train", "throughput", "throughput_linear",
     "throughput_srep"),
    tuple(_t4_row(*r) for r in (
        ("ResNet50", "26", "4.1", "9.3", "1548", "77.2"), ("ResNet101", "45", "7.9", "19.2", "912", "78.3"),
        ("ResNet152", "60", "11.6", "27.9", "637", "78.6"), ("MobileNetV3-S", "2.5", "0.06", "8.8", "14880", "67.5"),
        ("MobileNetV3-L", "5.4", "0.2", "10.8", "6052", "75.2"), ("EffNet-B3", "12", "1.0", "19.7", "1836", "81.6"),
        ("EffNet-B4", "19", "1.5", "24.6", "1312", "82.9"), ("EffNet-B5", "30", "2.4", "31.1", "911", "83.6"),
        ("DeiT-S", "22", "4.6", "8.2", "2723", "79.8"), ("DeiT-B", "87", "17.6", "8.3", "1183", "81.8"),
        ("RepVGG-B1", "57 -> 52", "13.2 -> 11.8", "11.8 -> 5.2", "957 -> 1140", "78.4"),
        ("RepVGG-B2", "89 -> 80", "20.5 -> 18.4", "15.4 -> 11.0", "387 -> 482", "78.8"),
        ("RepLKNet-31B", "80 -> 79", "15.5 -> 15.4", "31.7 -> 28.0", "222 -> 230", "83.5"),
        ("RepGhost-2.0x", "9.8 -> 9.8", "0.562 -> 0.535", "8.4 -> 6.4", "1243 -> 1614", "77.5"),
        ("MaxViT-T", "31", "5.6", "50.3", "674", "83.6"), ("Swin-T", "28", "4.5", "11.2", "1326", "81.3"),
        ("ConvNeXt-T", "29", "4.5", "10.7", "1952", "82.1"),
        ("RepNeXt-u3-T", "29 -> 29 -> 52", "4.5 -> 4.4 -> 8.2", "11.9 -> 8.5 -> 6.4", "896 -> 1150 (2052) -> 639",
         "82.1"),
        ("Swin-S", "50", "8.7", "22.2", "857", "83.0"), ("ConvNeXt-S", "50", "8.7", "19.2", "1251", "83.1"),
        ("RepNeXt-u3-S", "50 -> 50 -> 92", "8.8 -> 8.7 -> 16.1", "20.5 -> 15.3 -> 11.1", "492 -> 561 (1289) -> 335",
         "83.1"),
        ("Swin-B", "88", "15.4", "24.1", "663", "83.5"), ("ConvNeXt-B", "89", "15.4", "21.2", "914", "83.8"),
        ("RepNeXt-u3-B", "89 -> 89 -> 163", "15.5 -> 15.3 -> 28.5", "22.4 -> 16.0 -> 14.5",
         "316 -> 354 (919) -> 207", "83.7"))),
    IMAGENET, baselines={size: f"ConvNeXt-{size}" for size in "TSB"}, paper_regime=None,
    orderings=sum((_form_orderings(_T4, size, f"ConvNeXt-{size}") for size in "TSB"), ()),
    notes=("RepVGG, RepLKNet and RepGhost print train ->r deploy; RepNeXt train ->r rRep ->s sRep, the bracket "
           "being rRep with Linear pointwise layers.",
           "The architecture's MACs at 224x224 (backbones/repnext.py, counted by the suite): RepNeXt-u3-T 4.47 / "
           "4.46 / 8.20 G, S 8.71 / 8.68 / 16.14 G, B 15.39 / 15.35 / 28.53 G, ConvNeXt-T 4.46 G (torchvision's "
           "4.46 GFLOPS). The printed 4.5 -> 4.4 (T), 8.8 -> 8.7 (S) and 15.5 -> 15.3 (B) round neither way "
           "consistently: the paper's training-form counts include something (e.g. BN) that the MAC count does "
           "not; rRep equals ConvNeXt's count (4.46 G), which the paper prints as 4.5 for ConvNeXt-T and 4.4 for "
           "rRep-T. Parameters: 28.66 / 28.57 / 51.55 M (T), 50.37 / 50.18 / 92.09 M (S), 88.79 / 88.53 / "
           "162.74 M (B): the printed values to the unit."),
)

_T5 = "RepNeXt Table 5"
# Runs as Table 4 does (same recipes; every form of a row timed interleaved with its group's first row). Its second
# latency ("after re-parameterization") exists only for the shortcut re-parameterizable networks and equals Table 4's
# sRep latencies: it is stored as ``latency_srep``; the first is the training form's. The "±" is the spread of the
# timed forwards (the latency probe's std, stored as ``<metric>_std``).
TABLE5 = Table(
    PAPER, "table5", "Ablation: ConvNeXt to RepNeXt step by step (latency mean ± spread, A100, batch 1)", _T5,
    ("top1", "latency_train", "latency_srep"),
    tuple(replace(_row(_T5, name, name[-1], top1=top1, latency_train=f"{train} ms",
                       **({"latency_srep": f"{srep} ms"} if srep else {})), forms=("train", "srep") if srep else
                  ("train",))
          for name, train, srep, top1 in (
              ("ConvNeXt-T", "10.7 ± 2.5", "", "82.1"), ("Lc2pwconv-T", "10.2 ± 2.3", "", "81.9"),
              ("Ln2bn-T", "8.4 ± 1.9", "", "81.8"), ("Shortcut-act-T", "8.5 ± 2.1", "6.4 ± 1.6", "81.6"),
              ("RepNeXt-u3-T", "11.9 ± 3.0", "6.4 ± 1.6", "82.1"), ("Shortcut-act-S", "15.3 ± 2.5", "11.1 ± 2.0", "82.6"),
              ("RepNeXt-u3-S", "20.5 ± 3.7", "11.1 ± 2.0", "83.1"), ("Shortcut-act-B", "16.0 ± 3.1", "14.5 ± 2.2", "82.9"),
              ("RepNeXt-u3-B", "22.4 ± 3.5", "14.5 ± 2.2", "83.7"))),
    IMAGENET, baselines={"T": "ConvNeXt-T", "S": "Shortcut-act-S", "B": "Shortcut-act-B"}, paper_regime=None,
    orderings=(Ordering("batch-1 latency through the ablation chain (T)", _T5, "latency",
                        (("ConvNeXt-T", "latency_train"), ("Lc2pwconv-T", "latency_train"),
                         ("Ln2bn-T", "latency_train"), ("Shortcut-act-T", "latency_train"),
                         ("Shortcut-act-T", "latency_srep"), ("RepNeXt-u3-T", "latency_train"))),),
    notes=("Each step is made on top of the previous one; only the shortcut re-parameterizable networks print a "
           "latency after re-parameterization (their fastest form: the values equal Table 4's sRep latencies), "
           "stored as the sRep latency. The S and B rows have no ConvNeXt in this table: their ratios are to "
           "Shortcut-act-S / -B.",
           "The paper's ± is the spread of its latency measurements; the suite stores the std of its timed forwards "
           "beside each latency (latency_train_std, latency_srep_std)."),
)

_T6 = "RepNeXt Table 6"
# Runs cost-only (no training: the accuracies are Table 4's): every row's model timed interleaved with ConvNeXt-T in
# one process. On a CPU the probes fill the CPU columns (latency_cpu / throughput_cpu, this machine's CPU, not the
# paper's Xeon Platinum 8260), on a GPU the GPU columns; the Jetson Orin columns stay the paper's. The three RepNeXt
# rows are one model in three forms (Row.deployed: train, rRep, sRep).
_T6_FORMS = {"RepNeXt-u3-T": "train", "RepNeXt-u3-T-sRep": "srep"}
_T6_ROWS = (
    ("MobileNetV3-L", "5.4M", "0.4G", "33.9", "486", "10.8", "6052", "13.35", "964", "75.2"),
    ("ResNet50", "26M", "4.1G", "38.1", "462", "9.3", "1548", "14.99", "348", "77.2"),
    ("Swin-T", "28M", "4.5G", "101.3", "97", "11.2", "1326", "20.68", "199", "81.3"),
    ("ConvNeXt-T", "29M", "4.5G", "41.7", "420", "10.7", "1952", "12.36", "247", "82.1"),
    ("RepNeXt-u3-T", "29M", "4.5G", "48.2", "415", "11.9", "896", "17.6", "173", "82.1"),
    ("RepNeXt-u3-T-rRep", "29M", "4.4G", "36.7", "504", "8.5", "2052", "9.7", "253", "82.1"),
    ("RepNeXt-u3-T-sRep", "52M", "8.2G", "49.8", "183", "6.4", "639", "9.3", "168", "82.1"))
_T6_ORDERED = tuple(r[0] for r in _T6_ROWS)
TABLE6 = Table(
    PAPER, "table6", "CPU (Xeon Platinum 8260), GPU (A100) and edge (Jetson Orin) latency and throughput", _T6,
    ("top1", "params_deploy", "macs_deploy", "latency_cpu", "throughput_cpu", "latency", "throughput",
     "latency_edge", "throughput_edge"),
    tuple(replace(_row(_T6, name, "T", params_deploy=params, macs_deploy=flops, latency_cpu=f"{cpu_lat} ms",
                       throughput_cpu=f"{cpu_thr} img/s", latency=f"{gpu_lat} ms", throughput=f"{gpu_thr} img/s",
                       latency_edge=f"{edge_lat} ms", throughput_edge=f"{edge_thr} img/s", top1=top1),
                  forms=(), deployed=_T6_FORMS.get(name, "deploy"))
          for name, params, flops, cpu_lat, cpu_thr, gpu_lat, gpu_thr, edge_lat, edge_thr, top1 in _T6_ROWS),
    {scale: replace(r, train_accuracy=False, checkpoints=False) for scale, r in IMAGENET.items()},
    baselines={"T": "ConvNeXt-T"}, paper_regime=None, num_classes=1000,
    orderings=tuple(Ordering(f"{what} of every row ({where})", _T6, metric,
                             tuple((name, metric) for name in _T6_ORDERED))
                    for what, where, metric in (("batch-1 latency", "CPU", "latency_cpu"),
                                                ("throughput", "CPU", "throughput_cpu"),
                                                ("batch-1 latency", "A100", "latency"),
                                                ("throughput", "A100", "throughput"))),
    notes=("Cost-only: nothing is trained (the accuracies are Table 4's). On a CPU the suite fills the CPU columns "
           "with this machine's CPU (not the paper's Xeon Platinum 8260, with its thread count stated in the record); "
           "on a GPU the GPU columns. The edge device (Jetson Orin) columns cannot be measured here: they stay the "
           "paper's.",
           "The three RepNeXt rows are one model in its training, rRep and sRep forms.",
           "MobileNetV3-L prints 0.4G here and 0.2 in Table 4 (torchvision counts 0.22 GFLOPS)."),
)

TABLES = (TABLE2, TABLE3, TABLE4, TABLE5, TABLE6)
