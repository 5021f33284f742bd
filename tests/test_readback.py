"""The converted outputs read back with the libraries the loaders use: DALI's webdataset reader (CPU
operators) and FFCV's Loader (no ToDevice), with the right counts and labels in the stored order."""
import numpy as np
import pytest

from test_convert import shard_samples


def test_dali_reads_every_sample_with_its_label(converted):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types
    out, manifest = converted
    info = manifest["splits"]["train"]
    paths = [str(out / info["dali"]["dir"] / tar) for tar, _ in info["dali"]["shards"]]
    indexes = [str(out / info["dali"]["dir"] / idx) for _, idx in info["dali"]["shards"]]
    batch = 32

    @dali.pipeline_def(batch_size=batch, num_threads=2, device_id=None)
    def pipe():
        jpeg, label, text = fn.readers.webdataset(
            paths=paths, index_paths=indexes, ext=["jpg", "label.i32", "cls"],
            dtypes=[types.UINT8, types.INT32, types.UINT8], missing_component_behavior="error",
            random_shuffle=False, pad_last_batch=True, name="reader")
        image = fn.resize(fn.decoders.image(jpeg, device="cpu", output_type=types.RGB), size=[32, 32])
        return image, label, text

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == info["samples"]
    labels, texts, shapes = [], [], set()
    for _ in range(-(-info["samples"] // batch)):
        images, label, text = p.run()
        labels += [int(np.array(label[i])[0]) for i in range(len(label))]
        texts += [int(bytes(np.array(text[i]))) for i in range(len(text))]
        shapes |= {np.array(images[i]).shape for i in range(len(images))}
    labels, texts = labels[:info["samples"]], texts[:info["samples"]]
    assert labels == texts == [label for _, label, _ in shard_samples(out, "train")]
    assert shapes == {(32, 32, 3)}


def test_ffcv_loader_reads_every_sample_with_its_label(converted):
    pytest.importorskip("ffcv")
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    out, manifest = converted
    info = manifest["splits"]["holdout"]
    loader = Loader(str(out / info["ffcv"]), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [CenterCropRGBImageDecoder((48, 48), 224 / 256), ToTensor()],
                                                "label": [IntDecoder(), ToTensor()]})
    labels, count = [], 0
    for images, label in loader:
        assert tuple(images.shape[1:]) == (48, 48, 3) and images.float().std() > 5
        labels += label.flatten().tolist()
        count += len(images)
    assert count == info["samples"] == len(labels)
    assert labels == [label for _, label, _ in shard_samples(out, "holdout")]


def test_beton_holds_the_shards_bytes(converted):
    """FFCV gets the converter's JPEG as is: the same bytes as the DALI shard, no second encode."""
    pytest.importorskip("ffcv")
    from ffcv.reader import Reader
    out, manifest = converted
    reader = Reader(str(out / manifest["splits"]["val"]["ffcv"]))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = (out / manifest["splits"]["val"]["ffcv"]).read_bytes()
    stored = [data[int(m["data_ptr"]): int(m["data_ptr"]) + sizes[int(m["data_ptr"])]] for m in reader.metadata["f0"]]
    assert stored == [jpeg for _, _, jpeg in shard_samples(out, "val")]
    assert (reader.metadata["f0"]["mode"] == 0).all()  # FFCV's jpg mode
