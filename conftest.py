"""Test-wide settings: a hypothesis profile for CI (fewer examples, no deadlines)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
