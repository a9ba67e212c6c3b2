"""The origin's book of a round: a microbatch counts as trained only when its backward came home."""

from __future__ import annotations

import threading
import time

import torch

from node.stage.origin import OriginBook
from protocol.envelope import HopSpec

PATH = [HopSpec(0, "me", "127.0.0.1:1"), HopSpec(1, "peer", "127.0.0.1:2"), HopSpec(0, "me", "127.0.0.1:1")]


def test_a_short_round_is_lost_not_smaller():
    book = OriginBook(tokens_per_microbatch=256)
    book.open_round(None, time.monotonic() + 5, threading.Event(), keep_logits=False)
    for microbatch in (0, 1):
        book.add(7, microbatch, torch.zeros(1, 4, dtype=torch.long), PATH)
    book.on_loss(7, 0, 2.5, torch.zeros(1))
    book.on_done(7, 0)
    result = book.close_round(never_started=[2, 3])  # the deadline came before 2 and 3 were fed
    assert result.tokens == 256 and result.losses == {0: 2.5}
    assert result.failed == {1: "timed out", 2: "never started (round deadline or stop)",
                             3: "never started (round deadline or stop)"}
