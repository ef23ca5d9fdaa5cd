"""The one selection language: globs on qualified names, the most specific pattern wins."""

from __future__ import annotations

import pytest

from lightning_dropout.selection import assign, check_patterns, matches_name, select

SITES = [
    "encoder.layer.0.attention.self.dropout",
    "encoder.layer.0.output.dropout",
    "encoder.layer.1.attention.self.dropout",
    "decoder.drop",
    "head.drop_rate",
]


def test_a_pattern_naming_a_module_matches_everything_below_it() -> None:
    assert matches_name("encoder.layer.0.output.dropout", "encoder")
    assert matches_name("encoder.layer.0.output.dropout", "encoder.layer.0")
    assert not matches_name("encoder2.drop", "encoder")  # a name part, not a prefix string
    assert select(SITES, ["encoder.layer.1", "head"]) == [SITES[2], SITES[4]]


def test_most_specific_pattern_wins_and_star_is_the_catch_all() -> None:
    patterns = ["*", "*attention*", "encoder.layer.1", "encoder.layer.1.attention.self", "head.drop_rate"]
    assert assign(SITES, patterns) == {
        "*": ["encoder.layer.0.output.dropout", "decoder.drop"],
        # "*attention*" first matches the attention module, deeper than encoder.layer.1 ...
        "*attention*": ["encoder.layer.0.attention.self.dropout"],
        "encoder.layer.1": [],
        # ... and a pattern naming the module below it is deeper still
        "encoder.layer.1.attention.self": ["encoder.layer.1.attention.self.dropout"],
        "head.drop_rate": ["head.drop_rate"],
    }


def test_equal_depth_ties_break_on_literal_characters_then_fail() -> None:
    assert assign(["a.b"], ["a.*", "a.b"]) == {"a.*": [], "a.b": ["a.b"]}
    with pytest.raises(ValueError, match="equally specific"):
        assign(["ab.c"], ["a*.c", "*b.c"])


def test_a_pattern_matching_nothing_is_an_error_listing_the_names() -> None:
    with pytest.raises(ValueError, match=r"'decoder\.x' matches no dropout site.*head\.drop_rate"):
        select(SITES, ["decoder.x"])
    with pytest.raises(ValueError, match="matches no dropout site"):
        assign(SITES, ["*", "nothing"])


def test_patterns_are_validated() -> None:
    assert check_patterns("sites", ["a", "b*"]) == ["a", "b*"]
    with pytest.raises(TypeError, match="sites"):
        check_patterns("sites", 3)
    with pytest.raises(TypeError, match="sites"):
        check_patterns("sites", ["a", 3])
    with pytest.raises(ValueError, match="sites"):
        check_patterns("sites", [])
