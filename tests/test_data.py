"""Dataset readers: RLE and polygons against pycocotools, each layout read back as written, label maps, and
every bad-data case refused with a DataError naming the file."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from minseg.data import open_dataset
from minseg.data.labels import label_map
from minseg.data.rle import compress, decode, decompress, encode, polygon_to_mask
from minseg.errors import DataError
from minseg_ref.tiny_data import write_coco_instances, write_coco_panoptic, write_semantic, write_voc

mask_utils = pytest.importorskip("pycocotools.mask")


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), p=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_rle_matches_pycocotools(h, w, p, seed):
    mask = np.random.default_rng(seed).random((h, w)) < p
    theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ours = encode(torch.from_numpy(mask))
    assert compress(ours["counts"]) == theirs["counts"].decode()
    assert decompress(theirs["counts"]) == ours["counts"]
    assert np.array_equal(decode(ours).numpy(), mask)
    assert np.array_equal(decode({"size": [h, w], "counts": theirs["counts"]}).numpy(), mask)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 25), w=st.integers(1, 25), k=st.integers(3, 8), digits=st.integers(0, 2),
       seed=st.integers(0, 10_000))
def test_polygon_matches_pycocotools(h, w, k, digits, seed):
    """Random polygons (self-crossing, partly outside the image, on and off the pixel grid)."""
    rng = np.random.default_rng(seed)
    xy = (rng.random(2 * k) * np.array([w + 6, h + 6] * k) - 3).round(digits).tolist()
    theirs = mask_utils.decode(mask_utils.frPyObjects([xy], h, w)[0]).astype(bool)
    assert np.array_equal(polygon_to_mask(xy, h, w).numpy(), theirs)


def test_instances_read_as_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    write_coco_instances(tmp_path, n=3)
    coco = COCO(str(tmp_path / "annotations.json"))
    ds = open_dataset(tmp_path)
    assert ds.kind == "instances" and [c["id"] for c in ds.categories] == [1, 3, 7] and len(ds) == 3
    styles = set()
    for i in range(len(ds)):
        image, target, info = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[info["image_id"]]))
        assert target["category_ids"].tolist() == [a["category_id"] for a in annotations]
        assert target["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in annotations]
        for k, a in enumerate(annotations):
            assert np.array_equal(target["masks"][k].numpy(), coco.annToMask(a))
            x, y, bw, bh = a["bbox"]
            assert target["boxes"][k].tolist() == [x, y, x + bw, y + bh]
            styles.add(type(a["segmentation"]).__name__ + type(a["segmentation"].get("counts", "")).__name__
                       if isinstance(a["segmentation"], dict) else "polygon")
    assert styles == {"polygon", "dictlist", "dictstr"} and ds[0][1]["iscrowd"].any()


def test_panoptic_targets(tmp_path):
    write_coco_panoptic(tmp_path, n=3)
    ds = open_dataset(tmp_path)
    assert ds.kind == "panoptic" and len(ds) == 3
    for i in range(len(ds)):
        image, t, _ = ds[i]
        png = np.asarray(Image.open(tmp_path / "panoptic" / f"{i:04d}.png")).astype(np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        assert np.array_equal(t["panoptic"].numpy(), ids) and (ids > 255).any()
        # detectron2's Panoptic FPN target: things 0, stuff 10 -> 1, 20 -> 2, void 255
        expected = np.full(ids.shape, 255)
        for s in t["segments"]:
            expected[ids == s["id"]] = {1: 0, 3: 0, 10: 1, 20: 2}[s["category_id"]]
        assert np.array_equal(t["sem_seg"].numpy(), expected) and (expected == 255).any()
        things = [s for s in t["segments"] if s["isthing"]]
        assert t["category_ids"].tolist() == [s["category_id"] for s in things]
        assert t["iscrowd"].tolist() == [bool(s["iscrowd"]) for s in things]
        for k, s in enumerate(things):
            assert np.array_equal(t["masks"][k].numpy(), ids == s["id"])
            x, y, bw, bh = s["bbox"]
            assert t["boxes"][k].tolist() == [x, y, x + bw, y + bh]
    assert ds[0][1]["iscrowd"].any()


def test_semantic_and_voc(tmp_path):
    write_semantic(tmp_path / "sem", n=3, num_classes=4)
    ds = open_dataset(tmp_path / "sem", num_classes=4)
    image, t, info = ds[1]
    mask = np.asarray(Image.open(tmp_path / "sem" / "masks" / "0001.png"))
    assert ds.kind == "semantic" and np.array_equal(t["mask"].numpy(), mask) and info["image_id"] == "0001"
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 255} and 255 in mask
    write_voc(tmp_path / "voc", n=4)
    assert len(open_dataset(tmp_path / "voc", split="train")) == 2
    voc = open_dataset(tmp_path / "voc", split="val")
    assert len(voc) == 2 and len(voc.categories) == 21 and voc[0][1]["mask"].max() == 255


def test_label_maps():
    """Contiguous labels follow increasing ids whatever the json's order (detectron2 sorts them)."""
    categories = [{"id": 20, "isthing": 0}, {"id": 7, "isthing": 1}, {"id": 1, "isthing": 1},
                  {"id": 10, "isthing": 0}, {"id": 3, "isthing": 1}]
    ids, crowd = torch.tensor([7, 1, 3]), torch.tensor([False, False, True])
    assert label_map("maskrcnn_resnet50_fpn", categories).to_labels(ids).tolist() == [7, 1, 3]
    assert label_map("panoptic_fpn_resnet50", categories).to_labels(ids, crowd).tolist() == [2, 0, 1]
    yolact = label_map("yolact_resnet50", categories)
    assert yolact.to_labels(ids, crowd).tolist() == [2, 0, -1]
    assert [yolact.thing_category(k) for k in range(3)] == [1, 3, 7]
    assert label_map("panoptic_fpn_resnet50", categories).stuff_category(2) == 20
    assert label_map("maskrcnn_resnet50_fpn", categories).thing_category(7) == 7


def _bad_semantic(root):
    return write_semantic(root, n=2, num_classes=3)


def _break(root, kind):
    """Write a dataset, break one file; return the file the error must name and open_dataset's split."""
    if kind == "no mask":
        _bad_semantic(root)
        (root / "masks" / "0001.png").unlink()
        return root / "images" / "0001.png"
    if kind == "mask size":
        _bad_semantic(root)
        Image.new("L", (10, 10)).save(root / "masks" / "0001.png")
        return root / "masks" / "0001.png"
    if kind == "label":
        _bad_semantic(root)
        Image.fromarray(np.full((48, 64), 7, np.uint8)).save(root / "masks" / "0000.png")
        return root / "masks" / "0000.png"
    if kind == "unreadable image":
        _bad_semantic(root)
        (root / "images" / "0001.png").write_bytes(b"not a png")
        return root / "images" / "0001.png"
    if kind == "unreadable coco image":
        write_coco_instances(root, n=2)
        (root / "images" / "0001.png").write_bytes(b"\x89PNG broken")
        return root / "images" / "0001.png"
    if kind == "malformed json":
        write_coco_instances(root, n=2)
        (root / "annotations.json").write_text('{"images": [')
        return root / "annotations.json"
    if kind == "json schema":
        write_coco_instances(root, n=2)
        data = json.loads((root / "annotations.json").read_text())
        del data["annotations"][0]["image_id"]
        (root / "annotations.json").write_text(json.dumps(data))
        return root / "annotations.json"
    if kind == "bad rle":
        write_coco_instances(root, n=2)
        data = json.loads((root / "annotations.json").read_text())
        data["annotations"][1]["segmentation"] = {"size": [48, 64], "counts": [5, 3]}
        (root / "annotations.json").write_text(json.dumps(data))
        return root / "annotations.json"
    if kind == "panoptic size":
        write_coco_panoptic(root, n=2)
        Image.new("RGB", (5, 5)).save(root / "panoptic" / "0000.png")
        return root / "panoptic" / "0000.png"
    if kind == "panoptic id":
        write_coco_panoptic(root, n=2)
        Image.new("RGB", (64, 48), (9, 0, 0)).save(root / "panoptic" / "0000.png")
        return root / "panoptic" / "0000.png"
    if kind == "no layout":
        (root / "stuff").mkdir(parents=True)
        return root
    raise AssertionError(kind)


BAD = ["no mask", "mask size", "label", "unreadable image", "unreadable coco image", "malformed json",
       "json schema", "bad rle", "panoptic size", "panoptic id", "no layout"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_data_names_the_file(tmp_path, kind):
    named = _break(tmp_path / "data", kind)
    with pytest.raises(DataError) as e:
        ds = open_dataset(tmp_path / "data", num_classes=3)
        for i in range(len(ds)):
            ds[i]
    message = str(e.value)
    assert message.startswith(str(named)) and "\n" not in message, message


def test_splits(tmp_path):
    """COCO's annotations/instances_SPLIT.json + SPLIT/, and a split subfolder for the other layouts."""
    write_coco_instances(tmp_path / "made", n=2)
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "made" / "annotations.json").rename(tmp_path / "coco" / "annotations" / "instances_val2017.json")
    (tmp_path / "made" / "images").rename(tmp_path / "coco" / "val2017")
    ds = open_dataset(tmp_path / "coco", split="val2017")
    assert ds.kind == "instances" and len(ds) == 2 and ds[1][2]["file"].endswith("val2017/0001.png")
    write_semantic(tmp_path / "folder" / "train", n=2)
    assert len(open_dataset(tmp_path / "folder", split="train")) == 2
    with pytest.raises(DataError, match="expected one of"):
        open_dataset(tmp_path / "coco", split="train2017")
