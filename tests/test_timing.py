"""tests/timing.py, run on a suite of its own: a test not marked slow that took too long is named
at the end of the run; one marked slow, chaos or bench is not."""

from __future__ import annotations

from tests import timing


def test_only_unmarked_tests_that_took_too_long_are_named(pytester, monkeypatch):
    monkeypatch.setattr(timing, "SLOW_SECONDS", 0.0)  # every test is "too long": only the markers decide
    pytester.makeini('[pytest]\nmarkers =\n    slow: x\n    chaos: x\n    bench: x\n')
    pytester.makepyfile(
        test_inner="""
        import pytest

        def test_unmarked():
            pass

        @pytest.mark.slow
        def test_marked_slow():
            pass

        @pytest.mark.chaos
        def test_marked_chaos():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:asyncio", "-p", "tests.timing", "--strict-markers")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*unmarked tests that took 0 s or more*", "*s test_inner.py::test_unmarked"])
    assert "test_marked_slow" not in result.stdout.str()
    assert "test_marked_chaos" not in result.stdout.str()


def test_nothing_is_named_when_every_test_was_quick(pytester):
    pytester.makepyfile(test_inner="def test_quick():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:asyncio", "-p", "tests.timing")
    result.assert_outcomes(passed=1)
    assert "unmarked tests" not in result.stdout.str()
