"""The engine's composition registry: recipes name registrations, the least recently used composition goes
first past --max-compositions, an input's removal or replacement drops what was built of it, and nothing
keeps a dropped composition's inputs alive."""

from __future__ import annotations

import pytest

from loraplex.arithmetic import MergeParams
from loraplex.engine.compositions import Recipe
from loraplex.errors import ErrorKind, LoraplexError
from loraplex.llm import LLM
from loraplex.models.demo import DEMO_ADAPTERS


@pytest.fixture
def engine(demo_dir):
    llm = LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="8MiB",
              max_lora_rank=32, max_compositions=2,
              adapters={n: str(demo_dir / "adapters" / n) for n in DEMO_ADAPTERS})
    return llm.engine


def compose(engine, *inputs: tuple[str, float]) -> str:
    recipe = Recipe(inputs=tuple(inputs), params=MergeParams("cat"))
    name, build = engine.prepare_composition(recipe)
    if build is not None:
        engine.add_composition(name, recipe, build, build())
    return name


def test_the_same_recipe_is_one_composition_and_a_hit(engine):
    first = compose(engine, ("alpha", 0.5), ("beta", 1.0))
    assert compose(engine, ("alpha", 0.5), ("beta", 1.0)) == first
    assert compose(engine, ("alpha", 0.5), ("beta", 2.0)) != first
    stats = engine.stats()
    assert (stats.composition_builds, stats.composition_hits, stats.compositions) == (2, 1, 2)


def test_past_the_capacity_the_least_recently_used_goes(engine):
    a = compose(engine, ("alpha", 1.0), ("beta", 1.0))
    b = compose(engine, ("alpha", 2.0), ("beta", 1.0))
    compose(engine, ("alpha", 1.0), ("beta", 1.0))  # a is used again: b is now the oldest
    c = compose(engine, ("gamma", 1.0), ("beta", 1.0))
    assert a in engine.adapters and c in engine.adapters and b not in engine.adapters
    assert engine.stats().compositions == 2


def test_removing_or_replacing_an_input_drops_its_compositions_and_their_builders(engine, demo_dir):
    uses_alpha = compose(engine, ("alpha", 1.0), ("beta", 1.0))
    other = compose(engine, ("gamma", 1.0), ("beta", 0.5))
    engine.remove_adapter("alpha")
    assert uses_alpha not in engine.adapters and other in engine.adapters
    assert engine.stats().compositions_dropped == 1
    assert len(engine.adapters._builders) == 1  # the dropped one's inputs are not held any more
    engine.add_adapter("gamma", demo_dir / "adapters" / "gamma")  # a new registration of an input
    assert other not in engine.adapters and engine.stats().compositions_dropped == 2
    assert not engine.adapters._builders
    with pytest.raises(LoraplexError) as info:
        compose(engine, ("alpha", 1.0), ("beta", 1.0))
    assert info.value.kind is ErrorKind.NOT_FOUND and info.value.field == "model"


def test_a_build_that_raced_a_replaced_input_is_refused(engine, demo_dir):
    recipe = Recipe(inputs=(("alpha", 1.0), ("beta", 1.0)), params=MergeParams("cat"))
    name, build = engine.prepare_composition(recipe)
    built = build()
    engine.add_adapter("beta", demo_dir / "adapters" / "beta")  # replaced while it was built
    with pytest.raises(LoraplexError) as info:
        engine.add_composition(name, recipe, build, built)
    assert info.value.kind is ErrorKind.CONFLICT and name not in engine.adapters
