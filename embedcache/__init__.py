"""embedcache: run pretrained sequence encoders once, keep their embeddings in verified Zarr stores."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("embedcache")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

from embedcache.reader import EmbeddingStore, open_store  # noqa: E402

__all__ = ["EmbeddingStore", "open_store", "open_dataset", "__version__"]


def __getattr__(name: str):
    # xarray is imported on first use only: it doubles the start-up time of the CLIs, which never need it.
    if name == "open_dataset":
        from embedcache.dataset import open_dataset

        return open_dataset
    raise AttributeError(f"module 'embedcache' has no attribute {name!r}")
