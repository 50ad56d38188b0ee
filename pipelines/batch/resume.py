"""What a resumed batch run skips: the identities finished by earlier attempts, as a sorted array of 64-bit hashes
put in the object store once by the driver. Tasks get a reference (a few bytes in their arguments) and read the
array zero-copy from shared memory, once per task, instead of unpickling a set of every finished key (Ray Data's
own job checkpointing, `ray.data.checkpoint`, filters with the same structure: see docs/batch.md).

A lookup hashes the key and binary-searches the array. Two different keys share a 64-bit hash with probability
about n^2 / 2^65 (1e-7 at 1.28M keys); such a key would be taken as done and reported as skipped."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def key_hash(identity: str) -> int:
    """Stable 64-bit hash of an input identity (the same on every machine and Python process)."""
    raw = identity.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def hash_array(identities: list[str]) -> np.ndarray:
    return np.fromiter((key_hash(i) for i in identities), np.uint64, count=len(identities))


@dataclass
class DoneKeys:
    """Identities done by earlier attempts (pipelines.batch.manifest.identities), picklable as an object ref."""

    ref: object | None = None  # ray.ObjectRef of the sorted uint64 hashes; None when nothing is done
    count: int = 0
    _hashes: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_identities(cls, identities: pa.Array | pa.ChunkedArray) -> DoneKeys:
        """Hash, sort and put the identities in the object store (driver side; it owns the object)."""
        import ray

        if len(identities) == 0:
            return cls()
        hashes = np.unique(hash_array(pc.unique(identities).to_pylist()))
        return cls(ray.put(hashes), len(hashes), hashes)

    def hashes(self) -> np.ndarray:
        if self._hashes is None:
            import ray

            self._hashes = ray.get(self.ref) if self.ref is not None else np.zeros(0, np.uint64)
        return self._hashes

    def __bool__(self) -> bool:
        return self.count > 0

    def __contains__(self, identity: str) -> bool:
        if not self.count:
            return False
        hashes, h = self.hashes(), np.uint64(key_hash(identity))
        i = int(np.searchsorted(hashes, h))
        return i < len(hashes) and hashes[i] == h

    def __getstate__(self):
        return {"ref": self.ref, "count": self.count, "_hashes": None}  # tasks fetch the array, never a copy
