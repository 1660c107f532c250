"""The Locust file's summary says which scenario ran. The file is loaded in a child
process: loading it patches gRPC for gevent, which this test process must not get."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parents[2] / "benchmarks" / "locustfile.py"

CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("locustfile", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
runs = {"mixed": ["InterestUser"], "sessions": ["SessionUser"],
        "both": [cls.__name__ for cls in (module.InterestUser, module.SessionUser)]}
print(json.dumps({name: module.scenario(classes, 16) for name, classes in runs.items()}))
"""


def test_the_summary_names_the_scenario_of_the_user_classes_that_ran():
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(LOCUSTFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["mixed"].startswith("16 closed-loop users (no wait between calls), `recommend`")
    assert "session" not in said["mixed"]
    assert said["sessions"].startswith("16 closed-loop users streaming one event per `session`")
    # No class named: Locust ran both, and the summary must not pass it off as one of them.
    assert said["both"].startswith("16 users shared among 2 kinds (InterestUser, SessionUser")
    assert "`recommend` (top-10)" in said["both"] and "per `session` update" in said["both"]
