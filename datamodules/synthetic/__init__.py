"""Deterministic synthetic datasets written in the real datasets' on-disk layouts.

The demo, the tests and quick experiments need data that (a) needs no download, (b) is
read by exactly the same reader code as the real dataset, and (c) is learnable by the
models the methods use, but not trivially so. Each generator therefore renders images
that look like the modality (colour, anatomy, distractors) and writes them in the real
folder/CSV/mask conventions described in ``docs/data.md``:

=====================  ==========================================================
``synthetic_polyp``    Kvasir-SEG: ``Kvasir-SEG/{images,masks}/<id>.jpg`` and
                       ``kavsir_bboxes.json``
``synthetic_fundus``   REFUGE: ``Training400/{Glaucoma,Non-Glaucoma}/<g|n>0001.jpg``,
                       ``Annotation-Training400/Disc_Cup_Masks/.../<id>.bmp``
                       (0 cup, 128 rim, 255 background), ``REFUGE-Validation400[-GT]``
``synthetic_cxr``      CheXpert-v1.0-small: ``train.csv``/``valid.csv`` (all columns),
                       ``{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg``
``synthetic_dr``       APTOS 2019: ``train.csv`` (id_code, diagnosis),
                       ``train_images/<id_code>.png``, plus ``lesion_masks/<id_code>.png``
=====================  ==========================================================

Every generator has the signature
``generate_<name>(out_dir, num_images, image_size, seed, **options) -> Path`` and returns
the folder to point the reader at (``out_dir`` itself for all four layouts). Output is a
pure function of the arguments: all randomness comes from :class:`numpy.random.Generator`
objects seeded from ``seed`` (never the global RNGs), each image from its own
``SeedSequence([seed, stream, index])`` so an image does not depend on how many were
drawn before it, and the encoders (PIL JPEG/PNG/BMP) are deterministic, so the same
arguments give byte-identical files with the same library versions.

Diabetic-retinopathy grade rule (``synthetic_dr``): the grade is a function of the number
of lesions, each lesion being one connected component of the lesion mask
(:data:`DR_GRADE_LESION_COUNTS`)::

    0 lesions -> 0,  1-3 -> 1,  4-8 -> 2,  9-15 -> 3,  >= 16 -> 4

Grade 1 images carry microaneurysms only (mild NPDR is "microaneurysms only" in the
international clinical scale); from grade 2 on, haemorrhages and hard exudates appear.
Grades are balanced (a shuffled ``i mod 5`` assignment). The grade written to
``train.csv`` is always recomputed from the lesions actually placed, so the rule holds
exactly even when a very small image has no room for the intended count.

:func:`ensure_synthetic` caches a dataset under ``data_dir/<name>_<hash of parameters>/``
and marks it complete with ``.medmark_synthetic.json``; the data modules call it from
``prepare_data``. Command line::

    python -m datamodules.synthetic synthetic_polyp --out data/polyp --num-images 400 \\
        --image-size 128 --seed 0

Layout of this package: :mod:`~datamodules.synthetic.common` (seeded streams, noise, blobs,
deterministic writing), one module per generator (:mod:`~datamodules.synthetic.polyp`,
:mod:`~datamodules.synthetic.fundus`, :mod:`~datamodules.synthetic.cxr`,
:mod:`~datamodules.synthetic.dr`; :mod:`~datamodules.synthetic.retina` draws the fundus
photographs both retinal generators share), :mod:`~datamodules.synthetic.cache` (registry,
atomic caching) and :mod:`~datamodules.synthetic.cli` (the command line).
"""

from datamodules.synthetic.cache import (
    GENERATOR_VERSION,
    GENERATORS,
    MARKER_NAME,
    ensure_synthetic,
    synthetic_dir,
    synthetic_params,
)
from datamodules.synthetic.cli import main
from datamodules.synthetic.cxr import CHEXPERT_COLUMNS, CHEXPERT_PATHOLOGIES, generate_synthetic_cxr
from datamodules.synthetic.dr import DR_GRADE_LESION_COUNTS, dr_grade_from_lesion_count, generate_synthetic_dr
from datamodules.synthetic.fundus import generate_synthetic_fundus
from datamodules.synthetic.polyp import generate_synthetic_polyp

__all__ = [
    "CHEXPERT_COLUMNS",
    "CHEXPERT_PATHOLOGIES",
    "DR_GRADE_LESION_COUNTS",
    "GENERATORS",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "dr_grade_from_lesion_count",
    "ensure_synthetic",
    "generate_synthetic_cxr",
    "generate_synthetic_dr",
    "generate_synthetic_fundus",
    "generate_synthetic_polyp",
    "main",
    "synthetic_dir",
    "synthetic_params",
]
