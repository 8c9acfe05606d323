"""How wide a call's chunks are: the setting, capped by the work (a pure function of lengths)."""

from __future__ import annotations

from .batching import SHORTEST_BUCKET, power_of_two_bucket, round_up

# A cap never goes below this (the default chunk): the cap saves memory only for wide chunks, and a
# default run keeps its steps whatever the work.
SMALLEST_CHUNK_CAP = 64


def capped_chunk(setting: int, longest: int, max_length: int | None) -> int:
    """The chunk for a call whose pieces have at most ``longest`` positions (a window at most
    ``max_length``): ``setting``, capped at that length rounded up to its bucket, and at least
    SMALLEST_CHUNK_CAP.

    A padded row's chunks beyond its piece hold only padding, and a huge setting is allocated all
    the same (--chunk_size 100000000: terabytes). A packed row holds pieces end to end, but a wider
    chunk costs memory (the mLSTM runs a chunk with branches as one segment: the square of its
    width) for no fewer padded positions.

    A padded batch's length is then a power-of-two bucket of its longest row, below either chunk,
    so it runs the same one-chunk step as under the setting (a batch running fewer rows only pads
    that chunk less); packed rows run chunks of the capped width, which the model contract makes
    agree with any other. A setting above the cap scores exactly as the cap given as the setting.
    """
    if max_length is not None:
        longest = min(longest, max_length)
    return min(setting, max(power_of_two_bucket(longest), SMALLEST_CHUNK_CAP))


def padded_length(length: int, chunk: int, has_state: bool, max_length: int | None) -> int:
    """The padded length of a batch whose longest row has ``length`` tokens, run in ``chunk``-wide
    steps (a stateless model: one window of at most ``max_length``)."""
    if not has_state:
        return power_of_two_bucket(length, maximum=max_length)
    if chunk <= SHORTEST_BUCKET:
        return round_up(length, chunk)
    # The last chunk (the only one of short rows: multiple-choice branches, short requests) is
    # padded to a power of two below the chunk size rather than to a full chunk: at most two more
    # step shapes (16 and 32, ...).
    full = length - length % chunk
    tail = length - full
    return full + min(power_of_two_bucket(tail), chunk) if tail else length
