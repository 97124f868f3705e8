"""embedcache: run pretrained sequence encoders once, keep their embeddings in verified Zarr stores."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("embedcache")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

from embedcache.reader import EmbeddingStore, open_store  # noqa: E402

__all__ = ["EmbeddingStore", "open_store", "__version__"]
