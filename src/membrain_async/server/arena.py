"""The value arena: memcached-style slabs of fixed-size slots, bounded by the store's capacity.

Why: a fresh `bytearray(size)` per put is zero-filled and page-faulted on the put path (about as costly as
receiving the bytes over loopback). Here memory is mapped and faulted in once per slab (MAP_POPULATE), and a
put receives straight into a slot whose pages are already resident. KV blocks of one model all have one
size, so a size class is simply the value size rounded up (8 bytes below 4 KiB, 4 KiB above): nearly every
slot is filled to the byte.

Ownership: a slot is *held* by whoever stores into it (a put in progress, then the stored value) and *pinned*
by readers (a send in flight, a disk write). `release` by the holder makes the slot reusable only once no pin
is left, so a value being sent or written is never overwritten. Empty slabs move to the class that needs
room (re-carved in place when big enough, unmapped otherwise): the arena follows the sizes actually stored.

Single-threaded like the store: every call comes from the server's event loop. Worker threads only read
or fill slot memory while a slot is pinned or held, never touch this bookkeeping.
"""

from __future__ import annotations

import mmap

SLAB_BYTES = 4 << 20  # small values share a slab; larger ones get a slab of their own
_PAGE = 4096


def size_class(size: int) -> int:
    if size < _PAGE:
        return max(8, (size + 7) & ~7)
    return (size + _PAGE - 1) & ~(_PAGE - 1)


def _map(nbytes: int):
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_POPULATE", 0)
    try:
        return mmap.mmap(-1, nbytes, flags=flags)
    except (OSError, ValueError):  # a platform without these flags: plain anonymous memory, faulted below
        mem = mmap.mmap(-1, nbytes)
        view = memoryview(mem)
        for off in range(0, nbytes, _PAGE):
            view[off] = 0
        view.release()
        return mem


class Slot:
    __slots__ = ("slab", "view", "pins", "held", "owner")

    def __init__(self, slab: "Slab", view: memoryview):
        self.slab = slab
        self.view = view
        self.pins = 0
        self.held = False
        self.owner = None  # the store's entry while a stored value lives here


class Slab:
    """One mapping carved into slots of one class. Slots are made on first use: a slab of 8-byte values
    would otherwise cost half a million objects up front."""

    __slots__ = ("cls", "mem", "nbytes", "slots", "count", "nfree", "_whole")

    def __init__(self, cls: int, mem, nbytes: int):
        self.mem = mem
        self.nbytes = nbytes
        self._whole = memoryview(mem)
        self.carve(cls)

    def carve(self, cls: int) -> None:
        self.cls = cls
        self.slots: list[Slot] = []
        self.count = self.nbytes // cls
        self.nfree = self.count

    @property
    def fresh(self) -> bool:
        return len(self.slots) < self.count

    def fresh_slot(self) -> Slot:
        i, cls = len(self.slots), self.cls
        slot = Slot(self, self._whole[i * cls : (i + 1) * cls])
        self.slots.append(slot)
        return slot

    @property
    def empty(self) -> bool:
        return self.nfree == self.count


class Arena:
    def __init__(self, capacity: int, slab_bytes: int = SLAB_BYTES):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.slab_bytes = slab_bytes
        self.mapped = 0
        self._slabs: list[Slab] = []
        self._free: dict[int, list[Slot]] = {}  # released slots, reused first (their pages are warm)
        self._fresh: dict[int, list[Slab]] = {}  # slabs with slots never handed out yet
        self._empty: dict[int, Slab] = {}  # by id: slabs with every slot free, candidates to move to another class
        self.slabs_created = 0
        self.slabs_moved = 0

    def fits(self, size: int) -> bool:
        return size_class(size) <= self.capacity

    def _new_slab_bytes(self, cls: int) -> int:
        target = max(cls, min(self.slab_bytes, self.capacity))
        return target - target % cls

    def alloc(self, size: int) -> Slot | None:
        """A free slot for `size` bytes (a new slab if the capacity allows), or None: the caller evicts."""
        cls = size_class(size)
        free = self._free.get(cls)
        if free:
            slot = free.pop()
        else:
            fresh = self._fresh.get(cls)
            if not fresh:
                nbytes = self._new_slab_bytes(cls)
                if self.mapped + nbytes > self.capacity:
                    return None
                self._add_slab(Slab(cls, _map(nbytes), nbytes))
                self.slabs_created += 1
                fresh = self._fresh[cls]
            slot = fresh[-1].fresh_slot()
            if not fresh[-1].fresh:
                fresh.pop()
        slot.held = True
        slab = slot.slab
        if slab.nfree == slab.count:
            self._empty.pop(id(slab), None)
        slab.nfree -= 1
        return slot

    def _add_slab(self, slab: Slab) -> None:
        self._slabs.append(slab)
        self.mapped += slab.nbytes
        self._fresh.setdefault(slab.cls, []).append(slab)
        self._empty[id(slab)] = slab

    def reclaim_for(self, size: int) -> bool:
        """Give empty slabs of other classes to `size`'s class; True once alloc(size) can succeed."""
        cls = size_class(size)
        for slab in list(self._empty.values()):  # usually none: this is on the put path of a full arena
            if slab.cls == cls:
                continue
            self._remove_slab(slab)
            if slab.nbytes >= cls:
                slab.carve(cls)  # same pages, already resident: no fault, no syscall
                self._add_slab(slab)
                self.slabs_moved += 1
                return True
            # Too small for this class: unmap it and count the room it leaves. Breaking the slab <-> slot
            # cycle lets reference counting free the mapping at once (or when the last stale view of it goes),
            # rather than at some later garbage collection.
            slab.slots = []
            slab._whole = None
            slab.mem = None
            if self.mapped + self._new_slab_bytes(cls) <= self.capacity:
                return True
        return self.mapped + self._new_slab_bytes(cls) <= self.capacity

    def _remove_slab(self, slab: Slab) -> None:
        self._slabs.remove(slab)
        self._empty.pop(id(slab), None)
        self.mapped -= slab.nbytes
        if slab in self._fresh.get(slab.cls, ()):
            self._fresh[slab.cls].remove(slab)
        if slab.slots:
            self._free[slab.cls] = [s for s in self._free.get(slab.cls, []) if s.slab is not slab]

    def release(self, slot: Slot) -> None:
        """The holder gives the slot up; it is reused once no reader pins it."""
        slot.held = False
        slot.owner = None
        if slot.pins == 0:
            self._give_back(slot)

    def pin(self, slot: Slot) -> None:
        slot.pins += 1

    def unpin(self, slot: Slot) -> None:
        slot.pins -= 1
        if slot.pins == 0 and not slot.held:
            self._give_back(slot)

    def _give_back(self, slot: Slot) -> None:
        slab = slot.slab  # a slab moves only when empty and unpinned, so the slot is still one of its own
        slab.nfree += 1
        if slab.nfree == slab.count:
            self._empty[id(slab)] = slab
        self._free.setdefault(slab.cls, []).append(slot)

    def stats(self) -> dict:
        return {
            "mapped": self.mapped,
            "slabs": len(self._slabs),
            "slabs_created": self.slabs_created,
            "slabs_moved": self.slabs_moved,
            "free_slot_bytes": sum(s.nfree * s.cls for s in self._slabs),
            "classes": sorted({s.cls for s in self._slabs}),
        }
