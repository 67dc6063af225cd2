"""The dense runner's data (runners/dense.py): COCO and Cityscapes generated tiny in their real formats, checked
before anything runs (the runs themselves: tests/test_dense_suite.py)."""

import json

import pytest

from runners.data import DatasetMissing
from runners.dense import check_cityscapes, check_coco, ensure_tiny_cityscapes, ensure_tiny_coco



def test_tiny_datasets_are_in_the_real_formats_and_checked(tmp_path):
    """The generated sets load with pycocotools / list as Cityscapes frames; a missing or malformed set is a
    DatasetMissing with one line naming what is wrong."""
    from pycocotools.coco import COCO
    for check in (check_coco, check_cityscapes):
        with pytest.raises(DatasetMissing, match="not found"):
            check(tmp_path)
    ensure_tiny_coco(tmp_path)
    ensure_tiny_cityscapes(tmp_path)
    check_coco(tmp_path)
    check_cityscapes(tmp_path)
    coco = COCO(str(tmp_path / "coco" / "annotations" / "instances_val2017.json"))
    assert len(coco.getImgIds()) == 4 and coco.getAnnIds() and len(coco.getCatIds()) == 80  # all listed, as COCO's
    drawn = {coco.loadCats(a["category_id"])[0]["name"] for a in coco.loadAnns(coco.getAnnIds())}
    assert drawn <= {"person", "car", "dog"}
    mask = coco.annToMask(coco.loadAnns(coco.getAnnIds())[0])
    assert mask.sum() > 0
    ann = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetMissing) as e:
        check_coco(tmp_path)
    assert "lack annotations, categories" in str(e.value) and "\n" not in str(e.value)
    label = next((tmp_path / "cityscapes" / "gtFine" / "val").glob("*/*_labelTrainIds.png"))
    label.unlink()
    with pytest.raises(DatasetMissing, match="label .* is missing"):
        check_cityscapes(tmp_path)
