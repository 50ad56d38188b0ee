"""`coltran submit KIND JOB.yaml`: what `ray job submit --working-dir . -- python -m <module> JOB.yaml` does,
with Ray 2.60's token authentication handled as a user must (the token goes in the Authorization header).

The token comes from, in order: --token-file, RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token
(Ray's own order). A cluster without token authentication needs none.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

JOB_MODULES = {
    "train": "pipelines.train",
    "preprocess": "pipelines.preprocess",
    "colorize": "pipelines.batch",
    "evaluate": "pipelines.evaluate",
}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def add_arguments(parser) -> None:
    parser.add_argument("kind", choices=sorted(JOB_MODULES), help="which job the YAML file configures")
    parser.add_argument("job_file", help="e.g. jobs/train_all.yaml")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's dashboard/job address (default: $RAY_ADDRESS)")
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    parser.add_argument("--token-file", default=None, help="file holding the cluster's auth token")
    parser.add_argument("--no-wait", action="store_true", help="return after submission")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait before giving up")
    parser.add_argument("--pip", nargs="*", default=None, help="extra pip packages for the job's runtime env")


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster, or {} when no token is configured."""
    token = None
    if token_file:
        token = Path(token_file).read_text().strip()
    elif os.environ.get("RAY_AUTH_TOKEN"):
        token = os.environ["RAY_AUTH_TOKEN"].strip()
    else:
        for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
            if candidate and Path(candidate).is_file():
                token = Path(candidate).read_text().strip()
                break
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit(kind: str, job_file: str, address: str, *, working_dir: str = ".", token_file: str | None = None,
           pip: list[str] | None = None) -> tuple[object, str]:
    from ray.job_submission import JobSubmissionClient

    if not Path(working_dir, job_file).is_file() and not Path(job_file).is_file():
        raise FileNotFoundError(f"job file {job_file} does not exist")
    client = JobSubmissionClient(address, headers=auth_headers(token_file))
    runtime_env = {"working_dir": working_dir, "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    if pip:
        runtime_env["pip"] = pip
    job_id = client.submit_job(entrypoint=f"python -m {JOB_MODULES[kind]} {job_file}", runtime_env=runtime_env)
    return client, job_id


def wait(client, job_id: str, timeout: float | None = None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    start, printed = time.monotonic(), 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        printed = len(logs)
        if status in TERMINAL:
            return status
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"job {job_id} still {status} after {timeout} s")
        time.sleep(2)


def run(args) -> int:
    client, job_id = submit(args.kind, args.job_file, args.address, working_dir=args.working_dir,
                            token_file=args.token_file, pip=args.pip)
    print(f"submitted {args.kind} job {job_id} to {args.address}")
    if args.no_wait:
        return 0
    status = wait(client, job_id, args.timeout)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
