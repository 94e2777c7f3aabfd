"""ListPrefix behaves as the list slice it stands for, and keeps doing so as the list grows."""

import copy
import pickle
import random

import pytest

from loraplex.engine.list_prefix import ListPrefix


@pytest.mark.parametrize("seed", range(5))
def test_reads_like_the_slice_it_was_made_from_even_after_the_list_grows(seed):
    rng = random.Random(seed)
    items = [rng.randrange(100) for _ in range(rng.randrange(0, 30))]
    start = rng.randrange(0, len(items) + 1)
    stop = rng.choice([None, rng.randrange(start, len(items) + 1)])
    prefix, expected = ListPrefix(items, start, stop), items[start:stop]
    items.extend(rng.randrange(100) for _ in range(10))  # the sequence goes on after the output was made
    assert len(prefix) == len(expected)
    assert list(prefix) == expected and prefix == expected and expected == prefix
    assert prefix == ListPrefix(expected) and prefix != tuple(expected)  # as a list compares
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
    with pytest.raises(ValueError):
        prefix[::0]
    for value in range(100):
        assert prefix.count(value) == expected.count(value) and (value in prefix) == (value in expected)
    if expected:
        assert prefix.index(expected[-1]) == expected.index(expected[-1])
    assert list(reversed(prefix)) == expected[::-1]


def test_is_not_hashable_like_the_list_it_equals():
    with pytest.raises(TypeError):
        hash(ListPrefix([1, 2]))


def test_bounds_outside_the_list_are_refused():
    for start, stop in ((-1, None), (2, 1), (0, 4)):
        with pytest.raises(ValueError, match="start"):
            ListPrefix([1, 2, 3], start, stop)


def test_pickles_and_copies_only_its_own_items():
    items = list(range(10))
    prefix = ListPrefix(items, 2, 5)
    for copied in (pickle.loads(pickle.dumps(prefix)), copy.deepcopy(prefix)):
        assert copied == [2, 3, 4] and copied._items == [2, 3, 4]
