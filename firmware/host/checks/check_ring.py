# The flash ring buffer under real MicroPython: order, wrap, bounded size, restart and power-cut
# recovery, block-sized writes. A "restart" is a new Ring on the same files (RAM is gone).
import os

from check import eq, run, true
from yujing_node.records import DEC, FALSE, FLOAT, INT, NULL, TRUE, Batch
from yujing_node.ring import Ring

PATH = "/ring"
BLOCKS = 4
BSIZE = 112  # 12-byte header + 5 records of 20 bytes


def fresh():
    try:
        for name in os.listdir(PATH):
            os.remove(PATH + "/" + name)
    except OSError:
        pass
    return Ring(PATH, BLOCKS, BSIZE)


def flash_usage():
    """(slot files, total bytes) under the ring's directory."""
    names = os.listdir(PATH)
    return len(names), sum(os.stat(PATH + "/" + n)[6] for n in names)


def fill(ring, first, count):
    b = Batch(1)
    for v in range(first, first + count):
        b.clear()
        b.add(v % 256, 1000 + v, INT, 0, v)
        ring.append(b.record(0))


def drain(ring, limit=1000):
    """Every unsent value, oldest first, consuming as it goes."""
    out = []
    b = Batch(7)
    while len(out) < limit:
        b.clear()
        k = ring.peek(b, 7)
        if not k:
            break
        out.extend(b.ival(i) for i in range(k))
        ring.consume(k)
    return out


def test_geometry_and_empty_start():
    r = fresh()
    eq(r.cap, 5)
    eq(flash_usage(), (0, 0))
    eq(r.pending(), 0)


def test_fifo_order_across_blocks():
    r = fresh()
    fill(r, 0, 13)
    eq(r.pending(), 13)
    eq(drain(r), list(range(13)))
    eq(r.pending(), 0)


def test_writes_whole_blocks_only_when_a_block_fills():
    r = fresh()
    fill(r, 0, 4)
    eq(r.writes, 0, "no flash write before the block is full")
    fill(r, 4, 1)
    eq(r.writes, 1)
    eq(r.bytes_written, flash_usage()[1], "what was written is the slot file, packed")
    # five small readings, each with a timestamp of its own (the worst case for packing): under 2/3 of a block
    true(r.bytes_written < BSIZE * 2 // 3, "packed: %d bytes" % r.bytes_written)
    fill(r, 5, 10)
    eq(r.writes, 3)


def test_wrap_drops_oldest_and_counts_it_file_stays_bounded():
    r = fresh()
    fill(r, 0, 100)  # 20 full blocks: the last BLOCKS of them are still in their slots
    eq(r.pending(), BLOCKS * 5)
    eq(r.dropped, 100 - BLOCKS * 5)
    fill(r, 100, 2)  # starting block 21 will overwrite block 17 once it is written
    eq(r.pending(), BLOCKS * 5 + 2)
    fill(r, 102, 3)
    eq((r.pending(), r.dropped), (BLOCKS * 5, 100 - BLOCKS * 5 + 5))
    eq(flash_usage()[0], BLOCKS, "never more than BLOCKS slot files")
    true(flash_usage()[1] <= BLOCKS * BSIZE, "each at most one block")
    eq(drain(r), list(range(105 - BLOCKS * 5, 105)))


def test_restart_recovers_unsent_full_blocks_and_cursor():
    r = fresh()
    fill(r, 0, 12)  # blocks 1, 2 full; 2 records in RAM
    b = Batch(3)
    r.peek(b, 3)
    r.consume(3)
    tail, tidx = r.cursor()
    r.close()
    r2 = Ring(PATH, BLOCKS, BSIZE)  # reset: the partial RAM block is gone (no RTC copy given)
    r2.restore(tail, tidx)
    eq(drain(r2), [3, 4, 5, 6, 7, 8, 9])


def test_restart_with_rtc_stage_loses_nothing():
    r = fresh()
    fill(r, 0, 12)
    image = bytes(r.stage_image())
    cur = r.cursor()
    r.close()
    r2 = Ring(PATH, BLOCKS, BSIZE)
    r2.restore(cur[0], cur[1], image)
    eq(drain(r2), list(range(12)))


def test_cycle_sync_survives_power_cut_and_keeps_filling_the_block():
    r = fresh()
    fill(r, 0, 7)
    r.sync()
    eq(r.writes, 2)
    r.sync()
    eq(r.writes, 2, "unchanged stage is not rewritten")
    r.close()
    r2 = Ring(PATH, BLOCKS, BSIZE)
    eq(r2.pending(), 7)
    fill(r2, 7, 4)
    eq(drain(r2), list(range(11)))


def test_torn_block_write_is_ignored():
    r = fresh()
    fill(r, 0, 15)  # blocks 1..3 on flash
    r.close()
    with open(PATH + "/3", "r+b") as f:  # power cut while writing block 3 (slot 3): half-written
        f.seek(40)
        f.write(b"\xff" * 30)
    r2 = Ring(PATH, BLOCKS, BSIZE)
    eq(drain(r2), list(range(10)))
    fill(r2, 15, 1)
    true(r2.pending() == 1)


def test_cursor_behind_overwritten_blocks_counts_them_dropped():
    r = fresh()
    fill(r, 0, 40)
    r.close()
    r2 = Ring(PATH, BLOCKS, BSIZE)
    r2.restore(1, 0)  # persisted cursor from long ago: blocks 1..4 were overwritten
    eq(r2.dropped, 20)
    eq(drain(r2), list(range(20, 40)))


def test_another_block_size_starts_afresh_fewer_blocks_remove_slots():
    r = fresh()
    fill(r, 0, 20)
    eq(flash_usage()[0], 4)
    r2 = Ring(PATH, BLOCKS, BSIZE + 20)
    eq(r2.pending(), 0, "blocks of another size are not read")
    r3 = Ring(PATH, 2, BSIZE)
    eq(sorted(os.listdir(PATH)), ["0", "1"])
    true(r3.pending() <= 10)


def test_every_kind_packs_and_unpacks_exactly():
    r = fresh()
    b = Batch(5)
    ts = 1_780_000_000_123
    rows = [
        (0, ts, INT, 0, -1, 0), (1, ts, INT, 0, 2**40 + 7, 0), (2, ts, DEC, -3, -1953384, 0),
        (3, ts + 10_000, NULL, 0, 0, 0x81), (4, ts + 10_000, TRUE, 0, 0, 0),
    ]
    for point, t, kind, exp, value, quality in rows:
        b.add(point, t, kind, exp, value, quality)
    for i in range(5):
        r.append(b.record(i))  # a full block: packed and written
    b2 = Batch(5)
    b2.add(5, ts, FLOAT, 0, -12.625)
    b2.add(6, ts, FALSE)
    b2.add(7, ts, INT, 0, -(2**63))
    b2.add(8, ts, INT, 0, 2**63 - 1)
    b2.add(9, ts, INT, 0, 127)
    for i in range(5):
        r.append(b2.record(i))
    r.close()
    r2 = Ring(PATH, BLOCKS, BSIZE)
    got = Batch(10)
    eq(r2.peek(got, 10), 10)
    want = list(b.buf[: 5 * 20]) + list(b2.buf[: 5 * 20])
    eq(list(got.buf[: 10 * 20]), want, "every byte of every record back as it was")


run(globals())
