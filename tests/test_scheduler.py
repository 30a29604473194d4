"""The scheduler on its own: events in, effects out, no process and no socket.

Unit tests of each rule, then property tests over random event sequences
(valid and invalid) that check the slot, lease and delivery invariants after
every step.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringfeed.protocol import ProtocolError
from ringfeed.server.cursors import Failure
from ringfeed.server.ring import SlotState
from ringfeed.server.scheduler import MAX_DEATHS_PER_BATCH, WORKER_INFLIGHT, Scheduler


def scheduler(slots=8, workers=(0, 1), steps=10, ordered=True) -> Scheduler:
    s = Scheduler(slots, workers, steps, ordered)
    for wid in workers:
        s.worker_ready(wid)
    return s


def join(s: Scheduler, identity: bytes, credit=4, job=None, shard=(0, 1), start=(0, 0), frames=False):
    s.join(identity, job, shard, start[0], start[1], credit)
    s.start(identity, frames)


def tasks(s: Scheduler) -> dict[int, list]:
    """worker -> (slot, epoch, index) of the tasks one schedule() hands out."""
    return {effect.worker: [(t.slot, t.epoch, t.index) for t in effect.tasks] for effect in s.schedule()}


def finish(s: Scheduler, worker: int, slots=None) -> None:
    for slot in sorted(s.workers[worker].inflight) if slots is None else slots:
        s.done(worker, slot, 0)


def delivered(s: Scheduler) -> dict[bytes, list]:
    """client -> (seq, epoch, index, failure kind or None) of what deliver() hands out."""
    return {effect.client: [(d.seq, d.epoch, d.index, d.failure and d.failure.kind) for d in effect.items]
            for effect in s.deliver()}


def seq_of(s: Scheduler, slot: int) -> int:
    return s.slots[slot].seq


# -- delivery and credit ---------------------------------------------------------

def test_ordered_delivery_waits_for_the_next_batch_in_sequence():
    s = scheduler(workers=(0,))
    join(s, b"a", credit=3)
    assert tasks(s) == {0: [(7, 0, 0), (6, 0, 1), (5, 0, 2)]}
    finish(s, 0, [5, 6])  # seqs 2 and 1 are made first
    assert delivered(s) == {}
    assert s.slots[5].state is SlotState.READY
    finish(s, 0, [7])
    assert delivered(s) == {b"a": [(0, 0, 0, None), (1, 0, 1, None), (2, 0, 2, None)]}
    assert s.clients[b"a"].leased == {5, 6, 7} and s.leased == 3
    assert all(s.slots[k].state is SlotState.LEASED for k in (5, 6, 7))


def test_unordered_delivery_is_as_batches_finish():
    s = scheduler(workers=(0,), ordered=False)
    join(s, b"a", credit=3)
    tasks(s)
    finish(s, 0, [5])
    assert delivered(s) == {b"a": [(2, 0, 2, None)]}
    finish(s, 0, [7])
    assert delivered(s) == {b"a": [(0, 0, 0, None)]}


def test_credit_bounds_what_is_made_and_an_ack_renews_it_and_frees_slots():
    s = scheduler(slots=8)
    join(s, b"a", credit=100)
    assert s.clients[b"a"].credit == 4  # half the ring
    assert sum(len(t) for t in tasks(s).values()) == 4
    assert tasks(s) == {}
    for wid in s.workers:
        finish(s, wid)
    items = delivered(s)[b"a"]
    assert [seq for seq, *_ in items] == [0, 1, 2, 3] and s.clients[b"a"].credit == 0
    assert tasks(s) == {}  # no credit left
    held = sorted(s.clients[b"a"].leased)
    s.ack(b"a", 2, tuple(held[:2]))
    assert s.leased == 2 and len(s.free) == 6
    assert sum(len(t) for t in tasks(s).values()) == 2


def test_an_unstarted_client_gets_nothing_made():
    s = scheduler()
    s.join(b"a", None, (0, 1), 0, 0, 4)
    assert tasks(s) == {}
    s.start(b"a", frames=False)
    assert tasks(s) != {}


def test_a_worker_gets_at_most_worker_inflight_tasks():
    s = scheduler(slots=64, workers=(0,))
    join(s, b"a", credit=32)
    assert len(tasks(s)[0]) == WORKER_INFLIGHT


# -- worker deaths --------------------------------------------------------------

def test_a_dead_workers_batches_are_recomputed_first_each_alone():
    s = scheduler(slots=16, workers=(0, 1))
    join(s, b"a", credit=4)
    first = tasks(s)
    lost = sorted(seq_of(s, slot) for slot, *_ in first[0])
    s.worker_exit(0)
    assert not s.workers[0].inflight and not s.workers[0].ready
    assert [t.seq for t in s.retask] == lost
    s.worker_ready(0)
    s.ack(b"a", 4, ())  # more credit: new batches are wanted too
    given_out = tasks(s)
    # the first suspect goes alone to the idle worker; the busy one gets nothing while it waits
    assert list(given_out) == [0] and len(given_out[0]) == 1
    assert seq_of(s, given_out[0][0][0]) == lost[0] and s.workers[0].isolated
    finish(s, 0)
    assert not s.workers[0].isolated
    second = tasks(s)
    assert [seq_of(s, slot) for slot, *_ in second[0]] == [lost[1]]


def test_a_batch_that_kills_max_deaths_workers_is_a_worker_crash_at_its_place():
    s = scheduler(slots=8, workers=(0, 1))
    join(s, b"a", credit=3)
    tasks(s)
    victim = min(s.workers[0].inflight, key=lambda k: seq_of(s, k))
    seq = seq_of(s, victim)
    others = sorted(s.workers[0].inflight - {victim})
    finish(s, 0, others)
    for death in range(MAX_DEATHS_PER_BATCH):
        s.worker_exit(0)
        s.fail_poison_batches(-9)
        if death < MAX_DEATHS_PER_BATCH - 1:
            s.worker_ready(0)
            assert [seq_of(s, k) for k, *_ in tasks(s)[0]] == [seq]
    assert not s.retask and not s.deaths
    finish(s, 1)
    items = delivered(s)[b"a"]
    assert [(q, kind) for q, _, _, kind in items] == [(q, "WorkerCrash" if q == seq else None) for q in range(3)]


def test_the_worker_crash_names_the_batch_and_the_exit_code():
    s = scheduler(slots=4, workers=(0,))
    join(s, b"a", credit=1)
    tasks(s)
    for _ in range(MAX_DEATHS_PER_BATCH):
        s.worker_exit(0)
        s.worker_ready(0)
        s.fail_poison_batches(-11)
        tasks(s)
    (effect,) = s.deliver()
    (item,) = effect.items
    assert item.slot is None and (item.epoch, item.index) == (0, 0)
    assert item.failure.kind == "WorkerCrash"
    assert f"killed {MAX_DEATHS_PER_BATCH} workers; the last exited with code -11" in item.failure.message
    assert s.clients[b"a"].credit == 0  # a failure takes its batch's credit


def test_an_error_report_is_delivered_in_the_batchs_place_and_frees_its_slot():
    s = scheduler(workers=(0,))
    join(s, b"a", credit=2)
    tasks(s)
    first, second = sorted(s.workers[0].inflight, key=lambda k: seq_of(s, k))
    s.error(0, first, Failure("ValueError", "bad sample", traceback="tb", sample=3, position=1, worker_pid=9))
    assert s.slots[first].state is SlotState.FREE and first in s.free
    s.done(0, second, 2)
    (effect,) = s.deliver()
    assert [d.failure for d in effect.items][1] is None
    failure = effect.items[0].failure
    assert (failure.kind, failure.sample, failure.position, failure.worker_pid) == ("ValueError", 3, 1, 9)
    assert s.skipped == 2 and s.served == 1


def test_a_worker_that_is_not_replaced_is_retired_once_it_has_exited():
    s = scheduler(slots=8, workers=(0, 1))
    join(s, b"a", credit=2)
    tasks(s)
    with pytest.raises(ProtocolError):
        s.retire_worker(0)  # it still has a task
    s.worker_exit(0)
    assert s.retire_worker(0) is True and list(s.workers) == [1]
    assert tasks(s) == {}  # its batch is a suspect: it waits for worker 1 to be idle
    finish(s, 1)
    assert [seq_of(s, k) for k, *_ in tasks(s)[1]] == [0]
    s.worker_exit(1)
    assert s.retire_worker(1) is False


def test_starved_means_every_slot_is_leased_and_a_client_wants_more():
    s = scheduler(slots=4, workers=(0,))
    join(s, b"a", credit=2)
    join(s, b"b", credit=2)
    tasks(s)
    finish(s, 0)
    s.deliver()
    assert s.leased == 4 and not s.starved()
    s.ack(b"a", 1, ())
    assert s.starved()
    s.ack(b"a", 0, (min(s.clients[b"a"].leased),))
    assert not s.starved()


# -- clients and jobs -----------------------------------------------------------

def test_a_dropped_members_undelivered_batches_go_to_another_member():
    s = scheduler(slots=8, workers=(0,))
    join(s, b"a", credit=2, job="j")
    join(s, b"b", credit=2, job="j")
    tasks(s)
    owned = {c: sorted(s.clients[c].assigned) for c in (b"a", b"b")}
    finish(s, 0)
    delivered(s)
    s.ack(b"a", 2, tuple(s.clients[b"a"].leased))
    tasks(s)  # a gets two more, then leaves before they are made
    lost = sorted(s.clients[b"a"].assigned)
    s.drop(b"a")
    assert s.jobs["j"].members == 1 and list(s.jobs["j"].retask) == lost
    finish(s, 0)  # its slots come back when made: nobody wants them
    assert len(s.free) == 8 - len(s.clients[b"b"].leased)
    s.ack(b"b", 2, tuple(s.clients[b"b"].leased))
    tasks(s)
    assert sorted(s.clients[b"b"].assigned) == lost
    assert sorted(owned[b"a"] + owned[b"b"]) == [0, 1, 2, 3]
    s.drop(b"b")
    assert s.jobs == {} and len(s.free) == 8 - len(s.workers[0].inflight)


def test_a_client_that_leaves_and_comes_back_is_a_new_stream():
    s = scheduler(slots=8, workers=(0,))
    join(s, b"a", credit=2, start=(0, 5))
    tasks(s)
    s.drop(b"a")
    join(s, b"a", credit=2, start=(3, 0))
    s.worker_exit(0)  # the old stream's batches are not retasked to the new one
    assert not s.retask
    s.worker_ready(0)
    assert tasks(s) == {0: [(6, 3, 0), (7, 3, 1)]}  # the slots the old stream's batches had
    finish(s, 0)
    assert delivered(s) == {b"a": [(0, 3, 0, None), (1, 3, 1, None)]}


def test_shards_give_every_nth_batch_of_each_epoch_from_the_start_asked():
    s = scheduler(slots=16, workers=(0,), steps=10)
    join(s, b"a", credit=6, shard=(1, 3), start=(2, 4))
    got = [(epoch, index) for _, epoch, index in tasks(s)[0]]
    assert got == [(2, 4), (2, 7), (3, 1), (3, 4), (3, 7), (4, 1)]


@pytest.mark.parametrize("shard, index", [((1, 3), 2), ((0, 1), 10), ((0, 11), 0)])
def test_a_start_outside_the_shard_is_refused(shard, index):
    s = scheduler(steps=10)
    with pytest.raises(ProtocolError):
        s.check_start(shard, index)
    with pytest.raises(ProtocolError):
        s.join(b"a", None, shard, 0, index, 4)
    assert s.clients == {}


def test_clients_naming_a_job_share_its_cursor_and_other_shards_replace_it():
    s = scheduler()
    join(s, b"a", job="j", start=(1, 2))
    join(s, b"b", job="j", start=(5, 5))  # joins the running stream; its start is ignored
    assert s.clients[b"a"].job is s.clients[b"b"].job and s.jobs["j"].members == 2
    join(s, b"c", job="j", shard=(0, 2))
    assert s.jobs["j"] is s.clients[b"c"].job and s.clients[b"a"].job.members == 2
    s.drop(b"a")
    s.drop(b"b")
    assert s.jobs["j"] is s.clients[b"c"].job  # the old job left without removing the new one


# -- the copy rule and frames clients --------------------------------------------

def test_a_client_is_told_to_copy_once_leases_leave_a_worker_without_a_slot():
    s = scheduler(slots=6, workers=(0, 1))
    join(s, b"a", credit=3)
    join(s, b"b", credit=3)
    tasks(s)
    for wid in s.workers:
        finish(s, wid)
    copies = [d.copy for e in s.deliver() for d in e.items]
    assert copies == [False, False, False, False, True, True]  # 6 - 2 workers = 4 leases, then copies
    assert s.leased == 6


def test_frames_clients_share_half_the_ring_and_their_slots_come_back_when_sent():
    s = scheduler(slots=8, workers=(0, 1))
    join(s, b"r1", credit=4, frames=True)
    join(s, b"r2", credit=4, frames=True)
    tasks(s)
    made = {c: len(s.clients[c].assigned) for c in (b"r1", b"r2")}
    assert sum(made.values()) == 4 and len(s.free) == 4
    join(s, b"local", credit=4)
    tasks(s)
    assert len(s.clients[b"local"].assigned) == 4  # shm clients still get the other half
    for wid in s.workers:
        finish(s, wid)
    effects = {e.client: e for e in s.deliver()}
    assert effects[b"r1"].frames and not effects[b"local"].frames
    assert not any(d.copy for e in effects.values() for d in e.items)
    sending = sorted(s.sending)
    assert len(sending) == 4 and s.leased == 4  # frames' slots are no client's lease
    s.ack(b"r1", 4, ())
    s.ack(b"r2", 4, ())
    assert all(not s.clients[c].assigned for c in (b"r1", b"r2"))
    assert tasks(s) == {}  # slots still on the wire count against the half
    for slot in sending:
        s.sent(slot)
    assert sum(len(t) for t in tasks(s).values()) == 4


# -- invalid events --------------------------------------------------------------

def snapshot(s: Scheduler):
    """Everything the scheduler keeps, as plain values."""
    return (
        [(k.state, k.worker, k.owner and k.owner.identity, k.seq, k.epoch, k.index) for k in s.slots],
        list(s.free),
        {w: (st.ready, sorted(st.inflight), st.isolated) for w, st in s.workers.items()},
        {i: (c.credit, c.frames, c.started, sorted(c.assigned), dict(c.ready), sorted(c.leased),
             c.job.next_seq, list(c.job.retask), c.job.members) for i, c in s.clients.items()},
        sorted(s.jobs), list(s.retask), dict(s.deaths), sorted(s.sending), list(s.pending),
        s.leased, s.served, s.skipped,
    )


def test_invalid_events_raise_protocol_error_and_change_nothing():
    s = scheduler(slots=8, workers=(0, 1))
    join(s, b"a", credit=2)
    tasks(s)
    finish(s, 0)
    delivered(s)
    (held,) = s.clients[b"a"].leased
    (filling,) = s.workers[1].inflight
    bad = [
        lambda: s.done(0, 99, 0),
        lambda: s.done(0, -1, 0),
        lambda: s.done(7, 0, 0),
        lambda: s.error(0, 3, Failure("E", "m")),
        lambda: s.ack(b"a", 1, (99,)),
        lambda: s.ack(b"nobody", 1, ()),
        lambda: s.start(b"nobody", True),
        lambda: s.drop(b"nobody"),
        lambda: s.sent(0),
        lambda: s.worker_exit(5),
        lambda: s.worker_ready(5),
        lambda: s.join(b"a", None, (0, 1), 0, 0, 2),
        lambda: s.ack(b"a", 1, (held, held)),
        lambda: s.ack(b"a", 1, (held, 98)),
        lambda: s.done(0, filling, 0),  # worker 1's slot, reported by worker 0
        lambda: s.done(1, filling, -1),
        lambda: s.retire_worker(1),  # it has a task
    ]
    before = snapshot(s)
    for event in bad:
        with pytest.raises(ProtocolError):
            event()
        assert snapshot(s) == before


# -- properties over random event sequences -----------------------------------

CLIENTS = [b"a", b"b", b"c"]
WORKERS = [0, 1, 2]
SLOTS = 8
STEPS = 6

client_ids = st.sampled_from([b"a", b"b", b"c", b"a", b"b", b"x"])  # b"x" never says HELLO
worker_ids = st.sampled_from(WORKERS + WORKERS + [9])  # 9 does not exist
picks = st.integers(0, 12)  # an index into what the target holds, or a raw (often invalid) slot
mostly = st.sampled_from([True, True, True, False])  # pick a valid target, mostly

EVENTS = {  # kind -> (weight, strategy of its arguments)
    "hello": (3, st.tuples(client_ids, st.sampled_from([None, "j", "k"]), st.sampled_from([(0, 1), (1, 2), (0, 3)]),
                           st.integers(0, 2), st.integers(0, 2), st.integers(1, 6),
                           st.sampled_from([False, True, None]))),  # MODE frames, shm, or not yet
    "mode": (1, st.tuples(client_ids, st.booleans())),
    "ack": (3, st.tuples(client_ids, st.integers(0, 4), st.lists(picks, max_size=3), mostly)),
    "done": (6, st.tuples(worker_ids, picks, mostly, st.integers(0, 2))),
    "error": (1, st.tuples(worker_ids, picks, mostly)),
    "exit": (1, st.tuples(worker_ids, st.integers(-11, 0))),
    "ready": (2, st.tuples(worker_ids)),
    "sent": (2, st.tuples(picks, mostly)),
    "drop": (1, st.tuples(client_ids)),
    "schedule": (5, st.tuples(st.sampled_from([None, None, 1, 2]))),
}


def events(exclude=()):
    kinds = [kind for kind, (weight, _) in EVENTS.items() if kind not in exclude for _ in range(weight)]
    event = st.sampled_from(kinds).flatmap(lambda kind: EVENTS[kind][1].map(lambda args: (kind, *args)))
    return st.lists(event, min_size=20, max_size=80)


class Run:
    """Plays events on a scheduler as the broker would, records what each client was sent,
    and checks every invariant after each step."""

    def __init__(self, ordered: bool):
        self.s = Scheduler(SLOTS, WORKERS, STEPS, ordered)
        for wid in WORKERS:  # as once the service is up
            self.s.worker_ready(wid)
        self.got: dict[int, list] = {}  # id(cursor) -> seqs delivered, per client session
        self.cursors: dict[int, object] = {}

    @staticmethod
    def pick(options, k: int, valid: bool) -> int:
        options = sorted(options)
        return options[k % len(options)] if valid and options else k

    def play(self, event) -> None:
        before = snapshot(self.s)
        try:
            self._apply(event)
        except ProtocolError:
            assert snapshot(self.s) == before, event
        self.check()

    def _apply(self, event) -> None:
        s, kind = self.s, event[0]
        if kind == "hello":
            _, ident, job, shard, epoch, k, credit, frames = event
            index = shard[0] + shard[1] * k
            cursor = s.join(ident, job, shard, epoch, index, credit)
            self.cursors[id(cursor)], self.got[id(cursor)] = cursor, []
            if frames is not None:
                s.start(ident, frames)
        elif kind == "mode":
            s.start(event[1], event[2])
        elif kind == "ack":
            _, ident, credit, ks, valid = event
            leased = sorted(s.clients[ident].leased) if ident in s.clients else []
            releases = {leased[k % len(leased)] for k in ks} if leased else set()
            s.ack(ident, credit, tuple(sorted(releases)) if valid else tuple(ks))
        elif kind in ("done", "error"):
            wid, k, valid = event[1:4]
            slot = self.pick(s.workers[wid].inflight if wid in s.workers else (), k, valid)
            if kind == "done":
                s.done(wid, slot, event[4])
            else:
                s.error(wid, slot, Failure("ValueError", "boom"))
        elif kind == "exit":
            s.worker_exit(event[1])
            s.fail_poison_batches(event[2])
        elif kind == "ready":
            s.worker_ready(event[1])
        elif kind == "sent":
            s.sent(self.pick(s.sending, event[1], event[2]))
        elif kind == "drop":
            s.drop(event[1])
        else:
            self.schedule(event[1])
        self.deliver()

    def schedule(self, limit=None) -> None:
        states = [k.state for k in self.s.slots]
        for effect in self.s.schedule(limit):
            for task in effect.tasks:  # never a slot that was READY or LEASED
                assert states[task.slot] is SlotState.FREE
                assert self.s.slots[task.slot].worker == effect.worker

    def deliver(self) -> None:
        for effect in self.s.deliver():
            cursor = self.s.clients[effect.client]
            got = self.got[id(cursor)]
            for item in effect.items:
                assert item.seq not in got, "a batch was delivered twice to a client"
                got.append(item.seq)
                assert (item.epoch, item.index) == cursor.job.position(item.seq)
                assert (item.slot is None) != (item.failure is None)

    def check(self) -> None:
        s = self.s
        free = list(s.free)
        assert len(free) == len(set(free))
        assert set(free) == {k for k, slot in enumerate(s.slots) if slot.state is SlotState.FREE}
        filling = [k for w in s.workers.values() for k in w.inflight]
        assert len(filling) == len(set(filling))
        assert set(filling) == {k for k, slot in enumerate(s.slots) if slot.state is SlotState.FILLING}
        for wid, w in s.workers.items():
            assert all(s.slots[k].worker == wid for k in w.inflight)
            assert not w.isolated or len(w.inflight) <= 1
        ready = [d.slot for c in s.clients.values() for d in c.ready.values() if d.slot is not None]
        assert len(ready) == len(set(ready))
        assert set(ready) == {k for k, slot in enumerate(s.slots) if slot.state is SlotState.READY}
        leases = [k for c in s.clients.values() for k in c.leased]
        assert s.leased == len(leases) == len(set(leases))
        assert not set(leases) & s.sending
        assert set(leases) | s.sending == {k for k, slot in enumerate(s.slots) if slot.state is SlotState.LEASED}
        assert len(free) + len(filling) + len(ready) + len(leases) + len(s.sending) == SLOTS
        for c in s.clients.values():
            assert set(c.ready) <= set(c.assigned)

    def drain(self) -> None:
        """Workers ready and reliable, every client started and reading: run until each job
        has delivered a whole epoch."""
        s = self.s
        for wid in s.workers:
            s.worker_ready(wid)
        for ident, c in s.clients.items():
            if not c.started:
                s.start(ident, False)
            s.ack(ident, s.max_credit, ())
        for _ in range(20 * STEPS):
            if not s.retask and all(len(self.got[id(c)]) >= STEPS and not c.ready for c in s.clients.values()):
                break
            self.schedule()
            for wid, w in s.workers.items():
                for slot in sorted(w.inflight):
                    s.done(wid, slot, 0)
            self.deliver()
            for slot in sorted(s.sending):
                s.sent(slot)
            for ident, c in s.clients.items():
                s.ack(ident, s.max_credit, tuple(c.leased))
            self.check()


@settings(max_examples=200, deadline=None)
@given(events(), st.booleans())
def test_random_events_keep_every_invariant(events, ordered):
    run = Run(ordered)
    for event in events:
        run.play(event)
    run.drain()
    for cursor in run.s.clients.values():
        assert len(run.got[id(cursor)]) >= STEPS, "a client stopped getting batches"


@settings(max_examples=200, deadline=None)
@given(events(exclude=("drop",)), st.booleans())
def test_without_drops_every_batch_of_an_epoch_is_delivered_once_per_job(events, ordered):
    run = Run(ordered)
    for event in events:
        run.play(event)
    run.drain()
    jobs: dict[int, list] = {}
    for key, cursor in run.cursors.items():
        jobs.setdefault(id(cursor.job), []).extend(run.got[key])
    for cursor in run.cursors.values():
        seqs = jobs[id(cursor.job)]
        per_epoch = cursor.job.per_epoch
        first = [q for q in seqs if q < per_epoch]
        assert sorted(first) == list(range(per_epoch))  # each once
        i, n = cursor.job.shard
        assert {cursor.job.position(q)[1] for q in first} == set(range(i, STEPS, n))
