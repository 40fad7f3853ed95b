"""Data sets: readers for the supported formats, a decode-once array cache, CIFAR downloads,
and a device-resident batched loader."""

from asbnn.data.download import download_dataset
from asbnn.data.loader import DeviceLoader
from asbnn.data.sources import (
    ArrayDataset,
    DatasetInfo,
    dataset_info,
    list_datasets,
    load_dataset,
    resolve_data_root,
)

__all__ = [
    "ArrayDataset",
    "DatasetInfo",
    "DeviceLoader",
    "dataset_info",
    "download_dataset",
    "list_datasets",
    "load_dataset",
    "resolve_data_root",
]
