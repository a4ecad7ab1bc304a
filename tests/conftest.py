"""Test configuration: one thread, small hypothesis budgets."""

import os
import sys

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(1)

settings.register_profile(
    "curvopt",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("curvopt")
