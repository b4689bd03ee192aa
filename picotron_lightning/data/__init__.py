"""The built-in corpus: bytes of the Python standard library, so nothing needs downloading."""

from picotron_lightning.data.corpus import ByteCorpus, StdlibDataModule, stdlib_bytes

__all__ = ["ByteCorpus", "StdlibDataModule", "stdlib_bytes"]
