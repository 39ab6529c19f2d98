"""Schedules and alerts as code: Cloud Scheduler jobs, log-based metrics, alert policies.

    python3 -m templates.ops schedules   # templates/schedules/*.json -> Cloud Scheduler jobs
    python3 -m templates.ops alerts      # templates/alerts/metrics/*.json -> log-based metrics,
                                         # templates/alerts/policies/*.json -> alert policies
    python3 -m templates.ops check       # render everything offline; exit 1 naming each problem

``templates/deploy.sh schedules`` and ``deploy.sh alerts`` run the first two
(Cloud Build's ``schedules`` and ``alerts`` steps, in the Cloud SDK image, so
this module uses the standard library only). Each file is rendered with
``${VAR}`` placeholders from the environment (:data:`DEFAULTS` fill the
optional ones), checked, then created, or updated when a job, metric or policy
of that name exists, so running the step twice changes nothing.

A schedule launches a Flex Template at ``gs://$BUCKET/templates/<job>/latest.json``
through the Dataflow REST API (``flexTemplates:launch``) as the scheduler's
service account; its parameters are checked against the template's
``metadata.json`` (names and regexes) before anything is created, because a
bad value would otherwise fail only at 5 in the morning. docs/operations.md
is the runbook for every alert.
"""
from __future__ import annotations

import glob
import json
import os
import re
import string
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

ROOT = os.path.dirname(os.path.abspath(__file__))
SCHEDULES_DIR = os.path.join(ROOT, "schedules")
METRICS_DIR = os.path.join(ROOT, "alerts", "metrics")
POLICIES_DIR = os.path.join(ROOT, "alerts", "policies")
# Optional variables and their defaults; the limits mirror configs/default.yaml's status
# section (tests/test_status_deploy.py checks that they agree).
DEFAULTS = {
    "RECS_DATASET": "recs",
    "INPUT_DIR": "gs://${BUCKET}/input",
    "SCHEDULER_TIME_ZONE": "Etc/UTC",
    "DEAD_LETTER_THRESHOLD": "0.01",
    "STALE_WINDOW_SECONDS": "86400",
    "STALE_GRACE_SECONDS": "7200",
}
LAUNCH_URI = ("https://dataflow.googleapis.com/v1b3/projects/{project}/locations/{region}/"
              "flexTemplates:launch")
_CRON = re.compile(r"^(\S+\s+){4}\S+$")


class OpsError(Exception):
    """A file that cannot be deployed; the message names the file and what to fix."""


def environment(env: Mapping[str, str]) -> Dict[str, str]:
    """``env`` with the optional variables filled (defaults may name required ones)."""
    full = dict(env)
    for key, value in DEFAULTS.items():
        if not full.get(key):
            full[key] = string.Template(value).safe_substitute(full)
    return full


def render(path: str, env: Mapping[str, str]) -> Any:
    """A JSON file with every ``${VAR}`` replaced from ``env``; OpsError naming a missing one."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        json.loads(text)
    except ValueError as err:
        raise OpsError(f"{path}: not JSON ({err})") from None
    try:
        rendered = string.Template(text).substitute(env)
    except KeyError as err:
        raise OpsError(f"{path}: set {err.args[0]} (see docs/operations.md)") from None
    except ValueError as err:
        raise OpsError(f"{path}: bad placeholder ({err})") from None
    return json.loads(rendered)


def _files(directory: str) -> List[str]:
    return sorted(glob.glob(os.path.join(directory, "*.json")))


# --------------------------------------------------------------------------- schedules

def _metadata(template: str) -> Dict[str, Any]:
    path = os.path.join(ROOT, template, "metadata.json")
    if not os.path.isfile(path):
        raise OpsError(f"no template {template!r} (templates/{template}/metadata.json); "
                       f"register it in templates/metadata.py and run --write")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def check_parameters(template: str, parameters: Mapping[str, str], where: str) -> None:
    """Every parameter is one of the template's and matches its regexes, as Dataflow checks
    at launch; every required parameter is given."""
    declared = {p["name"]: p for p in _metadata(template).get("parameters", [])}
    for name, value in parameters.items():
        if name not in declared:
            raise OpsError(f"{where}: {template} has no parameter {name!r}")
        if not isinstance(value, str):
            raise OpsError(f"{where}: parameter {name} must be a string, got {value!r}")
        for regex in declared[name].get("regexes", []):
            if not re.match(regex, value):
                raise OpsError(f"{where}: parameter {name}={value!r} does not match "
                               f"{template}'s format ({declared[name].get('helpText', '')})")
    missing = [n for n, p in declared.items() if not p.get("isOptional") and n not in parameters]
    if missing:
        raise OpsError(f"{where}: {template} requires {', '.join(sorted(missing))}")


def schedule_request(path: str, env: Mapping[str, str]) -> Dict[str, Any]:
    """One Cloud Scheduler job, rendered and checked: name, cron, time zone, URI, body."""
    spec = render(path, env)
    for key in ("name", "template", "schedule"):
        if not spec.get(key):
            raise OpsError(f"{path}: needs {key!r}")
    if not re.match(r"^[A-Za-z0-9_-]{1,500}$", spec["name"]):
        raise OpsError(f"{path}: job name {spec['name']!r}: letters, digits, _ and - only")
    if not _CRON.match(spec["schedule"]):
        raise OpsError(f"{path}: schedule {spec['schedule']!r} is not a 5-field cron line")
    parameters = spec.get("parameters", {})
    check_parameters(spec["template"], parameters, path)
    body = {"launchParameter": {
        # Dataflow refuses a second active job of one name: runs of a schedule never overlap.
        "jobName": spec["name"],
        "containerSpecGcsPath": f"gs://{env['BUCKET']}/templates/{spec['template']}/latest.json",
        "parameters": parameters,
    }}
    return {"name": spec["name"], "schedule": spec["schedule"],
            "time_zone": spec.get("time_zone") or env["SCHEDULER_TIME_ZONE"],
            "description": spec.get("description", ""), "template": spec["template"],
            "uri": LAUNCH_URI.format(project=env["PROJECT_ID"], region=env["REGION"]),
            "body": body}


def _gcloud(*args: str, capture: bool = False) -> str:
    proc = subprocess.run(["gcloud", *args], capture_output=capture, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-1:] if capture else []
        raise OpsError(f"gcloud {' '.join(args[:3])} failed (exit {proc.returncode})"
                       + (f": {detail[0]}" if detail else ""))
    return proc.stdout or ""


def _names(listing: str) -> List[str]:
    """Short names from ``gcloud ... list --format=json`` (full resource names shortened)."""
    items = json.loads(listing or "[]")
    return [str(i.get("name", "")).rsplit("/", 1)[-1] for i in items]


def deploy_schedules(env: Mapping[str, str], files: Optional[Sequence[str]] = None) -> None:
    """Create or update one Cloud Scheduler HTTP job per schedule file."""
    requests = [schedule_request(f, env) for f in (files or _files(SCHEDULES_DIR))]
    project, region = f"--project={env['PROJECT_ID']}", f"--location={env['REGION']}"
    account = env.get("SCHEDULER_SERVICE_ACCOUNT") or (
        f"dataflow-launcher@{env['PROJECT_ID']}.iam.gserviceaccount.com")
    existing = set(_names(_gcloud("scheduler", "jobs", "list", project, region,
                                  "--format=json", capture=True)))
    with tempfile.TemporaryDirectory() as tmp:
        for request in requests:
            body = os.path.join(tmp, f"{request['name']}.json")
            with open(body, "w", encoding="utf-8") as handle:
                json.dump(request["body"], handle, sort_keys=True)
            update = request["name"] in existing
            _gcloud("scheduler", "jobs", "update" if update else "create", "http",
                    request["name"], project, region,
                    f"--schedule={request['schedule']}", f"--time-zone={request['time_zone']}",
                    f"--uri={request['uri']}", "--http-method=POST",
                    f"--oauth-service-account-email={account}",
                    "--oauth-token-scope=https://www.googleapis.com/auth/cloud-platform",
                    ("--update-headers" if update else "--headers")
                    + "=Content-Type=application/json",
                    f"--message-body-from-file={body}",
                    f"--description={request['description']}")
            print(f"ops: schedule {request['name']} ({request['schedule']} "
                  f"{request['time_zone']}) launches {request['template']}: "
                  f"{'updated' if update else 'created'}")


# --------------------------------------------------------------------------- alerts

def metric_config(path: str, env: Mapping[str, str]) -> Dict[str, Any]:
    """A log-based metric (Logging API ``LogMetric``), rendered and checked."""
    metric = render(path, env)
    if not metric.get("name") or not metric.get("filter"):
        raise OpsError(f"{path}: a log-based metric needs 'name' and 'filter'")
    return metric


def policy_config(path: str, env: Mapping[str, str]) -> Dict[str, Any]:
    """An alert policy (Monitoring API ``AlertPolicy``) with the notification channels of
    ``ALERT_CHANNELS`` (comma-separated ``projects/P/notificationChannels/ID``)."""
    policy = render(path, env)
    if not policy.get("displayName") or not policy.get("conditions"):
        raise OpsError(f"{path}: an alert policy needs 'displayName' and 'conditions'")
    channels = [c.strip() for c in env.get("ALERT_CHANNELS", "").split(",") if c.strip()]
    if channels:
        policy["notificationChannels"] = channels
    return policy


def deploy_alerts(env: Mapping[str, str]) -> None:
    """Create or update every log-based metric, then every alert policy (by display name)."""
    project = f"--project={env['PROJECT_ID']}"
    metrics = [metric_config(f, env) for f in _files(METRICS_DIR)]
    policies = [policy_config(f, env) for f in _files(POLICIES_DIR)]
    have = set(_names(_gcloud("logging", "metrics", "list", project, "--format=json",
                              capture=True)))
    listed = json.loads(_gcloud("monitoring", "policies", "list", project, "--format=json",
                                capture=True) or "[]")
    by_title = {p.get("displayName"): p.get("name") for p in listed}
    with tempfile.TemporaryDirectory() as tmp:
        for metric in metrics:
            path = os.path.join(tmp, f"metric-{metric['name']}.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(metric, handle, sort_keys=True)
            verb = "update" if metric["name"] in have else "create"
            _gcloud("logging", "metrics", verb, metric["name"], project,
                    f"--config-from-file={path}")
            print(f"ops: log-based metric {metric['name']}: {verb}d")
        for i, policy in enumerate(policies):
            path = os.path.join(tmp, f"policy-{i}.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(policy, handle, sort_keys=True)
            name = by_title.get(policy["displayName"])
            if name:
                _gcloud("monitoring", "policies", "update", name, project,
                        f"--policy-from-file={path}")
            else:
                _gcloud("monitoring", "policies", "create", project,
                        f"--policy-from-file={path}")
            print(f"ops: alert policy {policy['displayName']!r}: "
                  f"{'updated' if name else 'created'}")
        if not env.get("ALERT_CHANNELS"):
            print("ops: ALERT_CHANNELS is empty: the policies open incidents but notify "
                  "no one (docs/operations.md, 'Alerts')")


def check(env: Mapping[str, str]) -> List[str]:
    """Every schedule, metric and policy rendered offline; the problems found."""
    problems = []
    for path in _files(SCHEDULES_DIR):
        try:
            schedule_request(path, env)
        except OpsError as err:
            problems.append(str(err))
    for path, load in ([(p, metric_config) for p in _files(METRICS_DIR)]
                       + [(p, policy_config) for p in _files(POLICIES_DIR)]):
        try:
            load(path, env)
        except OpsError as err:
            problems.append(str(err))
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command not in ("schedules", "alerts", "check"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    env = dict(os.environ)
    if command == "check":
        env = {"PROJECT_ID": "my-project", "REGION": "us-central1", "BUCKET": "my-bucket",
               **env}
    missing = [v for v in ("PROJECT_ID", "REGION", "BUCKET") if not env.get(v)]
    if missing:
        print(f"ops: set {', '.join(missing)} (see docs/deploy.md)", file=sys.stderr)
        return 1
    env = environment(env)
    try:
        if command == "schedules":
            deploy_schedules(env)
        elif command == "alerts":
            deploy_alerts(env)
        else:
            problems = check(env)
            for problem in problems:
                print(f"ops: {problem}", file=sys.stderr)
            return 1 if problems else 0
    except OpsError as err:
        print(f"ops: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
