"""ListPrefix behaves as the list slice it stands for, and keeps doing so as the list grows."""

import random

import pytest

from loraplex.engine.list_prefix import ListPrefix


@pytest.mark.parametrize("seed", range(5))
def test_reads_like_the_slice_it_was_made_from_even_after_the_list_grows(seed):
    rng = random.Random(seed)
    items = [rng.randrange(100) for _ in range(rng.randrange(0, 30))]
    start = rng.randrange(0, len(items) + 1)
    prefix, expected = ListPrefix(items, start), items[start:]
    items.extend(rng.randrange(100) for _ in range(10))  # the sequence goes on after the output was made
    assert len(prefix) == len(expected)
    assert list(prefix) == expected and prefix == expected and expected == prefix
    assert prefix == tuple(expected) and prefix == ListPrefix(expected)
    assert prefix != expected + [0]
    for i in range(-len(expected), len(expected)):
        assert prefix[i] == expected[i]
    for index in (len(expected), -len(expected) - 1):
        with pytest.raises(IndexError):
            prefix[index]
    for _ in range(50):
        a, b = rng.randrange(-35, 35), rng.randrange(-35, 35)
        step = rng.choice([None, 1, 2, 3, -1, -2])
        assert prefix[a:b:step] == expected[a:b:step], (a, b, step)
    assert prefix[:] == expected and prefix[::-1] == expected[::-1]
    assert bool(prefix) == bool(expected)
    if expected:
        assert expected[-1] in prefix and prefix.index(expected[-1]) == expected.index(expected[-1])


def test_is_not_hashable_like_the_list_it_equals():
    with pytest.raises(TypeError):
        hash(ListPrefix([1, 2]))
