"""Tests for tr_jax.data.cub on a fabricated CUB_200_2011/ tree in the real file formats.

Each image is one solid colour, so a yielded image tells which image id it came from and its
labels can be checked against the arrays the test wrote (the independent reference).
"""
import numpy as np
import pytest
from PIL import Image

from tr_jax.data import cub

NUM_IMAGES, NUM_TRAIN = 10, 6
GRAY_ID = 3  # stored as a grayscale JPEG, as a few real CUB images are
MISSING_PAIR = (2, 5)  # (image id, attribute id) with no annotation line
CERTAINTIES = "1 not visible\n2 guessing\n3 probably\n4 definitely\n"


def colour(image_id):
    if image_id == GRAY_ID:
        return (128, 128, 128)
    return (20 * image_id, 250 - 20 * image_id, 60 + 15 * image_id)


def write_cub_tree(parent, *, names_at="../attributes.txt", seed=0, skip=()):
    """Writes CUB_200_2011/ under ``parent``; returns the reference annotations."""
    root = parent / "CUB_200_2011"
    (root / "attributes").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ids = np.arange(1, NUM_IMAGES + 1)
    classes = 1 + ids % 2
    is_train = np.isin(ids, rng.permutation(ids)[:NUM_TRAIN])
    names = [f"has_part{a // 15}::value_{a % 15}" for a in range(cub.NUM_ATTRIBUTES)]
    present = rng.random((NUM_IMAGES, cub.NUM_ATTRIBUTES)) < 0.3
    certainty = rng.integers(1, 5, (NUM_IMAGES, cub.NUM_ATTRIBUTES))
    certainty[MISSING_PAIR[0] - 1, MISSING_PAIR[1] - 1] = 0
    files = {}
    image_lines = []
    for i in ids[::-1]:  # not in id order: the reader sorts
        name = f"{classes[i - 1]:03d}.Bird_{classes[i - 1]}/Bird_{i:04d}.jpg"
        image_lines.append(f"{i} {name}")
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "L" if i == GRAY_ID else "RGB"
        fill = colour(i)[0] if i == GRAY_ID else colour(i)
        Image.new(mode, (24, 18), fill).save(path, quality=95)
    files["images.txt"] = image_lines
    files["train_test_split.txt"] = [f"{i} {int(t)}" for i, t in zip(ids, is_train)]
    files["image_class_labels.txt"] = [f"{i} {c}" for i, c in zip(ids, classes)]
    label_lines = []
    for i in ids:
        for a in range(1, cub.NUM_ATTRIBUTES + 1):
            c = certainty[i - 1, a - 1]
            if c:
                extra = " 0 1" if (i + a) % 97 == 0 else ""  # the odd lines of the real file
                label_lines.append(f"{i} {a} {int(present[i - 1, a - 1])} {c} 3.5{extra}")
    files["attributes/image_attribute_labels.txt"] = label_lines
    files["attributes/certainties.txt"] = CERTAINTIES.splitlines()
    files[names_at] = [f"{a + 1} {n}" for a, n in enumerate(names)]
    for rel, lines in files.items():
        if rel not in skip:
            (root / rel).write_text("\n".join(lines) + "\n")
    return dict(ids=ids, classes=classes - 1, is_train=is_train, names=tuple(names),
                present=present, certainty=certainty)


def expected_mask(ref, policy):
    mask = ref["certainty"] > 0
    return mask & (ref["certainty"] != 1) if policy == "mask" else mask


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A fabricated tree prepared once into a TFDS data_dir."""
    base = tmp_path_factory.mktemp("cub")
    ref = write_cub_tree(base / "manual")
    cub.prepare_cub(base / "manual", data_dir=str(base / "tfds"))
    return ref, str(base / "tfds")


def image_ids_of(images, ref):
    """Image id of each yielded solid-colour image (nearest reference colour)."""
    palette = np.array([colour(i) for i in ref["ids"]], np.float64) / 255.0
    means = images.reshape(len(images), -1, 3).mean(1)
    nearest = np.abs(means[:, None] - palette[None]).max(-1)
    assert (nearest.min(1) < 0.03).all()
    return ref["ids"][nearest.argmin(1)]


def epoch(dataset, split, batch_size, **kwargs):
    batches = list(dataset.batches(split, batch_size, **kwargs))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("names_at", ["../attributes.txt", "attributes.txt",
                                      "attributes/attributes.txt"])
def test_read_annotations_matches_the_files(tmp_path, names_at):
    ref = write_cub_tree(tmp_path, names_at=names_at)
    ann = cub.read_cub_annotations(tmp_path)
    np.testing.assert_array_equal(ann.image_ids, ref["ids"])
    np.testing.assert_array_equal(ann.is_train, ref["is_train"])
    np.testing.assert_array_equal(ann.classes, ref["classes"])
    np.testing.assert_array_equal(ann.certainty, ref["certainty"])
    np.testing.assert_array_equal(ann.present, ref["present"] & (ref["certainty"] > 0))
    assert ann.attribute_names == ref["names"]
    assert ann.not_visible_certainty == 1
    assert ann.file_names[0].endswith("Bird_0001.jpg")
    # the manual dir may also be CUB_200_2011/ itself
    if names_at != "../attributes.txt":
        assert cub.read_cub_annotations(tmp_path / "CUB_200_2011").attribute_names == ref["names"]


def test_missing_manual_dir_names_directory_files_and_source(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError) as err:
        cub.prepare_cub(missing, data_dir=str(tmp_path / "tfds"))
    message = str(err.value)
    for needle in (str(missing), "images.txt", "train_test_split.txt",
                   "image_attribute_labels.txt", "attributes.txt",
                   "Caltech-UCSD Birds-200-2011", "CUB_200_2011"):
        assert needle in message


def test_missing_file_is_named(tmp_path):
    write_cub_tree(tmp_path, skip=("train_test_split.txt", "../attributes.txt"))
    with pytest.raises(FileNotFoundError, match="train_test_split.txt") as err:
        cub.locate_cub(tmp_path)
    assert "attributes.txt (one of" in str(err.value)
    assert "image_attribute_labels.txt" not in str(err.value).split(".\n")[0]


def test_bad_label_line_is_reported(tmp_path):
    write_cub_tree(tmp_path)
    labels = tmp_path / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    labels.write_text(labels.read_text() + "1 1 2 4 3.5\n")  # is_present must be 0/1
    with pytest.raises(ValueError, match="image_attribute_labels.txt: 1 lines"):
        cub.read_cub_annotations(tmp_path)


def test_missing_certainties_file_means_the_official_certainties(tmp_path):
    ref = write_cub_tree(tmp_path, skip=("attributes/certainties.txt",))
    ann = cub.read_cub_annotations(tmp_path)
    assert set(ref["certainty"].ravel()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(ann.certainty, ref["certainty"])
    assert ann.not_visible_certainty == 1


def test_repeated_pair_keeps_its_last_line(tmp_path):
    ref = write_cub_tree(tmp_path)
    labels = tmp_path / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    image, attribute = 4, 9
    was = int(ref["present"][image - 1, attribute - 1])
    # 39 more lines for one pair, every one different from the one before; the last: 4 (definitely)
    repeats = [f"{image} {attribute} {(was + k) % 2} {1 + k % 4} 3.5" for k in range(1, 40)]
    labels.write_text(labels.read_text() + "\n".join(repeats) + "\n")
    present, certainty = ref["present"] & (ref["certainty"] > 0), ref["certainty"].copy()
    present[image - 1, attribute - 1], certainty[image - 1, attribute - 1] = (was + 39) % 2, 4
    ann = cub.read_cub_annotations(tmp_path)
    np.testing.assert_array_equal(ann.present, present)
    np.testing.assert_array_equal(ann.certainty, certainty)


def test_unprepared_data_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        cub.load_cub(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)
    assert "prepare_cub" in str(err.value) and "CUB_200_2011" in str(err.value)


def test_split_sizes_and_task_names(prepared):
    ref, data_dir = prepared
    ds = cub.load_cub(data_dir, image_size=(16, 16), process_index=0, process_count=1)
    assert ds.task_names == ref["names"] and ds.num_tasks == 312
    assert ds.num_examples("train") == NUM_TRAIN
    assert ds.num_examples("test") == NUM_IMAGES - NUM_TRAIN
    assert ds.steps_per_epoch("train", 4) == 1
    assert ds.steps_per_epoch("train", 4, drop_remainder=False) == 2
    with pytest.raises(KeyError, match="validation"):
        ds.num_examples("validation")
    # A TFDS slice as a split: its size is the slice's, and batches hold its examples.
    half = cub.load_cub(data_dir, image_size=(16, 16), process_index=0, process_count=1,
                        splits={"train": "train[:50%]"})
    assert half.num_examples("train") == NUM_TRAIN // 2
    assert sum(len(b["labels"]) for b in half.batches("train", 1)) == NUM_TRAIN // 2


@pytest.mark.parametrize("policy", ["keep", "mask"])
def test_batches_match_the_files(prepared, policy):
    ref, data_dir = prepared
    ds = cub.load_cub(data_dir, not_visible=policy, image_size=(16, 12), process_index=0,
                      process_count=1)
    for split, members in (("train", ref["is_train"]), ("test", ~ref["is_train"])):
        batch = epoch(ds, split, 2, shuffle=False)
        assert batch["image"].shape == (members.sum(), 16, 12, 3)
        assert batch["image"].dtype == np.float32
        assert batch["labels"].dtype == np.int32 and batch["label_mask"].dtype == np.bool_
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        rows = image_ids_of(batch["image"], ref) - 1
        assert sorted(rows) == sorted(np.flatnonzero(members))
        np.testing.assert_array_equal(batch["labels"],
                                      ref["present"][rows] & (ref["certainty"][rows] > 0))
        np.testing.assert_array_equal(batch["label_mask"], expected_mask(ref, policy)[rows])
    masked = expected_mask(ref, policy)
    assert not masked[MISSING_PAIR[0] - 1, MISSING_PAIR[1] - 1]
    assert (policy == "mask") == (not masked[ref["certainty"] == 1].any())


def test_task_subsets(prepared):
    ref, data_dir = prepared
    kwargs = dict(image_size=(8, 8), process_index=0, process_count=1)
    for n in cub.SUBSET_SIZES:
        assert cub.load_cub(data_dir, tasks=n, **kwargs).task_names == ref["names"][:n]
    train = ref["is_train"]
    annotated = ref["certainty"][train] > 0
    rate = (ref["present"][train] & annotated).sum(0) / annotated.sum(0)
    top = sorted(range(312), key=lambda a: (-rate[a], a))[:40]
    frequent = cub.load_cub(data_dir, tasks=40, task_order="frequency", **kwargs)
    assert frequent.task_names == tuple(ref["names"][a] for a in top)
    picked = [ref["names"][7], ref["names"][2]]
    ds = cub.load_cub(data_dir, tasks=picked, **kwargs)
    batch = epoch(ds, "test", 4, shuffle=False)
    rows = image_ids_of(batch["image"], ref) - 1
    assert ds.task_names == tuple(picked)
    np.testing.assert_array_equal(batch["labels"], ref["present"][rows][:, [7, 2]])
    with pytest.raises(ValueError, match="tasks=313"):
        cub.load_cub(data_dir, tasks=313, **kwargs)
    with pytest.raises(KeyError, match="no_such"):
        cub.load_cub(data_dir, tasks=["no_such"], **kwargs)


def test_host_shards_are_disjoint_and_cover_the_split(prepared):
    ref, data_dir = prepared
    seen = []
    for index in range(2):
        ds = cub.load_cub(data_dir, image_size=(8, 8), process_index=index, process_count=2)
        assert ds.num_examples("train") == NUM_TRAIN
        assert ds.steps_per_epoch("train", 2) == NUM_TRAIN // 2
        batch = epoch(ds, "train", 2, seed=3)
        assert batch["image"].shape[0] == NUM_TRAIN // 2  # 1 row per batch per process
        seen.append(set(image_ids_of(batch["image"], ref)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(ref["ids"][ref["is_train"]])
    with pytest.raises(ValueError, match="multiple of the process count 2"):
        ds.steps_per_epoch("train", 3)


def test_shuffle_is_deterministic_and_resumable(prepared):
    ref, data_dir = prepared
    ds = cub.load_cub(data_dir, image_size=(8, 8), process_index=0, process_count=1)
    order = {e: image_ids_of(epoch(ds, "train", 1, seed=5, epoch=e)["image"], ref)
             for e in range(3)}
    again = image_ids_of(epoch(ds, "train", 1, seed=5, epoch=1)["image"], ref)
    np.testing.assert_array_equal(order[1], again)
    assert len({tuple(o) for o in order.values()}) > 1  # epochs reshuffle
    resumed = image_ids_of(epoch(ds, "train", 1, seed=5, epoch=1, start=2)["image"], ref)
    np.testing.assert_array_equal(resumed, order[1][2:])
