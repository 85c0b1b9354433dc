"""Writes tests/fixtures/sweep/parzen.json: Optuna's Parzen estimator (the density TPE
ranks candidates by) on fixed observations, for src/sweep/tpe.rs to match.

    python3 -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install optuna
    /tmp/optvenv/bin/python scripts/optuna_parzen_cases.py
"""
import json
import pathlib

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator, _ParzenEstimatorParameters
from optuna.samplers._tpe.sampler import default_weights

PARAMS = _ParzenEstimatorParameters(
    prior_weight=1.0,
    consider_magic_clip=True,
    consider_endpoints=False,
    weights=default_weights,
    multivariate=False,
)

CASES = [
    ("uniform", {"min": -2.0, "max": 3.0}, FloatDistribution(-2.0, 3.0), [0.1, 0.3, -1.5, 2.9], np.linspace(-2.0, 3.0, 11)),
    ("uniform_one", {"min": 0.0, "max": 1.0}, FloatDistribution(0.0, 1.0), [0.9], np.linspace(0.0, 1.0, 6)),
    ("uniform_none", {"min": 0.0, "max": 1.0}, FloatDistribution(0.0, 1.0), [], np.linspace(0.0, 1.0, 6)),
    ("log", {"min": 1e-5, "max": 1e-1, "distribution": "log_uniform_values"}, FloatDistribution(1e-5, 1e-1, log=True), [1e-3, 2e-3, 5e-2], np.geomspace(1e-5, 1e-1, 9)),
    ("int", {"min": 4, "max": 32}, IntDistribution(4, 32), [8, 8, 12, 30, 5], np.arange(4, 33, 4)),
    ("int_log", {"min": 1, "max": 64, "distribution": "log_uniform_values"}, IntDistribution(1, 64, log=True), [2, 16, 17], np.array([1, 2, 3, 8, 16, 40, 64])),
    ("categorical", {"values": ["a", "b", "c"]}, CategoricalDistribution(["a", "b", "c"]), [0, 2, 2], np.array([0, 1, 2])),
    # Past 25 observations the older kernels weigh less (the ramp).
    ("uniform_many", {"min": 0.0, "max": 10.0}, FloatDistribution(0.0, 10.0), list(np.linspace(0.5, 9.5, 30) ** 1.0), np.linspace(0.0, 10.0, 7)),
]

cases = []
for name, spec, dist, obs, points in CASES:
    pe = _ParzenEstimator({"p": np.asarray(obs, dtype=float)}, {"p": dist}, PARAMS)
    log_pdf = pe.log_pdf({"p": np.asarray(points, dtype=float)})
    cases.append(
        {
            "name": name,
            "parameter": spec,
            "observations": [float(o) for o in obs],
            "points": [float(x) for x in points],
            "log_pdf": [float(v) for v in log_pdf],
        }
    )

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/sweep/parzen.json"
out.write_text(json.dumps({"optuna": optuna.__version__, "cases": cases}, indent=1) + "\n")
print(f"{out}: {len(cases)} cases (optuna {optuna.__version__})")
