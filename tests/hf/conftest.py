"""Shared fixtures of the Hugging Face tests."""

import pytest


@pytest.fixture(scope="module")
def transformers():
    """The ``transformers`` module (tests skip without it), its logging quietened."""
    module = pytest.importorskip("transformers")
    module.logging.set_verbosity_error()
    return module
