"""datatrace.datasets.docstring_texts: real text offline, the standard library's docstrings labelled by group."""

from __future__ import annotations

import re

import numpy as np
import pytest

from datatrace.datasets import DOCSTRING_GROUPS, docstring_texts


def test_every_group_gives_distinct_texts_of_enough_words_in_a_fixed_order():
    texts, labels, names = docstring_texts()
    assert names == list(DOCSTRING_GROUPS)
    assert len(texts) == len(labels) > 500 and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=len(names))
    assert len(counts) == len(names) and counts.min() >= 50  # every class has examples
    assert len(set(texts)) == len(texts)  # duplicates (inherited, re-exported) kept once
    assert all(len(re.findall(r"\w+", t)) >= 5 and len(t) <= 300 and "\n" not in t for t in texts)
    again, labels_again, _ = docstring_texts()
    assert again == texts and np.array_equal(labels_again, labels)


def test_a_chosen_grouping_and_its_labels():
    texts, labels, names = docstring_texts({"maths": ["math"], "paths": ["os.path"]}, max_chars=80)
    assert names == ["maths", "paths"] and set(labels.tolist()) == {0, 1}
    import math

    first_math = next(t for t, y in zip(texts, labels) if y == 0)
    assert any((math.__dict__[name].__doc__ or "").startswith(first_math[:20]) for name in dir(math))
    assert max(len(t) for t in texts) <= 80


def test_a_module_that_does_not_import_is_named():
    with pytest.raises(ValueError, match=r"groups=.*no_such_module_xyz.*Fix"):
        docstring_texts({"a": ["no_such_module_xyz"]})
    with pytest.raises(ValueError, match=r"groups="):
        docstring_texts({})
