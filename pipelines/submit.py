"""`coltran submit KIND JOB.yaml`: what `ray job submit --working-dir . -- python -m <module> JOB.yaml` does,
with Ray 2.60's token authentication handled as a user must (the token goes in the Authorization header).

The token comes from, in order: --token-file, RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token
(Ray's own order). A cluster without token authentication needs none.
"""

from __future__ import annotations

import os
import shlex
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
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def add_arguments(parser) -> None:
    parser.add_argument("kind", choices=sorted(JOB_MODULES), help="which job the YAML file configures")
    parser.add_argument("job_file", help="e.g. jobs/train_all.yaml: relative to --working-dir (the job runs "
                        "there), or an absolute path every node can read")
    parser.add_argument("--address", default=None,
                        help=f"the cluster's dashboard/job address (default: $RAY_API_SERVER_ADDRESS, "
                        f"$RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (Ray leaves "
                        "out .git, .venv, __pycache__ and what .gitignore / .rayignore list)")
    parser.add_argument("--token-file", default=None, help="file holding the cluster's auth token")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to the job as --set KEY=VALUE (a job-file field by its dotted path)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the job's driver and workers, e.g. "
                        "MLFLOW_TRACKING_URI=http://mlflow:5000")
    parser.add_argument("--no-wait", action="store_true", help="return after submission")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait before giving up")
    parser.add_argument("--pip", nargs="*", default=None, help="extra pip packages for the job's runtime env")


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster, or {} when no token is configured."""
    token = None
    if token_file:
        token = _read_token(token_file, "--token-file")
    elif os.environ.get("RAY_AUTH_TOKEN", "").strip():
        token = os.environ["RAY_AUTH_TOKEN"].strip()
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = _read_token(os.environ["RAY_AUTH_TOKEN_PATH"], "RAY_AUTH_TOKEN_PATH")
    elif (Path.home() / ".ray" / "auth_token").is_file():
        token = _read_token(str(Path.home() / ".ray" / "auth_token"), "~/.ray/auth_token")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _read_token(path: str, what: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as err:
        raise FileNotFoundError(f"{what} names {path!r}, which cannot be read ({err.strerror}); expected a file "
                                "holding the cluster's auth token") from None
    if not token:
        raise ValueError(f"{what} names {path!r}, which is empty; expected the cluster's auth token")
    return token


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--env {item!r} is not of the form NAME=VALUE")
        env[name.strip()] = value
    return env


def entrypoint(kind: str, job_file: str, overrides: list[str] | None = None) -> str:
    """The job's shell command: `python -m <module> JOB.yaml [--set KEY=VALUE ...]`, quoted for the shell."""
    args = ["python", "-m", JOB_MODULES[kind], job_file]
    for item in overrides or []:
        args += ["--set", item]
    return shlex.join(args)


def submit(kind: str, job_file: str, address: str, *, working_dir: str = ".", token_file: str | None = None,
           pip: list[str] | None = None, overrides: list[str] | None = None,
           env: dict[str, str] | None = None) -> tuple[object, str]:
    from ray.job_submission import JobSubmissionClient

    if not Path(working_dir).is_dir():
        raise NotADirectoryError(f"--working-dir {working_dir!r} is not a directory; expected the project checkout")
    if not Path(working_dir, job_file).is_file():
        raise FileNotFoundError(f"job file {job_file!r} not found in the working directory {working_dir!r} (the job "
                                "runs there); expected a path relative to it, or an absolute path")
    client = JobSubmissionClient(address, headers=auth_headers(token_file))
    runtime_env = {"working_dir": working_dir, "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **(env or {})}}
    if pip:
        runtime_env["pip"] = pip
    job_id = client.submit_job(entrypoint=entrypoint(kind, job_file, overrides), runtime_env=runtime_env)
    return client, job_id


def wait(client, job_id: str, timeout: float | None = None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    start, printed = time.monotonic(), 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in TERMINAL:
            return status
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"job {job_id} still {status} after {timeout} s")
        time.sleep(2)


def run(args) -> int:
    from ray.exceptions import AuthenticationError

    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") \
        or DEFAULT_ADDRESS
    try:
        env = parse_env(args.env)
        client, job_id = submit(args.kind, args.job_file, address, working_dir=args.working_dir,
                                token_file=args.token_file, pip=args.pip, overrides=args.overrides, env=env)
    except AuthenticationError as err:
        print(f"error: {address} refused the submission: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"submitted {args.kind} job {job_id} to {address}", flush=True)
    if args.no_wait:
        return 0
    status = wait(client, job_id, args.timeout)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
