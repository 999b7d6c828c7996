"""The backend conformance kit: what a backend plugin's author runs against their own backend.

    from ember.testing import assert_conformant
    assert_conformant(MyBackend)                       # every check; raises with a readable report
    assert_conformant(MyBackend, model="smollm2.gguf") # plus greedy tokens on a real model

or one pytest case per check:

    @pytest.mark.parametrize("check", ember.testing.CHECKS)
    def test_conformance(check):
        ember.testing.run_check(check, MyBackend)

Every in-tree backend and the third-party example in tests/ pass it in CI (tests/test_conformance.py).
"""
from ember.testing.conformance import (CHECKS, ConformanceFailure, ReferenceBackend, assert_conformant,
                                       run_check)

__all__ = ["CHECKS", "ConformanceFailure", "ReferenceBackend", "assert_conformant", "run_check"]
