"""Locust users for bnserve: realistic single-example traffic that checks every answer's content.

Requests are validation rows written by ``benchmarks/loadtest.py`` (``BNSERVE_LOADTEST_REQUESTS``):
most by position, some by feature name, a small share of batches and health checks. Every answer
is checked, not only its status: the class is one of the model's, its index matches its name, the
probabilities cover every class and sum to 1, the model version is the one served, and when the
served model is the one the rows were made from, the class equals the numpy reference's.

At the end the run fails (exit code 1) when any request failed or p99 exceeds
``BNSERVE_LOADTEST_P99_MS``; the final figures go to ``BNSERVE_LOADTEST_SUMMARY`` (JSON), since
locust's CSV files are written on a timer and can miss the last seconds.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from locust import FastHttpUser, events, task
from locust.env import Environment

SPEC: dict[str, Any] = {}
P99_ENV = "BNSERVE_LOADTEST_P99_MS"
JSON = {"Content-Type": "application/json"}


@events.test_start.add_listener
def load_requests(environment: Environment, **_: Any) -> None:
    with open(os.environ["BNSERVE_LOADTEST_REQUESTS"]) as f:
        SPEC.update(json.load(f))


@events.quitting.add_listener
def judge(environment: Environment, **_: Any) -> None:
    total = environment.stats.total
    p99 = total.get_response_time_percentile(0.99) or 0.0
    limit = float(os.environ.get(P99_ENV, "inf"))
    verdicts = []
    if total.num_failures:
        verdicts.append(f"{total.num_failures} of {total.num_requests} requests failed")
    if p99 > limit:
        verdicts.append(f"p99 {p99:.1f} ms is over the limit of {limit:g} ms")
    if not total.num_requests:
        verdicts.append("no request was made")
    environment.process_exit_code = 1 if verdicts else 0
    if path := os.environ.get("BNSERVE_LOADTEST_SUMMARY"):
        figures = {
            "requests": total.num_requests,
            "failures": total.num_failures,
            "rps": total.total_rps,
            **{f"p{q}_ms": total.get_response_time_percentile(q / 100) for q in (50, 95, 99)},
            "p99_limit_ms": limit,
            "verdicts": verdicts,
        }
        with open(path, "w") as f:
            json.dump(figures, f)
    print("loadtest verdict: " + ("; ".join(verdicts) if verdicts else "pass"), flush=True)


class ServiceUser(FastHttpUser):
    # Closed loop: each user sends its next request when the previous answer arrives.
    wait_time = staticmethod(lambda: 0.0)

    def on_start(self) -> None:
        with self.client.get("/model", name="/model", catch_response=True) as r:
            served = r.json()["model_version"] if r.status_code == 200 else None
            if served is None:
                r.failure(f"GET /model answered {r.status_code}")
        self.served_version = served
        # The reference classes hold only if the served model is the one the rows came from.
        self.check_class = served == SPEC["model_version"]

    def _check(self, answer: dict[str, Any], row: int) -> str | None:
        classes = SPEC["class_names"]
        name, index = answer.get("class"), answer.get("class_index")
        if name not in classes or classes.index(name) != index:
            return f"class {name!r} / index {index!r} do not match the classes {classes}"
        probs = answer.get("probabilities", {})
        if sorted(probs) != sorted(classes) or abs(sum(probs.values()) - 1.0) > 1e-5:
            return f"probabilities {probs} do not cover {classes} or do not sum to 1"
        version = answer.get("model_version")
        if version != self.served_version:
            return f"model_version {version!r}, /model says {self.served_version!r}"
        expected = SPEC["expected_classes"][row]
        if self.check_class and name != expected:
            return f"row {row}: class {name!r}, the numpy reference says {expected!r}"
        return None

    def _predict(self, body: dict[str, Any], row: int, name: str) -> None:
        with self.client.post(
            "/predict", json=body, headers=JSON, name=name, catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
            elif (problem := self._check(r.json(), row)) is not None:
                r.failure(problem)

    @task(70)
    def predict_by_position(self) -> None:
        row = random.randrange(len(SPEC["rows"]))
        self._predict({"features": SPEC["rows"][row]}, row, "/predict (by position)")

    @task(20)
    def predict_by_name(self) -> None:
        row = random.randrange(len(SPEC["rows"]))
        features = dict(zip(SPEC["feature_names"], SPEC["rows"][row], strict=True))
        self._predict({"features": features}, row, "/predict (by name)")

    @task(5)
    def predict_batch(self) -> None:
        rows = random.sample(range(len(SPEC["rows"])), k=random.randint(2, 16))
        body = {"instances": [SPEC["rows"][i] for i in rows]}
        with self.client.post(
            "/predict/batch", json=body, headers=JSON, name="/predict/batch", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
                return
            answers = r.json().get("predictions", [])
            if len(answers) != len(rows):
                r.failure(f"{len(answers)} predictions for {len(rows)} instances")
                return
            for answer, row in zip(answers, rows, strict=True):
                if (problem := self._check(answer, row)) is not None:
                    r.failure(problem)
                    return

    @task(3)
    def readyz(self) -> None:
        with self.client.get("/readyz", name="/readyz", catch_response=True) as r:
            if r.status_code != 200 or r.json().get("ready") is not True:
                r.failure(f"not ready: {r.status_code} {r.text[:200]}")

    @task(2)
    def livez(self) -> None:
        with self.client.get("/livez", name="/livez", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
