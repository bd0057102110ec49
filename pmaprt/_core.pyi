"""Types of pmaprt._core, the C extension (csrc/): atomics and futex waits on
shared memory, the range-stealing protocol, memfd mappings, buffer copies, the
all-reduce's reduction and the iterator a map's caller sees. Offsets are byte
offsets into a Region's buffer, aligned to the word's width."""
from collections.abc import Iterable, Iterator
from typing import Any, Final

from _typeshed import ReadableBuffer, WriteableBuffer

RANGE_N_MAX: Final[int]
"""The largest count a packed range word holds (2**20 - 1)."""
RANGE_LO_MAX: Final[int]
"""The largest low index a packed range word holds (2**44 - 1)."""
REDUCE_F32: Final[int]
"""reduce_into's kind: float32."""
REDUCE_F64: Final[int]
"""reduce_into's kind: float64."""
REDUCE_I32: Final[int]
"""reduce_into's kind: int32 (sums wrap)."""
REDUCE_I64: Final[int]
"""reduce_into's kind: int64 (sums wrap)."""
REDUCE_F16: Final[int]
"""reduce_into's kind: IEEE float16, accumulated in float32, rounded once to nearest even."""
REDUCE_BF16: Final[int]
"""reduce_into's kind: bfloat16, accumulated in float32, rounded once to nearest even."""
REDUCE_SUM: Final[int]
"""reduce_into's op: sum (divided by divisor when it is not 1: a mean)."""
REDUCE_MIN: Final[int]
"""reduce_into's op: np.minimum (a NaN propagates; of equal values the later source's)."""
REDUCE_MAX: Final[int]
"""reduce_into's op: np.maximum (a NaN propagates; of equal values the later source's)."""

class Region:
    """Atomics and futex waits on a writable, 8-byte aligned shared buffer."""

    def __init__(self, buffer: WriteableBuffer) -> None:
        """Hold a writable view of buffer (released by release() or with the Region)."""
    @property
    def size(self) -> int:
        """The buffer's size in bytes (0 once released)."""
    def release(self) -> None:
        """Release the buffer; every later operation raises ValueError."""
    def load32(self, off: int, /) -> int:
        """The 32-bit word at off."""
    def store32(self, off: int, v: int, /) -> None:
        """Store v (mod 2**32) into the 32-bit word at off."""
    def add32(self, off: int, d: int, /) -> int:
        """Add d to the 32-bit word at off; returns the old value."""
    def load64(self, off: int, /) -> int:
        """The signed 64-bit word at off."""
    def store64(self, off: int, v: int, /) -> None:
        """Store v into the 64-bit word at off."""
    def add64(self, off: int, d: int, /) -> int:
        """Add d to the 64-bit word at off; returns the old value."""
    def cas64(self, off: int, expected: int, new: int, /) -> bool:
        """Compare-and-swap the 64-bit word at off from expected to new."""
    def wait32(
        self, off: int, expected: int, timeout_s: float | None, spin_ns: int, sleepers: int = ..., /
    ) -> bool:
        """Spin spin_ns, then sleep until the word differs from expected (True) or timeout_s passes (False)."""
    def wake32(self, off: int, n: int, /) -> int:
        """Wake up to n sleepers on the 32-bit word at off; returns how many woke."""
    def range_take(self, off: int, maxc: int, mark: int = ..., /) -> tuple[int, int]:
        """The owner takes (lo, c), up to maxc, from the front of its range; recorded at mark."""
    def range_steal(self, off: int, dest: int = ..., /) -> tuple[int, int]:
        """A thief takes (lo, c), the back half of the range; stored into its word dest."""
    def range_put(self, off: int, lo: int, n: int, /) -> bool:
        """Store [lo, lo + n) into the range word at off if it is empty."""
    def range_untake(self, off: int, lo: int, c: int, mark: int, kept: int, /) -> bool:
        """The owner gives [lo, lo + c) back to the front of its range, then stores kept at mark."""
    def range_set(self, off: int, lo: int, n: int, /) -> None:
        """The owner publishes [lo, lo + n) into its empty range word."""
    def range_get(self, off: int, /) -> tuple[int, int]:
        """The (lo, n) of the range word at off."""
    def claim_span(self, next: int, expected: int, span: int, dest: int, /) -> bool:
        """Move [expected, expected + span) from the counter at next into the empty range word dest."""
    def cas64_mark(self, off: int, expected: int, new: int, mark: int, value: int, /) -> bool:
        """cas64, and on success store value at mark."""

class Mapping:
    """A MAP_SHARED mapping of a memfd, unmapped when its last reference goes."""

    def __new__(
        cls, fd: int, size: int, own_fd: bool = False, populate: bool = False, readonly: bool = False
    ) -> Mapping:
        """Map size bytes of fd; own_fd: close fd with the mapping; populate: MAP_POPULATE."""
    def __buffer__(self, flags: int, /) -> memoryview:
        """The mapping's bytes (read-only when readonly)."""
    def __release_buffer__(self, buffer: memoryview, /) -> None:
        """Release a view made by __buffer__."""
    def populate(self, off: int = 0, len: int = -1, /) -> None:
        """Allocate and map the pages of [off, off + len) now (MADV_POPULATE_WRITE), GIL released."""
    @property
    def address(self) -> int:
        """The mapping's start address in this process."""
    @property
    def size(self) -> int:
        """Its size in bytes."""
    @property
    def fd(self) -> int:
        """The memfd it owns, or -1."""
    @property
    def key(self) -> int:
        """A number unique to this mapping in this process."""
    @property
    def exports(self) -> int:
        """Buffer views of it exported now."""

class PieceBudget:
    """The budget of one timed piece of Results: budget in, where it stopped out."""

    def __new__(cls, budget_s: float, dear_item_s: float, clock_stride: int,
                start: int = 0) -> PieceBudget:
        """Run for budget_s seconds, reading the clock per item while items cost over dear_item_s, else per clock_stride items; start: the piece's first index."""
    def cut(self, k: int, /) -> int | None:
        """End the piece after the item in fn if `running` still reads k (another thread): where it ends or ended, else None."""
    @property
    def running(self) -> int | None:
        """The index after the item in fn, or None between items and once the piece has ended."""
    @property
    def budget_s(self) -> float:
        """Seconds the piece may run."""
    @property
    def dear_item_s(self) -> float:
        """Items dearer than this get a clock read each."""
    @property
    def clock_stride(self) -> int:
        """Items per clock read while items are cheaper than dear_item_s."""
    @property
    def stop(self) -> int | None:
        """The index the piece reached (its end), or None until it has ended."""

class WriteTracker:
    """Which pages of this process's private anonymous memory were written since armed (userfaultfd WP_ASYNC, PAGEMAP_SCAN)."""

    def __new__(cls) -> WriteTracker:
        """Open the userfaultfd and /proc/self/pagemap; OSError where the kernel lacks the features."""
    def track(self, addr: int, nbytes: int, /) -> bool:
        """Register and arm the pages covering the range; False where it is not private anonymous memory."""
    def written(self, addr: int, nbytes: int, /) -> bool:
        """Whether a page covering the range was written or dropped since armed (True on any doubt); arms them again."""
    def untrack(self, addr: int, nbytes: int, /) -> None:
        """Stop tracking the pages wholly inside the range."""

class Results(Iterator[Any]):
    """The items of source's pieces in order: lists, tail_type pieces, other iterables."""

    def __new__(cls, source: Iterable[Any], tail_type: type[tuple[Any, ...]]) -> Results:
        """Iterate over source's pieces; a tail_type piece is (fn, seq, start, end[, budget])."""
    def __iter__(self) -> Results:
        """The iterator itself."""
    def __next__(self) -> Any:
        """The next item: of a list piece, fn(seq[i]) of a tail piece, or of another iterable."""

def set_pdeathsig(sig: int, /) -> None:
    """Deliver sig to this process when its parent dies (prctl PR_SET_PDEATHSIG)."""

def memcpy(dst: WriteableBuffer, dst_off: int, src: ReadableBuffer, /) -> int:
    """Copy contiguous src into dst at byte offset dst_off, GIL released; returns the bytes copied."""

def populate(buffer: WriteableBuffer, off: int = 0, len: int = -1, /) -> None:
    """Allocate and map a writable mapped buffer's pages of [off, off + len) now, GIL released."""

def vm_read(pid: int, address: int, dst: WriteableBuffer, dst_off: int, nbytes: int, /) -> int:
    """Copy nbytes at address in process pid into dst at dst_off (process_vm_readv), GIL released."""

def buffer_address(obj: ReadableBuffer, /) -> tuple[int, int]:
    """(address, nbytes) of a contiguous buffer."""

def reduce_into(
    dst: WriteableBuffer,
    dst_off: int,
    srcs: tuple[ReadableBuffer, ...],
    offs: tuple[int, ...],
    n: int,
    kind: int,
    op: int,
    divisor: float,
    generic: bool = False,
    /,
) -> None:
    """dst[i] = (srcs[0][i] op srcs[1][i] op ...) / divisor for n elements, in source order, GIL released."""

ROUND_DONE: Final[int]
"""one_round's status: the round is done (0)."""
ROUND_WAIT_FREE: Final[int]
"""one_round's status code: nothing published; wait for rank (status >> 8)'s FREE, call with phase 0."""
ROUND_WAIT_PUB: Final[int]
"""one_round's status code: published; wait for rank (status >> 8)'s PUB, call with phase 1."""
ROUND_WAIT_RED: Final[int]
"""one_round's status code (split): wait for rank (status >> 8)'s RED, call with phase 2."""
ROUND_MISMATCH: Final[int]
"""one_round's status code: rank (status >> 8)'s stamp differs from this rank's."""
ROUND_IN_PLACE: Final[int]
"""one_round's status code: rank (status >> 8)'s input is lent in place; the caller reduces."""
ROUND_MAX_RANKS: Final[int]
"""The most ranks one_round takes."""
ROUND_LAYOUT: Final[tuple[int, ...]]
"""The collective segment's offsets one_round assumes: H_ABORT, H_BELL, H_SLEEPERS, L_PUB,
L_RED, L_FREE, HEAD, HD_STAMP, HD_SRC_SEG."""

def one_round(
    seg: WriteableBuffer,
    src: ReadableBuffer,
    dst: WriteableBuffer,
    heads: tuple[int, ...],
    reds: tuple[int, ...] | None,
    lines: tuple[int, ...],
    rank: int,
    m: int,
    slots: int,
    stamp: int,
    kind: int,
    op: int,
    divisor: float,
    spin_ns: int,
    phase: int,
    /,
) -> int:
    """One all-reduce round (direct, or split with reds) from `phase` on: ROUND_DONE, or (rank << 8) | a ROUND_* code."""
