"""duet.memory: which entries an in-place write reaches."""

from __future__ import annotations

import numpy as np

from duet.memory import Footprints


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def test_a_write_reaches_exactly_the_entries_whose_blocks_it_overlaps() -> None:
    """Against the plain definition, on random blocks that nest, touch and overlap: a block
    ending where a written one starts is not reached; one inside a big written block is."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        footprints = Footprints()
        entries: dict[int, list[tuple[int, int]]] = {}
        for entry_id in range(int(rng.integers(0, 12))):
            blocks = [(int(s), int(n)) for s, n in zip(rng.integers(0, 200, 4),
                                                        rng.integers(1, 40, 4), strict=True)]
            entries[entry_id] = blocks[: int(rng.integers(0, 5))]
            footprints.record(entry_id, entries[entry_id])
        for dropped in list(entries)[::3]:
            footprints.drop(dropped)
            del entries[dropped]
        written = [(int(s), int(n)) for s, n in zip(rng.integers(0, 200, 6),
                                                     rng.integers(1, 60, 6), strict=True)]
        written = written[: int(rng.integers(0, 7))]
        expected = {entry_id for entry_id, blocks in entries.items()
                    if any(_overlaps(b, w) for b in blocks for w in written)}
        assert footprints.reached_by(written) == expected


def test_a_new_footprint_replaces_the_old_one() -> None:
    footprints = Footprints()
    footprints.record(1, [(100, 10)])
    footprints.record(2, [(0, 1)])
    assert footprints.reached_by([(105, 1)]) == {1}
    footprints.record(1, [(500, 10)])  # re-read after a change: its grads moved
    assert footprints.reached_by([(105, 1)]) == set()
    assert footprints.reached_by([(509, 100), (0, 1)]) == {1, 2}
    footprints.drop(1)
    footprints.drop(1)  # twice: a researcher may free a failed op twice
    assert footprints.reached_by([(509, 100)]) == set()


def test_entries_recorded_and_dropped_many_times_stay_exact() -> None:
    """A long pipelined run: entries come and go, models are re-recorded after every step;
    dead rows are compacted away and never reach anyone."""
    rng = np.random.default_rng(5)
    footprints = Footprints()
    entries: dict[int, list[tuple[int, int]]] = {}
    for step in range(2000):
        entry_id = int(rng.integers(0, 40))
        if rng.random() < 0.4:
            footprints.drop(entry_id)
            entries.pop(entry_id, None)
        else:
            blocks = [(int(s), int(n)) for s, n in zip(rng.integers(0, 5000, 8),
                                                        rng.integers(1, 50, 8), strict=True)]
            entries[entry_id] = blocks[: int(rng.integers(0, 9))]
            footprints.record(entry_id, entries[entry_id])
        if step % 7 == 0:
            written = [(int(rng.integers(0, 5000)), int(rng.integers(1, 300)))]
            expected = {e for e, blocks in entries.items()
                        if any(_overlaps(b, w) for b in blocks for w in written)}
            assert footprints.reached_by(written) == expected
    assert footprints._current_table().shape[1] <= 2 * sum(map(len, entries.values())) + 64
