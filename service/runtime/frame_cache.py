"""Work done once per frame: the vision encoding (and the perception description a text-only model gets) of a
frame that several questions or skills ask about is computed once and reused, within a bounded cache.

Frames are keyed by their content (a 128-bit BLAKE2 digest of the pixels and shape), so a key cannot go stale:
a camera's restarted sequence numbers or an inline copy of a camera frame still map to the right entry. The
digest of an array is remembered while that array lives (camera frames are shared read-only arrays), so a frame
is hashed once however often it is asked about.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
from prometheus_client import Counter

FRAME_CACHE = Counter("incar_frame_cache_lookups_total",
                      "Per-frame results looked up (hit: reused, miss: computed), by what was computed",
                      ["what", "result"])


class FrameCache:
    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._digests: dict[int, tuple[weakref.ref, bytes]] = {}
        self._lock = threading.Lock()

    def digest(self, image: np.ndarray) -> bytes:
        remembered = self._digests.get(id(image))
        if remembered is not None and remembered[0]() is image:
            return remembered[1]
        data = np.ascontiguousarray(image)
        digest = hashlib.blake2b(data.data, digest_size=16, person=repr(image.shape).encode()[:16]).digest()
        try:
            ref = weakref.ref(image, lambda _, key=id(image): self._digests.pop(key, None))
        except TypeError:          # not weak-referenceable: hash it each time
            return digest
        self._digests[id(image)] = (ref, digest)
        return digest

    def get_or_compute(self, what: str, image: np.ndarray, compute: Callable[[np.ndarray], Any]) -> Any:
        """compute(image), or its result for this frame's content from an earlier call."""
        if self.max_entries == 0:
            return compute(image)
        key = (what, self.digest(image))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                FRAME_CACHE.labels(what, "hit").inc()
                return self._entries[key]
        FRAME_CACHE.labels(what, "miss").inc()
        result = compute(image)
        with self._lock:
            self._entries[key] = result
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return result

    def __len__(self) -> int:
        return len(self._entries)
