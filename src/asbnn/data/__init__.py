"""Data sets: a registry of readers (one module per on-disk format), a decode-once array cache,
CIFAR downloads, and a device-resident batched loader."""

from asbnn.data.dataset import ArrayDataset, DatasetInfo
from asbnn.data.download import download_dataset
from asbnn.data.loader import EVAL_BATCH, DeviceLoader, eval_loader
from asbnn.data.registry import (
    dataset_classes, dataset_info, list_datasets, load_dataset, looks_like_path, resolve_data_root,
)

__all__ = [
    "EVAL_BATCH",
    "ArrayDataset",
    "DatasetInfo",
    "DeviceLoader",
    "dataset_classes",
    "dataset_info",
    "download_dataset",
    "eval_loader",
    "list_datasets",
    "load_dataset",
    "looks_like_path",
    "resolve_data_root",
]
