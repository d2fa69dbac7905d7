"""Tests for tr_jax.data.celeba (and the shared pipeline) on tfds.testing.mock_data."""
import io
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tr_jax.data import celeba, pipeline

NUM_EXAMPLES = 8
# Column order of list_attr_celeba.txt (the official attribute file), typed independently.
OFFICIAL_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses "
    "Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young").split()
SHARD = dict(process_index=0, process_count=1)


@pytest.fixture
def mocked():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        yield


def raw_examples():
    """The mocked celeb_a train examples as TFDS stores them (JPEG bytes), in stored order."""
    builder = tfds.builder("celeb_a")
    return list(tfds.as_numpy(builder.as_dataset(
        split="train", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})))


def epoch(dataset, split, batch_size, **kwargs):
    batches = list(dataset.batches(split, batch_size, **kwargs))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_task_names_are_the_40_attributes_in_official_order(mocked):
    ds = celeba.load_celeba(**SHARD)
    assert ds.task_names == tuple(OFFICIAL_ATTRIBUTES) and ds.num_tasks == 40
    assert set(celeba.TAG_TASKS) <= set(ds.task_names) and len(celeba.TAG_TASKS) == 9


def test_batches_shapes_dtypes_and_values(mocked):
    ds = celeba.load_celeba(tasks=celeba.TAG_TASKS, **SHARD)
    batches = list(ds.batches("train", 5, seed=0))
    assert len(batches) == ds.steps_per_epoch("train", 5) == NUM_EXAMPLES // 5
    for batch in batches:
        assert set(batch) == {"image", "labels", "label_mask"}
        assert batch["image"].shape == (5, 64, 64, 3) and batch["image"].dtype == np.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["labels"].shape == (5, 9) and batch["labels"].dtype == np.int32
        assert set(np.unique(batch["labels"])) <= {0, 1}
        assert batch["label_mask"].dtype == np.bool_ and batch["label_mask"].all()
    tail = list(ds.batches("test", 5, shuffle=False, drop_remainder=False))
    assert [len(b["labels"]) for b in tail] == [5, 3]


def test_labels_and_images_match_tfds(mocked):
    raw = raw_examples()
    ds = celeba.load_celeba(image_size=(218, 178), **SHARD)
    batch = epoch(ds, "train", 4, shuffle=False)
    expected = np.array([[ex["attributes"][n] for n in OFFICIAL_ATTRIBUTES] for ex in raw])
    np.testing.assert_array_equal(batch["labels"], expected.astype(np.int32))
    # TFDS decodes with TF's JPEG decoder (its default DCT), so decode the bytes the same way
    images = np.stack([tf.io.decode_jpeg(ex["image"], channels=3).numpy()
                       for ex in raw]).astype(np.float32) / 255.0
    np.testing.assert_allclose(batch["image"], images, atol=1e-6)
    pil = np.stack([np.asarray(Image.open(io.BytesIO(ex["image"]))) for ex in raw]) / 255.0
    assert np.abs(batch["image"] - pil).mean() < 0.01  # another decoder: close, not equal
    small = epoch(celeba.load_celeba(**SHARD), "train", 4, shuffle=False)["image"]
    assert small.shape[1:] == (64, 64, 3)
    np.testing.assert_allclose(small.mean((1, 2)), images.mean((1, 2)), atol=0.02)


def test_task_subsets_select_the_named_columns(mocked):
    full = epoch(celeba.load_celeba(**SHARD), "train", 4, shuffle=False)["labels"]
    tag = celeba.load_celeba(tasks=celeba.TAG_TASKS, **SHARD)
    assert tag.task_names == celeba.TAG_TASKS
    columns = [OFFICIAL_ATTRIBUTES.index(n) for n in celeba.TAG_TASKS]
    np.testing.assert_array_equal(epoch(tag, "train", 4, shuffle=False)["labels"],
                                  full[:, columns])
    first = celeba.load_celeba(tasks=3, **SHARD)
    assert first.task_names == tuple(OFFICIAL_ATTRIBUTES[:3])
    mixed = celeba.load_celeba(tasks=["Young", 0], **SHARD)
    np.testing.assert_array_equal(epoch(mixed, "train", 4, shuffle=False)["labels"],
                                  full[:, [39, 0]])


def test_resolve_tasks_errors():
    with pytest.raises(KeyError, match="Wearing_Hats"):
        pipeline.resolve_tasks(OFFICIAL_ATTRIBUTES, ["Wearing_Hats"])
    with pytest.raises(ValueError, match="repeats"):
        pipeline.resolve_tasks(OFFICIAL_ATTRIBUTES, ["Young", 39])
    with pytest.raises(TypeError, match=r"tasks=\['Young'\]"):
        pipeline.resolve_tasks(OFFICIAL_ATTRIBUTES, "Young")
    with pytest.raises(KeyError, match="task index 40"):
        pipeline.resolve_tasks(OFFICIAL_ATTRIBUTES, [40])
    with pytest.raises(ValueError, match="tasks=41"):
        pipeline.resolve_tasks(OFFICIAL_ATTRIBUTES, 41)


def test_splits(mocked):
    ds = celeba.load_celeba(**SHARD)
    assert set(ds.sizes) == {"train", "validation", "test"}
    assert ds.split_specs == {"train": "train", "validation": "validation", "test": "test"}
    for split in ds.sizes:
        assert ds.num_examples(split) == NUM_EXAMPLES  # mock_data serves every split alike
    with pytest.raises(KeyError, match="available"):
        ds.num_examples("val")
    custom = celeba.load_celeba(splits={"train": "train[:50%]", "eval": "validation"}, **SHARD)
    assert custom.split_specs["train"] == "train[:50%]" and set(custom.sizes) == {"train",
                                                                                  "eval"}


def test_shuffle_is_seeded(mocked):
    ds = celeba.load_celeba(tasks=celeba.TAG_TASKS, image_size=(8, 8), **SHARD)
    stored = epoch(ds, "train", 2, shuffle=False)["image"]

    def order(**kwargs):
        images = epoch(ds, "train", 2, **kwargs)["image"]
        return [int(np.abs(stored - im).sum((1, 2, 3)).argmin()) for im in images]

    first = order(seed=1, epoch=0)
    assert sorted(first) == list(range(NUM_EXAMPLES))
    assert order(seed=1, epoch=0) == first
    assert first != list(range(NUM_EXAMPLES))
    assert order(seed=2, epoch=0) != first and order(seed=1, epoch=1) != first
    assert order(seed=1, epoch=0, start=2) == first[4:]
    with pytest.raises(ValueError, match="start=-1 must be >= 0"):
        next(ds.batches("train", 2, start=-1))


def test_augment_flips_train_images_only(mocked):
    plain = celeba.load_celeba(image_size=(16, 16), **SHARD)
    flipped = celeba.load_celeba(image_size=(16, 16), augment=True, **SHARD)
    a = epoch(plain, "train", 4, seed=3)["image"]
    b = epoch(flipped, "train", 4, seed=3)["image"]
    same = np.isclose(a, b).all((1, 2, 3))
    mirrored = np.isclose(a[:, :, ::-1], b).all((1, 2, 3))
    assert (same | mirrored).all() and same.any() and mirrored.any()
    np.testing.assert_array_equal(epoch(plain, "test", 4, seed=3)["image"],
                                  epoch(flipped, "test", 4, seed=3)["image"])


def test_argument_errors(mocked):
    with pytest.raises(ValueError, match="process_index=2"):
        celeba.load_celeba(process_index=2, process_count=2)
    ds = celeba.load_celeba(process_index=1, process_count=2)
    assert ds.local_batch_size(8) == 4
    with pytest.raises(ValueError, match="batch_size=5"):
        ds.steps_per_epoch("train", 5)
    with pytest.raises(ValueError, match="image_size"):
        celeba.load_celeba(image_size=(0, 64), **SHARD)


def test_unprepared_data_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        celeba.load_celeba(str(tmp_path / "tfds"), **SHARD)
    message = str(err.value)
    assert str(tmp_path / "tfds") in message
    assert f"prepare_celeba('{tmp_path / 'tfds'}')" in message and "does not download" in message


def test_importing_the_loaders_does_not_import_tensorflow():
    code = ("import sys, tr_jax, tr_jax.data.celeba, tr_jax.data.cub, tr_jax.data.pipeline\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
