"""Datasets in the layouts people have; unreadable images are skipped and counted; buckets."""

import io
import json
import tarfile

import pytest
from PIL import Image

from zimagekit.datasets import ImageCaptionDataset, fit_to_bucket, make_buckets, nearest_bucket
from zimagekit.errors import ZImageKitError


def png_bytes(color, size=(20, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_with_txt_captions_and_a_corrupt_image(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / "a.txt").write_text("a red thing\n")
    (tmp_path / "b.png").write_bytes(b"\x89PNG not really")  # corrupt
    (tmp_path / "b.txt").write_text("broken")
    (tmp_path / "c.png").write_bytes(png_bytes((0, 0, 255)))  # no caption: not part of the dataset
    ds = ImageCaptionDataset.open(tmp_path)
    assert [s.caption for s in ds.samples] == ["a red thing", "broken"]
    image, caption = ds.load(0)
    assert caption == "a red thing" and image.getpixel((0, 0)) == (255, 0, 0)
    assert ds.load(1) is None and ds.load(1) is None and ds.skipped == 2


@pytest.mark.parametrize("layout", ["jsonl-hf", "jsonl-diffsynth", "csv-hf", "csv-diffsynth"])
def test_metadata_files(tmp_path, layout):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(png_bytes((0, 255, 0)))
    kind, style = layout.split("-")
    file_key, text_key = ("file_name", "text") if style == "hf" else ("image", "prompt")
    if kind == "jsonl":
        (tmp_path / "metadata.jsonl").write_text(json.dumps({file_key: "img/x.png", text_key: "green"}) + "\n")
    else:
        (tmp_path / "metadata.csv").write_text(f"{file_key},{text_key}\nimg/x.png,green\n")
    image, caption = ImageCaptionDataset.open(tmp_path).load(0)
    assert caption == "green" and image.size == (20, 10)


def test_webdataset_tar_shards(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for key, data in [("k1.png", png_bytes((1, 2, 3))), ("k1.txt", b"first"), ("k2.jpg", b"garbage"),
                          ("k2.txt", b"second")]:
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = ImageCaptionDataset.open(tmp_path)
    assert [s.caption for s in ds.samples] == ["first", "second"]
    assert ds.load(0)[0].getpixel((0, 0)) == (1, 2, 3)
    assert ds.load(1) is None and ds.skipped == 1


def test_bad_layouts_get_one_line_errors(tmp_path):
    with pytest.raises(ZImageKitError, match="does not exist"):
        ImageCaptionDataset.open(tmp_path / "nope")
    with pytest.raises(ZImageKitError, match="holds no captioned images"):
        ImageCaptionDataset.open(tmp_path)
    (tmp_path / "metadata.csv").write_text("path,caption\nx.png,y\n")
    with pytest.raises(ZImageKitError, match="needs file_name,text or image,prompt"):
        ImageCaptionDataset.open(tmp_path)


def test_buckets_keep_the_area_and_multiples_of_16():
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and 0.5 <= w / h <= 2.0
        assert abs(w * h - 1024**2) / 1024**2 < 0.02  # area preserved to the rounding of h
    # 16:9 = 1.7778; by hand, 1360x768 = 1.7708 beats its neighbour 1376x768 = 1.7917
    assert nearest_bucket(1920, 1080, buckets) == (1360, 768)
    assert nearest_bucket(512, 512, buckets) == (1024, 1024)


def test_fit_to_bucket_covers_then_centre_crops():
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # a white middle third
    out = fit_to_bucket(image, (64, 64))
    assert out.size == (64, 64)
    assert out.getpixel((32, 32)) == (255, 255, 255)  # the centre survives the crop
