"""DyRep (Huang et al., CVPR 2022; ../shared/papers/dyrep-cvpr2022.md): its tables, values exactly as printed. A
``dyrep`` row trains the plain network while runners/dyrep.py grows its most salient conv every t epochs and cuts
weak branches; the grow / cut events are stored with the run, and the "Avg. FLOPs / params" columns are averaged over
the training epochs from them (the structure of each epoch); "Cost" is the run's own wall time x devices."""

from __future__ import annotations

from .base import DyRep, PaperValue, Recipe, Row, Table

PAPER = "dyrep"

# CIFAR (DyRep Sec. 5.1 and the official cifar.yaml, notes Sec. 5.5): 1 GPU x 128, 600 epochs, lr 0.1 cosine to
# 1e-6 (here: to 0, the suite's cosine), no warm-up, SGD momentum 0.9 without Nesterov, weight decay 1e-4 on every
# parameter (BN and biases too), no label smoothing, t = 15 and no growth after epoch 500. Augmentation: crop + flip;
# the official cutout 16 is not applied (a recorded gap). Smoke: plumbing (2 epochs of one step: one growth after
# each). Mini: OREPA's mini recipe (5 epochs of the digits as CIFAR pickles, 2 x 32, lr 0.02 after a 1-epoch warm-up,
# clip 10, 3 seeds) with t shortened to 1 epoch and growth up to the fourth.
_CIFAR = dict(weight_decay=1e-4, decay_all=True, bias_lr_mult=1.0, nesterov=False)
CIFAR = {
    "smoke": Recipe(dataset="synthetic_cifar", resolution=32, batch=2, devices=1, epochs=2, max_iters=1,
                    checkpoints=False, dyrep_interval=1, **_CIFAR),
    "mini": Recipe(dataset="digits_cifar", resolution=32, batch=32, devices=2, epochs=5, lr=0.02, warmup_epochs=1.0,
                   seeds=3, clip_grad=10.0, dyrep_interval=1, dyrep_max_epoch=4, **_CIFAR),
    "paper": Recipe(dataset="cifar10", resolution=32, batch=128, devices=1, epochs=600, lr=0.1, dyrep_interval=15,
                    dyrep_max_epoch=500, **_CIFAR),
}

_T2 = "DyRep Table 2"
_T2_ROWS = (  # dataset, method, cost (GPU hrs., one V100), avg FLOPs (M), avg params (M), top-1
    ("CIFAR-10", "Origin", "2.4", "313", "15.0", "94.68±0.08"),
    ("CIFAR-10", "DBB", "9.4", "728", "34.7", "94.97±0.06"),
    ("CIFAR-10", "DyRep", "6.9", "597", "26.4", "95.22±0.13"),
    ("CIFAR-100", "Origin", "2.4", "313", "15.0", "73.69±0.12"),
    ("CIFAR-100", "DBB", "9.4", "728", "34.7", "74.04±0.08"),
    ("CIFAR-100", "DyRep", "6.7", "582", "27.1", "74.37±0.11"),
)
_REPS = {"Origin": "none", "DBB": "dbb", "DyRep": "dyrep"}


def _t2_row(dataset, method, cost, flops, params, acc) -> Row:
    source = f"{_T2}, {dataset} / {method}"
    return Row(f"{dataset}/{method}", "vgg16_cifar", _REPS[method], None, dataset,
               {"top1": PaperValue(acc, f"{source}, ACC (%)"),
                "train_hours": PaperValue(cost, f"{source}, Cost (GPU hrs., Tesla V100)"),
                "macs_avg": PaperValue(f"{flops} M", f"{source}, Avg. FLOPs (M)"),
                "params_avg": PaperValue(f"{params} M", f"{source}, Avg. params (M)")},
               dyrep=DyRep() if method == "DyRep" else None,
               recipe={"paper": {"dataset": "cifar100"}} if dataset == "CIFAR-100" else {})


TABLE2 = Table(
    PAPER, "table2", "VGG-16 on CIFAR: Origin, DBB and DyRep (averages over training)", _T2,
    ("top1", "train_hours", "macs_avg", "params_avg"), tuple(_t2_row(*row) for row in _T2_ROWS), CIFAR,
    paper_regime=None,
)

TABLES = (TABLE2,)
