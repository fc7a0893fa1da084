"""Data sets: their config, the registry of names (``registry.py``), and the explicit prepare step.

``DataConfig.name`` is any registered data set (``dataset_names()``): ``imagefolder``,
``stl10``, ``svhn`` (``image_sets.py``), ``shards`` (``shards.py``: WebDataset tar files and one index)
and ``lunarlander`` (``lunarlander.py``; its generation: ``lunarlander_generate.py``). A data set
is opened with ``open_dataset``, which never writes anything; one that this project can make
itself (LunarLander) is made by ``prepare``, which the command line or a study calls before a
run starts. Augmentations are in ``transforms.py``; the sampler and the per-sample seeds that
make resume exact are in ``sampling.py``. An entry also says how probes read a labelled set (its
label names, the samples to read, the groups folds keep whole): the probe, the evaluation and the
studies ask ``label_names``, ``motion_labels``, ``probe_subset`` and ``sample_groups``, never a data set's module.
"""

from launcher.data import image_sets, lunarlander, shards  # noqa: F401  (each registers its data sets)
from launcher.data.registry import (
    CHANNELS,
    BadSample,
    BaseDataset,
    DataConfig,
    DatasetEntry,
    EncodedImage,
    check_readable,
    count_samples,
    data_problems,
    dataset_names,
    encoded_dataset_names,
    label_names,
    motion_labels,
    open_dataset,
    prepare,
    probe_subset,
    register_dataset,
    sample_groups,
)

__all__ = [
    "CHANNELS",
    "BadSample",
    "BaseDataset",
    "DataConfig",
    "DatasetEntry",
    "EncodedImage",
    "check_readable",
    "count_samples",
    "data_problems",
    "dataset_names",
    "encoded_dataset_names",
    "label_names",
    "motion_labels",
    "open_dataset",
    "prepare",
    "probe_subset",
    "register_dataset",
    "sample_groups",
]
