"""Resource guards of the shared options: checked before any work is done."""

from __future__ import annotations

import pytest

from sinkscope.cli.options import parse_selection
from sinkscope.errors import SinkscopeError


def test_huge_selection_is_refused_before_it_is_expanded():
    with pytest.raises(SinkscopeError, match="more than 100,000"):
        parse_selection("0-99999999")
    assert parse_selection("3-6") == [3, 4, 5, 6] and parse_selection("all") is None
