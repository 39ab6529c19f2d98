"""Flex Templates and Cloud Build, checked without Docker or a cloud account.

What runs on Google Cloud only (docker build, the launcher VM, Cloud Build) is
exercised around its edges: the metadata is compared with the jobs' option
parsers; the image's install is replayed from the Dockerfile's own COPY lines
into a scratch directory and its entry point is started the way the launcher
starts it; the job graph is translated for Dataflow with ``--dry_run``; and
templates/deploy.sh runs every cloudbuild.yaml step against stub ``docker`` and
``gcloud`` commands (the real gcloud prints the template spec when installed).
"""
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import duckdb
import pytest
import yaml

from templates import metadata as md

REPO = md.REPO_ROOT
TEMPLATES = {t.job: t for t in md.TEMPLATES}
JOBS = sorted(TEMPLATES)
DOCKERFILE = os.path.join(REPO, "templates", "Dockerfile")
DEPLOY = os.path.join(REPO, "templates", "deploy.sh")
CLOUDBUILD = os.path.join(REPO, "cloudbuild.yaml")


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _setup_beam_version():
    tree = ast.parse(_read(os.path.join(REPO, "setup.py")))
    return next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and getattr(node.targets[0], "id", "") == "BEAM_VERSION")


def _dockerfile():
    """(instruction, argument text) per instruction, continuations joined, comments dropped."""
    instructions, pending = [], ""
    for line in _read(DOCKERFILE).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _final_stage():
    instructions = _dockerfile()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _dockerfile_args():
    return dict(re.findall(r"^ARG (\w+)=(\S+)", _read(DOCKERFILE), re.M))


def _env(instructions):
    env = {}
    for keyword, rest in instructions:
        if keyword == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def _workdir():
    return next(rest for keyword, rest in _final_stage() if keyword == "WORKDIR")


def _py_file(job, workdir):
    """FLEX_TEMPLATE_PYTHON_PY_FILE of the job's image, with WORKDIR mapped to ``workdir``."""
    value = _env(_final_stage())["FLEX_TEMPLATE_PYTHON_PY_FILE"].replace("${JOB}", job)
    assert value.startswith(_workdir() + "/")
    return os.path.join(str(workdir), value[len(_workdir()) + 1:])


# --------------------------------------------------------------------------- metadata

def test_registry_and_template_directories_agree():
    on_disk = sorted(name for name in os.listdir(os.path.join(REPO, "templates"))
                     if os.path.isfile(os.path.join(REPO, "templates", name, "metadata.json")))
    assert on_disk == JOBS
    for job in JOBS:
        assert os.path.isfile(os.path.join(REPO, "pipelines", f"{job}.py")), job


@pytest.mark.parametrize("job", JOBS)
def test_metadata_is_json_of_the_documented_shape(job):
    text = _read(os.path.join(REPO, "templates", job, "metadata.json"))
    document = json.loads(text)
    assert md.shape_problems(document) == []
    assert document["name"] and document["description"]
    for param in document["parameters"]:
        assert set(md.REQUIRED_PARAMETER_KEYS) <= set(param), param
        assert isinstance(param["isOptional"], bool)
        for regex in param.get("regexes", []):
            re.compile(regex)
    # The Dataflow API's own message type, when its client library is installed.
    try:
        from google.cloud import dataflow_v1beta3
    except ImportError:
        return
    parsed = dataflow_v1beta3.TemplateMetadata.from_json(text, ignore_unknown_fields=False)
    assert [p.name for p in parsed.parameters] == [p["name"] for p in document["parameters"]]


@pytest.mark.parametrize("job", JOBS)
def test_parameters_are_exactly_the_jobs_options(job):
    template = TEMPLATES[job]
    document = md.read_metadata(template)
    parser = md.job_parser(template)
    actions = {md.action_name(a): a for a in md.option_actions(parser)}
    assert actions, "a job without options cannot take template parameters"
    expected = [name for name in actions if name not in template.exclude]
    assert [p["name"] for p in document["parameters"]] == expected
    for param in document["parameters"]:
        action = actions[param["name"]]
        assert param["isOptional"] is not (action.required
                                           or param["name"] in template.required)
        if action.choices:
            assert [o["value"] for o in param["enumOptions"]] == [str(c) for c in action.choices]
        if action.default not in (None, ""):
            assert param["defaultValue"] == str(action.default)
            for regex in param.get("regexes", []):
                assert re.fullmatch(regex, param["defaultValue"])
    assert md.check_metadata(template, document, parser) == []


def test_beam_runner_options_are_never_parameters():
    reserved = md.beam_flags()
    assert {"--runner", "--project", "--region", "--temp_location"} <= set(reserved)
    for job in JOBS:
        names = {p["name"] for p in md.read_metadata(TEMPLATES[job])["parameters"]}
        assert not {f"--{n}" for n in names} & set(reserved), job


def test_a_new_option_without_metadata_is_reported():
    template = TEMPLATES["batch_recommendations"]
    document = md.read_metadata(template)
    parser = copy.deepcopy(md.job_parser(template))
    parser.add_argument("--fake_option", type=int, default=3, help="An option nobody described.")
    problems = md.check_metadata(template, document, parser)
    assert any("--fake_option" in p and "has no parameter" in p for p in problems), problems
    # ... and regenerating from that parser is what makes the check pass again.
    assert md.check_metadata(template, md.build_metadata(template, parser), parser) == []
    assert md.check_metadata(template, document, md.job_parser(template)) == []


def test_removed_renamed_or_edited_parameters_are_reported():
    template = TEMPLATES["bandit_report"]
    document = md.read_metadata(template)
    stale = copy.deepcopy(document)
    stale["parameters"].append(dict(stale["parameters"][0], name="gone_option"))
    stale["parameters"][1]["helpText"] = "Edited by hand."
    del stale["parameters"][2]
    problems = md.check_metadata(template, stale)
    assert any("'gone_option'" in p and "not an option" in p for p in problems)
    assert any("'helpText'" in p for p in problems)
    missing = document["parameters"][2]["name"]
    assert any(f"--{missing} has no parameter" in p for p in problems)


def test_flags_the_launcher_cannot_pass_are_refused():
    template = TEMPLATES["batch_recommendations"]
    parser = copy.deepcopy(md.job_parser(template))
    parser.add_argument("--dry_mode", action="store_true", help="A switch.")
    parser.add_argument("--skus", nargs="+", help="Several values.")
    parser.add_argument("--region", default="eu", help="Shadows Beam's --region.")
    problems = md.parser_problems(template, parser)
    assert any("'dry_mode'" in p and "takes no value" in p for p in problems)
    assert any("'skus'" in p and "nargs" in p for p in problems)
    assert any("--region is also Beam's" in p for p in problems)


def test_stale_exclusions_and_unregistered_directories_are_reported(tmp_path):
    ghost = md.Template("batch_recommendations", exclude={"no_such_flag": "was removed"})
    assert any("stale exclusion" in p for p in md.parser_problems(ghost, md.job_parser(ghost)))
    shutil.copytree(os.path.join(REPO, "templates"), tmp_path / "templates")
    os.makedirs(tmp_path / "templates" / "orphan")
    (tmp_path / "templates" / "orphan" / "metadata.json").write_text("{}")
    problems = md.check_all(md.TEMPLATES, str(tmp_path / "templates"))
    assert any("templates/orphan/" in p for p in problems)


def test_write_reproduces_the_committed_files_and_check_passes(tmp_path, capsys):
    changed = md.write_all(md.TEMPLATES, str(tmp_path))
    assert len(changed) == 2 * len(JOBS)
    for job in JOBS:
        for name in ("metadata.json", "main.py"):
            assert (tmp_path / job / name).read_text(encoding="utf-8") == _read(
                os.path.join(REPO, "templates", job, name)), f"run {md.REGENERATE}"
    assert md.main(["--check"]) == 0
    assert md.main(["--list"]) == 0
    assert capsys.readouterr().out.split()[-len(JOBS):] == [t.job for t in md.TEMPLATES]


@pytest.mark.parametrize("fmt", md.FORMATS, ids=lambda f: f.description[:24])
def test_every_format_accepts_its_example(fmt):
    assert re.fullmatch(fmt.regex, fmt.example)


@pytest.mark.parametrize("fmt,bad", [
    (md.RFC3339, "yesterday"), (md.RFC3339, "2026-02-28"), (md.RFC3339, "2026-02-28T23:59:43"),
    (md.PATH, "s3://bucket/input"), (md.PATH, "gs://Bad_Bucket/x"), (md.PATH, ""),
    (md.RUN_ID, "a/b"), (md.RUN_ID, "-leading-dash"), (md.ATTRIBUTES, "make, model"),
    (md.BIGQUERY_TABLE, "just_a_table"), (md.SUBSCRIPTION, "orders"),
    (md.TOPIC, "projects/p/subscriptions/s"), (md.INTEGER, "1.5"), (md.NUMBER, "1e"),
    (md.INPUT_TABLE, "../events"), (md.BIGQUERY_PROJECT, "My_Project"),
    (md.PATH, "gs://my-bucket/a/../../b"), (md.PATH, "out/x y"),
])
def test_formats_refuse_malformed_values(fmt, bad):
    assert not re.fullmatch(fmt.regex, bad)


# --------------------------------------------------------------------------- image

def test_dockerfile_beam_version_equals_setup_py():
    args = _dockerfile_args()
    assert args["BEAM_VERSION"] == _setup_beam_version()
    sdk_stage = next(rest for keyword, rest in _dockerfile() if keyword == "FROM"
                     and "beam_python" in rest)
    assert sdk_stage.startswith("apache/beam_python3.11_sdk:${BEAM_VERSION} ")


def test_dockerfile_builds_one_launcher_and_worker_image_without_pip_at_launch():
    froms = [rest for keyword, rest in _dockerfile() if keyword == "FROM"]
    assert any("gcr.io/dataflow-templates-base/python311-template-launcher-base:" in f
               for f in froms)
    assert froms[-1].startswith("python:3.11")  # same Python as the SDK and launcher images
    final = _final_stage()
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert "--from=beam_sdk /opt/apache/beam /opt/apache/beam" in copies
    assert ("--from=launcher /opt/google/dataflow/python_template_launcher "
            "/opt/google/dataflow/python_template_launcher") in copies
    assert ("ENTRYPOINT", '["/opt/apache/beam/boot"]') in final
    env = _env(final)
    for key in ("FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE", "FLEX_TEMPLATE_PYTHON_SETUP_FILE",
                "FLEX_TEMPLATE_PYTHON_EXTRA_PACKAGES"):
        assert env[key] == "", key
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert "pip install . " in runs and "pip install -e" not in runs
    assert "pip check" in runs
    for job in JOBS:
        assert os.path.isfile(_py_file(job, REPO)), job
    for rest in copies:
        if not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert os.path.exists(os.path.join(REPO, source)), source


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The image's /template and site-packages, rebuilt from the Dockerfile's COPY lines.

    Runs the same ``pip install .`` (offline, without dependencies: those are this
    virtualenv's, pinned by the same setup.py), so a module or data file missing
    from the package fails here as it would on the launcher.
    """
    root = tmp_path_factory.mktemp("image")
    workdir, site = root / "template", root / "site-packages"
    for keyword, rest in _final_stage():
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, dest = rest.split()
            for source in sources:
                target = workdir / dest / (os.path.basename(source) if dest.endswith("/") or
                                           dest == "./" else "")
                src = os.path.join(REPO, source)
                if os.path.isdir(src):
                    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    os.makedirs(target.parent, exist_ok=True)
                    shutil.copy(src, target)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
           "--disable-pip-version-check", "--target", str(site), str(workdir)]
    # Offline with this environment's setuptools; else (setuptools too old to build
    # a wheel) with pip's isolated build environment, which needs the index.
    offline = subprocess.run(pip + ["--no-index", "--no-build-isolation"], cwd=root,
                             capture_output=True, text=True)
    if offline.returncode != 0:
        isolated = subprocess.run(pip, cwd=root, capture_output=True, text=True)
        assert isolated.returncode == 0, offline.stderr[-2000:] + isolated.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    found = subprocess.run([sys.executable, "-c", "import pipelines; print(pipelines.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True, check=True)
    assert found.stdout.startswith(str(site)), "the image must not import the source tree"
    return workdir, env, root


@pytest.fixture(scope="module")
def world(image):
    _, env, root = image
    out = root / "world"
    subprocess.run([sys.executable, "-m", "pipelines.generate_world", "--preset", "tiny",
                    "--seed", "3", "--out", str(out)], check=True, env=env, cwd=root,
                   capture_output=True)
    with open(out / "world.json") as handle:
        return str(out), json.load(handle)["as_of"]


def _launcher_argv(job, values):
    """``--name=value`` for the metadata's parameters, each checked against its regexes."""
    argv = []
    for param in md.read_metadata(TEMPLATES[job])["parameters"]:
        name = param["name"]
        if name not in values:
            assert param["isOptional"], f"required parameter {name} has no value"
            continue
        for regex in param.get("regexes", []):
            assert re.fullmatch(regex, values[name]), (name, values[name], regex)
        argv.append(f"--{name}={values[name]}")
    assert len(argv) == len(values), "a value for a parameter the metadata does not offer"
    return argv


def test_launcher_contract_batch_entry_point_publishes(image, world, tmp_path):
    workdir, env, _ = image
    world_dir, as_of = world
    warehouse = tmp_path / "warehouse.duckdb"
    argv = _launcher_argv("batch_recommendations", {
        "input_dir": world_dir, "warehouse": str(warehouse), "as_of": as_of,
        "run_id": "launcher_contract", "num_shards": "4",
        "staging_dir": str(tmp_path / "staging")})
    proc = subprocess.run(
        [sys.executable, _py_file("batch_recommendations", workdir), *argv,
         "--runner=DirectRunner", "--job_name=launcher-contract", "--project=demo-project",
         "--region=us-central1", f"--temp_location={tmp_path / 'temp'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    con = duckdb.connect(str(warehouse), read_only=True)
    tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables")
              .fetchall()}
    assert {"recommendations", "segment_popularity", "qa_checks", "pipeline_runs",
            "dead_letter"} <= tables
    status = con.execute("SELECT status FROM pipeline_runs WHERE run_id = 'launcher_contract'"
                         ).fetchall()
    rows = con.execute("SELECT count(*) FROM recommendations WHERE run_id = 'launcher_contract'"
                       ).fetchone()[0]
    con.close()
    assert status == [("published",)]
    assert rows > 1000


def test_smoke_script_passes_in_the_image(image, tmp_path):
    """templates/smoke.sh, which Cloud Build runs inside each image, passes on its copy.

    Run for a report job: the batch branch of the script repeats the launcher
    contract test above, which is the expensive part.
    """
    workdir, env, _ = image
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("launcher", "boot"):
        (fake_bin / name).write_text("#!/bin/sh\n")
        (fake_bin / name).chmod(0o755)
    smoke_env = {**env, **_env(_final_stage())}  # the image's ENV, then this copy's paths
    smoke_env.update(
        FLEX_TEMPLATE_PYTHON_PY_FILE=_py_file("bandit_report", workdir),
        LAUNCHER_BIN=str(fake_bin / "launcher"), BOOT_BIN=str(fake_bin / "boot"),
        PYTHON=sys.executable, SETUP_PY=str(workdir / "setup.py"),
        SMOKE_DIR=str(tmp_path / "smoke"))
    script = str(workdir / "templates" / "smoke.sh")
    proc = subprocess.run(["sh", script], cwd=tmp_path, env=smoke_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "smoke: bandit_report OK" in proc.stdout
    # ... and it fails when the image would pip-install at launch.
    proc = subprocess.run(["sh", script], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(smoke_env, FLEX_TEMPLATE_PYTHON_SETUP_FILE="/template/setup.py"))
    assert proc.returncode == 1 and "pip-installed at launch" in proc.stderr


def test_launcher_graph_translates_for_dataflow(image, world, tmp_path):
    """What the launcher does on Dataflow: build the graph for the DataflowRunner and exit 0.

    ``--dry_run`` translates and pickles the whole graph offline but submits
    nothing, like a launch that writes the job file; the entry point must then
    return without waiting for the job or reading its outputs locally.
    """
    workdir, env, _ = image
    world_dir, as_of = world
    argv = _launcher_argv("batch_recommendations", {
        "input_dir": world_dir, "warehouse": str(tmp_path / "warehouse.duckdb"),
        "as_of": as_of, "run_id": "dry_run"})
    proc = subprocess.run(
        [sys.executable, _py_file("batch_recommendations", workdir), *argv,
         "--runner=DataflowRunner", "--dry_run=True", "--project=demo-project",
         "--region=us-central1", "--temp_location=gs://demo-bucket/temp",
         "--staging_location=gs://demo-bucket/staging", "--job_name=dry-run",
         "--sdk_container_image=us-central1-docker.pkg.dev/demo-project/dataflow/"
         "segment-recs/batch_recommendations:test", "--sdk_location=container"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


# --------------------------------------------------------------------------- cloud build

def _cloudbuild():
    with open(CLOUDBUILD) as handle:
        return yaml.safe_load(handle)


def test_cloudbuild_parses_and_everything_it_references_exists():
    build = _cloudbuild()
    ids = []
    for step in build["steps"]:
        ids.append(step["id"])
        args = step.get("args", [])
        if args and args[0].endswith(".sh"):
            assert os.path.isfile(os.path.join(REPO, args[0])), args[0]
            # A known subcommand fails on missing configuration, never with the usage (2).
            proc = subprocess.run(["bash", os.path.join(REPO, args[0]), *args[1:]],
                                  env={"PATH": os.environ["PATH"]}, capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode in (0, 1), (args, proc.stderr)
    assert ids[:9] == ["test-image", "test", "images", "smoke", "push", "templates", "schedules",
                   "alerts", "streaming"]
    script = " ".join(build["steps"][1]["args"])
    assert "python -m templates.metadata --check" in script and "pytest" in script
    # The suite runs in the image built from templates/test/Dockerfile (#19), whose
    # Python is the templates' 3.11 (tests/test_status_deploy.py checks that file).
    assert "templates/test/Dockerfile" in build["steps"][0]["args"]
    assert build["steps"][1]["name"] == build["steps"][0]["args"][-2]
    # Every repository path the build, deploy.sh and smoke.sh name, and the image
    # paths (/template/...) they run, exist in the repository.
    text = _read(CLOUDBUILD) + _read(DEPLOY) + _read(os.path.join(REPO, "templates", "smoke.sh"))
    paths = re.findall(r"(?<![\w/$.])((?:templates|tests|pipelines|docs)/[\w./-]*\w)", text)
    paths += [p for p in re.findall(re.escape(_workdir()) + r"/([\w./-]*\w)", text)
              if p != "setup.py"] + ["setup.py"]
    assert "templates/Dockerfile" in paths and "templates/smoke.sh" in paths
    for path in paths:
        assert os.path.exists(os.path.join(REPO, path)), path
    # The templates it builds are exactly the registry's.
    listed = subprocess.run(["bash", DEPLOY, "list"], capture_output=True, text=True, check=True)
    assert sorted(listed.stdout.split()) == JOBS


def test_cloudbuild_substitutions_are_declared_used_and_hold_no_project_or_secret():
    build = _cloudbuild()
    text = _read(CLOUDBUILD)
    declared = set(build["substitutions"])
    used = set(re.findall(r"\$\{(_[A-Z0-9_]+)\}", text)) | set(
        re.findall(r"\$(_[A-Z0-9_]+)", text))
    assert declared == used
    assert {"_REGION", "_BUCKET", "_IMAGE_TAG", "_REPOSITORY"} <= declared
    assert "PROJECT_ID=$PROJECT_ID" in build["options"]["env"]
    assert build["substitutions"]["_BUCKET"] == "" and build["substitutions"]["_IMAGE_TAG"] == ""
    for source in (text, _read(DEPLOY), _read(DOCKERFILE)):
        assert not re.search(r"--project[= ](?!\"?\$)", source)
        assert not re.search(r"BEGIN (RSA )?PRIVATE KEY|private_key|AIza[0-9A-Za-z_-]{20}", source)
        assert not re.search(r"projects/(?!PROJECT|my-project|\$)[a-z][-a-z0-9]{4,}", source)


# --------------------------------------------------------------------------- deploy.sh

FAKE_TOOL = r'''#!{python}
"""Stub of {name}: logs its argv; gcloud answers the few calls deploy.sh reads."""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["{name}", *args]) + "\n")
def opt(name):
    return next((a.split("=", 1)[1] for a in args if a.startswith("--" + name + "=")), None)
if "{name}" == "gcloud":
    if args[:3] == ["dataflow", "flex-template", "build"]:
        if os.environ.get("REAL_GCLOUD"):  # the real command, offline with --print-only
            sys.exit(subprocess.call([os.environ["REAL_GCLOUD"], *args]))
        with open(opt("metadata-file")) as handle:
            meta = json.load(handle)
        env = {{"serviceAccountEmail": opt("service-account-email"),
               "stagingLocation": opt("staging-location"), "tempLocation": opt("temp-location")}}
        print(json.dumps({{"image": opt("image"), "sdkInfo": {{"language": opt("sdk-language")}},
                          "metadata": meta, "defaultEnvironment": env}}))
    elif args[:2] == ["storage", "cp"]:
        target = os.path.join(os.environ["FAKE_GCS"], args[3][len("gs://"):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(args[2], target)
    elif args[:3] == ["dataflow", "jobs", "list"]:
        print(os.environ.get("FAKE_ACTIVE_JOB", ""))
    elif args[:3] == ["dataflow", "jobs", "describe"]:
        with open(os.environ["FAKE_STATES"]) as handle:
            states = handle.read().split()
        with open(os.environ["FAKE_STATES"], "w") as handle:
            handle.write("\n".join(states[1:]))
        print(states[0])
'''


@pytest.fixture
def deploy(tmp_path):
    """Runs templates/deploy.sh with stub docker and gcloud; returns (run, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "gcloud"):
        (bin_dir / name).write_text(FAKE_TOOL.format(python=sys.executable, name=name))
        (bin_dir / name).chmod(0o755)
    log, gcs = tmp_path / "calls.jsonl", tmp_path / "gcs"
    inherited = ("STREAMING_", "CLOUDSDK", "TEMPLATES_DIR", "DOCKERFILE", "IMAGE_TAG",
                 "SHORT_SHA", "SERVICE_ACCOUNT", "LAUNCHER_TAG", "FAKE_", "SOURCE_COMMIT",
                 "COMMIT_SHA")
    base = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    base.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_GCS=str(gcs),
        FAKE_STATES=str(tmp_path / "states"), PROJECT_ID="demo-project", REGION="europe-west1",
        BUCKET="demo-bucket", REPOSITORY="dataflow", IMAGE_TAG="abc123", POLL_SECONDS="0",
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud-config"), CLOUDSDK_CORE_DISABLE_PROMPTS="1")
    real = shutil.which("gcloud", path=os.environ["PATH"])
    if real:
        base["REAL_GCLOUD"] = real

    def run(*args, **env):
        log.write_text("")
        proc = subprocess.run(["bash", DEPLOY, *args], env=dict(base, **env),
                              capture_output=True, text=True, timeout=120)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return proc, calls

    return run, gcs


def _without_defaults(value):
    """Drops false and empty fields, which gcloud (proto JSON) leaves out of the spec."""
    if isinstance(value, dict):
        return {k: _without_defaults(v) for k, v in value.items() if v not in (False, "", [], {})}
    if isinstance(value, list):
        return [_without_defaults(v) for v in value]
    return value


def _image(job):
    return f"europe-west1-docker.pkg.dev/demo-project/dataflow/segment-recs/{job}:abc123"


def test_deploy_builds_smokes_and_pushes_one_image_per_template(deploy):
    run, _ = deploy
    proc, calls = run("images", SOURCE_COMMIT="0123abc")
    assert proc.returncode == 0, proc.stderr
    assert all("SOURCE_COMMIT=0123abc" in c and "TEMPLATE_VERSION=abc123" in c for c in calls)
    assert [c[:2] for c in calls] == [["docker", "build"]] * len(JOBS)
    for call, job in zip(calls, JOBS):
        assert call[call.index("--file") + 1] == "templates/Dockerfile"
        assert f"JOB={job}" in call and call[call.index("--tag") + 1] == _image(job)
        assert call[-1] == "."
    proc, calls = run("smoke")
    assert proc.returncode == 0, proc.stderr
    assert all("--network=none" in c and "/template/templates/smoke.sh" in c for c in calls)
    proc, calls = run("push")
    assert calls == [["docker", "push", _image(job)] for job in JOBS]


def test_deploy_publishes_a_template_spec_per_job_with_its_image_as_worker(deploy):
    run, gcs = deploy
    proc, calls = run("templates", SOURCE_COMMIT="0123ABC")
    assert proc.returncode == 0, proc.stderr
    builds = [c for c in calls if c[1:4] == ["dataflow", "flex-template", "build"]]
    assert len(builds) == len(JOBS)
    for build, job in zip(builds, JOBS):
        assert ("--enable-streaming-engine" in build) is TEMPLATES[job].streaming, job
    for job in JOBS:
        spec_file = gcs / "demo-bucket" / "templates" / job / "abc123.json"
        spec = json.loads(spec_file.read_text())
        assert spec["image"] == _image(job)
        assert spec["defaultEnvironment"]["sdkContainerImage"] == _image(job)
        assert spec["defaultEnvironment"]["serviceAccountEmail"] == (
            "dataflow-worker@demo-project.iam.gserviceaccount.com")
        assert spec["sdkInfo"]["language"] == "PYTHON"
        # What `pipelines.status --verify` compares with the runs (#19).
        assert spec["defaultEnvironment"]["additionalUserLabels"] == {
            "source_commit": "0123abc", "template_version": "abc123"}
        # gcloud keeps name, description and parameters of the metadata file (it drops
        # `streaming`; the job sets streaming itself and deploy.sh adds the engine flag).
        kept = {k: v for k, v in md.read_metadata(TEMPLATES[job]).items() if k != "streaming"}
        assert _without_defaults(spec["metadata"]) == _without_defaults(kept)
        assert (gcs / "demo-bucket" / "templates" / job / "latest.json").read_text() == (
            spec_file.read_text())
        try:
            from google.cloud import dataflow_v1beta3
        except ImportError:
            continue
        dataflow_v1beta3.ContainerSpec.from_json(spec_file.read_text(),
                                                 ignore_unknown_fields=False)


def test_deploy_fails_fast_without_configuration(deploy):
    run, _ = deploy
    proc, calls = run("templates", BUCKET="")
    assert proc.returncode != 0 and "set BUCKET" in proc.stderr and calls == []
    proc, _ = run("images", "no_such_job")
    assert proc.returncode != 0 and "no template 'no_such_job'" in proc.stderr


@pytest.fixture
def streaming_templates(tmp_path):
    """A copy of templates/ whose streaming template maps one renamed step."""
    root = tmp_path / "templates"
    shutil.copytree(os.path.join(REPO, "templates"), root,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert json.loads((root / "streaming_refresh" / "metadata.json").read_text())["streaming"]
    (root / "streaming_refresh" / "transform_name_mappings.json").write_text(
        json.dumps({"ReadOrders": "ReadEvents"}))
    return str(root)


def _runs(calls):
    return [c for c in calls if c[1:4] == ["dataflow", "flex-template", "run"]]


def test_streaming_none_does_nothing(deploy):
    run, _ = deploy
    proc, calls = run("streaming")
    assert proc.returncode == 0 and calls == []


def test_streaming_launch_refuses_a_second_job(deploy, streaming_templates):
    run, _ = deploy
    env = dict(TEMPLATES_DIR=streaming_templates, STREAMING_MODE="launch",
               STREAMING_PARAMETERS="events_subscription=projects/demo-project/subscriptions/o")
    proc, calls = run("streaming", **env)
    assert proc.returncode == 0, proc.stderr
    (launch,) = _runs(calls)
    assert launch[4] == "segment-recs-streaming-refresh" and "--update" not in launch
    assert ("--template-file-gcs-location=gs://demo-bucket/templates/streaming_refresh/"
            "abc123.json") in launch
    assert "--parameters=events_subscription=projects/demo-project/subscriptions/o" in launch
    proc, calls = run("streaming", FAKE_ACTIVE_JOB="2026-03-01_01_02_03-42", **env)
    assert proc.returncode != 0 and "already running" in proc.stderr and not _runs(calls)


def test_streaming_update_in_place_maps_renamed_transforms(deploy, streaming_templates):
    run, _ = deploy
    env = dict(TEMPLATES_DIR=streaming_templates, STREAMING_MODE="update")
    proc, calls = run("streaming", FAKE_ACTIVE_JOB="2026-03-01_01_02_03-42", **env)
    assert proc.returncode == 0, proc.stderr
    (update,) = _runs(calls)
    assert "--update" in update
    assert "--transform-name-mappings=ReadOrders=ReadEvents" in update
    proc, calls = run("streaming", **env)
    assert proc.returncode != 0 and "no running job" in proc.stderr and not _runs(calls)


def test_streaming_drain_waits_for_the_drain_then_relaunches(deploy, streaming_templates,
                                                              tmp_path):
    run, _ = deploy
    env = dict(TEMPLATES_DIR=streaming_templates, STREAMING_MODE="drain",
               FAKE_ACTIVE_JOB="2026-03-01_01_02_03-42")
    (tmp_path / "states").write_text("JOB_STATE_DRAINING\nJOB_STATE_DRAINING\nJOB_STATE_DRAINED")
    proc, calls = run("streaming", **env)
    assert proc.returncode == 0, proc.stderr
    verbs = [c[1:4] for c in calls]
    assert verbs == [["dataflow", "jobs", "list"], ["dataflow", "jobs", "drain"]] + [
        ["dataflow", "jobs", "describe"]] * 3 + [["dataflow", "flex-template", "run"]]
    assert "--update" not in _runs(calls)[0]
    (tmp_path / "states").write_text("JOB_STATE_FAILED")
    proc, calls = run("streaming", **env)
    assert proc.returncode != 0 and "not relaunching" in proc.stderr and not _runs(calls)
