"""The shared-memory mailbox on a real buffer: order, wrap-around, the sleep handshake, and
records the client must refuse."""

import numpy as np
import pytest

from ringfeed.layout import mailbox_bytes
from ringfeed.mailbox import Mailbox, MailboxLost, open_mailbox
from ringfeed.protocol import FLAG_COPY, BatchMsg, ProtocolError


def pair(capacity=4, k=1):
    base = np.zeros(3 * mailbox_bytes(capacity), np.uint8)
    broker, client = open_mailbox(base, 0, capacity, k), open_mailbox(base, 0, capacity, k)
    broker.assign(77)
    client.attach(77)
    return broker, client


def records(first, n):
    return [BatchMsg(slot=s % 5, flags=FLAG_COPY * (s % 2), epoch=s // 3, index=s % 3, seq=s)
            for s in range(first, first + n)]


def test_records_arrive_in_order_across_many_wraps():
    broker, client = pair(capacity=4)
    seq = 0
    for n in [1, 3, 4, 2, 4, 1, 1, 4] * 5:
        assert broker.publish(records(seq, n), more_coming=True) is False  # the client never asked for a WAKE
        assert client.take(slots=5) == records(seq, n)
        seq += n
    assert client.take(slots=5) == []


def test_a_sleeping_client_is_woken_once_and_a_late_record_stops_the_sleep():
    broker, client = pair()
    assert client.sleep() is True  # nothing there: sleep, and ask for a WAKE
    assert broker.publish(records(0, 1), more_coming=True) is True
    assert broker.publish(records(1, 1), more_coming=True) is False  # one WAKE per sleep
    assert client.sleep() is False  # records are waiting: don't sleep
    assert [r.seq for r in client.take(slots=5)] == [0, 1]


def test_a_client_that_wants_several_records_is_woken_once_they_are_all_there():
    broker, client = pair(capacity=8)
    client.take(slots=5)
    assert client.sleep(wake_after=3) is True
    assert broker.publish(records(0, 1), more_coming=True) is False
    assert broker.publish(records(1, 1), more_coming=True) is False
    assert broker.publish(records(2, 1), more_coming=True) is True
    assert len(client.take(slots=5)) == 3
    assert client.sleep(wake_after=3) is True
    assert broker.publish(records(3, 1), more_coming=False) is True  # nothing more is being made: wake now


def test_mailboxes_are_separate():
    base = np.zeros(2 * mailbox_bytes(4), np.uint8)
    a, b = open_mailbox(base, 0, 4, 0), open_mailbox(base, 0, 4, 1)
    a.assign(1)
    b.assign(2)
    a.publish(records(0, 2), more_coming=True)
    reader = Mailbox(base, 0, 4)
    reader.attach(1)
    assert len(reader.take(slots=5)) == 2


def test_a_reassigned_mailbox_is_not_read_by_its_old_owner():
    broker, client = pair()
    broker.publish(records(0, 2), more_coming=True)
    broker.assign(78)
    with pytest.raises(MailboxLost):
        client.take(slots=5)


@pytest.mark.parametrize("tamper, fragment", [
    (lambda ctl: ctl.__setitem__(1, 99), "99 new records, expected 0 to 4"),
    (lambda ctl: None, "record for slot 4, expected 0 to 3"),
])
def test_bad_records_are_refused(tamper, fragment):
    broker, client = pair()
    broker.publish(records(4, 1), more_coming=True)  # slot 4
    tamper(broker._ctl)
    with pytest.raises(ProtocolError, match=fragment):
        client.take(slots=4)
