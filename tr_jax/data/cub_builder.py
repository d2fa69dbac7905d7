"""TFDS builder ``cub2011_attributes``: CUB-200-2011 images with their 312 binary attributes.

Imported lazily by :mod:`tr_jax.data.cub` (it imports TensorFlow Datasets). Reads a manually
downloaded ``CUB_200_2011/`` directory (see ``MANUAL_DOWNLOAD_INSTRUCTIONS``); build it with
``tr_jax.data.cub.prepare_cub(manual_dir, data_dir)``.

Features per image: ``image`` (JPEG, variable size, RGB), ``image_id``, ``file_name``,
``label`` (class in [0, 200)), ``attributes`` bool (312,) is_present, ``certainty`` uint8
(312,) certainty id (0 = no annotation). Dataset metadata: ``attribute_names`` (312),
``not_visible_certainty`` and ``train_positive_rate`` (312,).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tr_jax.data.cub import (MANUAL_DOWNLOAD_INSTRUCTIONS, NUM_ATTRIBUTES, NUM_CLASSES,
                             CubAnnotations, read_cub_annotations)


class Cub2011Attributes(tfds.core.GeneratorBasedBuilder):
    """CUB-200-2011 with the 312 per-image binary attributes and their certainties."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images, classes, 312 attributes with certainties."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Caltech-UCSD Birds-200-2011 with its 312 binary attributes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image_id": np.int32,
                "file_name": tfds.features.Text(),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "attributes": tfds.features.Tensor(shape=(NUM_ATTRIBUTES,), dtype=np.bool_),
                "certainty": tfds.features.Tensor(shape=(NUM_ATTRIBUTES,), dtype=np.uint8),
            }),
            homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        annotations = read_cub_annotations(dl_manager.manual_dir)
        self.info.metadata.update(
            attribute_names=list(annotations.attribute_names),
            not_visible_certainty=annotations.not_visible_certainty,
            train_positive_rate=annotations.train_positive_rate().tolist())
        return {"train": self._generate_examples(annotations, True),
                "test": self._generate_examples(annotations, False)}

    def _generate_examples(self, annotations: CubAnnotations, train: bool):
        for row in np.flatnonzero(annotations.is_train == train):
            path = annotations.image_dir / annotations.file_names[row]
            with Image.open(path) as image:  # reads the header only
                keep_bytes = (image.format, image.mode) == ("JPEG", "RGB")
                # grayscale/CMYK/non-JPEG files are converted and stored as RGB JPEG
                stored = path if keep_bytes else image.convert("RGB")
            yield int(annotations.image_ids[row]), {
                "image": stored,
                "image_id": int(annotations.image_ids[row]),
                "file_name": annotations.file_names[row],
                "label": int(annotations.classes[row]),
                "attributes": annotations.present[row],
                "certainty": annotations.certainty[row],
            }
