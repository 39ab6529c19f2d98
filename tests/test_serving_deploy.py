"""The API's container and its Cloud Run deploy step (templates/deploy.sh with stub CLIs)."""
import os
import re
import subprocess
import sys

import yaml

from tests.test_templates import CLOUDBUILD, REPO, deploy  # noqa: F401 (the stub fixture)

SERVICE_IMAGE = "europe-west1-docker.pkg.dev/demo-project/dataflow/segment-recs/serve:abc123"
STORE = "redis://10.0.0.3:6379/0"


def test_service_steps_do_nothing_unless_asked(deploy):  # noqa: F811
    run, _ = deploy
    for step in ("service-image", "service"):
        proc, calls = run(step)
        assert proc.returncode == 0, proc.stderr
        assert calls == [] and "SERVICE_MODE=none" in proc.stdout


def test_service_image_is_built_from_its_own_dockerfile_and_pushed(deploy):  # noqa: F811
    run, _ = deploy
    proc, calls = run("service-image", SERVICE_MODE="deploy")
    assert proc.returncode == 0, proc.stderr
    assert calls == [["docker", "build", "--file", "templates/serve/Dockerfile", "--tag",
                      SERVICE_IMAGE, "."], ["docker", "push", SERVICE_IMAGE]]


def test_service_is_deployed_to_cloud_run_over_the_store(deploy):  # noqa: F811
    run, _ = deploy
    proc, calls = run("service", SERVICE_MODE="deploy", SERVING_STORE=STORE,
                      SERVICE_VPC_CONNECTOR="recs-connector")
    assert proc.returncode == 0, proc.stderr
    [call] = calls
    assert call[:4] == ["gcloud", "run", "deploy", "segment-recs-api"]
    for flag in ("--project=demo-project", "--region=europe-west1", f"--image={SERVICE_IMAGE}",
                 f"--set-env-vars=SERVING_STORE={STORE},SERVING_WORKERS=2",
                 "--vpc-connector=recs-connector", "--cpu=2",
                 "--no-allow-unauthenticated", "--port=8080"):
        assert flag in call, flag


def test_service_deploy_fails_fast_without_its_configuration(deploy):  # noqa: F811
    run, _ = deploy
    proc, calls = run("service", SERVICE_MODE="deploy", SERVICE_VPC_CONNECTOR="c")
    assert proc.returncode == 1 and "set SERVING_STORE" in proc.stderr and calls == []
    proc, calls = run("service", SERVICE_MODE="deploy", SERVING_STORE="10.0.0.3:6379",
                      SERVICE_VPC_CONNECTOR="c")
    assert proc.returncode == 1 and "redis://" in proc.stderr and calls == []
    proc, calls = run("service", SERVICE_MODE="sometimes")
    assert proc.returncode == 1 and "none or deploy" in proc.stderr


def test_cloudbuild_runs_the_service_steps_after_the_templates():
    with open(CLOUDBUILD) as handle:
        steps = yaml.safe_load(handle)["steps"]
    ids = [s["id"] for s in steps]
    assert ids[-2:] == ["service-image", "service"]
    assert steps[-2]["args"] == ["templates/deploy.sh", "service-image"]
    assert steps[-1]["args"] == ["templates/deploy.sh", "service"]


def _pins(text):
    return dict(re.findall(r"^\s*\"?([A-Za-z0-9_.-]+)==([^\"\s,]+)", text, re.M))


def test_service_image_pins_equal_setup_py():
    with open(os.path.join(REPO, "templates", "serve", "requirements.txt")) as handle:
        wanted = _pins(handle.read())
    with open(os.path.join(REPO, "setup.py")) as handle:
        pinned = _pins(handle.read())
    assert wanted and all(pinned.get(name) == version for name, version in wanted.items()), (
        {n: (v, pinned.get(n)) for n, v in wanted.items() if pinned.get(n) != v})


def test_the_service_imports_without_beam_or_the_warehouse():
    """What the image holds (models/ and pipelines/serve.py) is enough to start the app."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('apache_beam', 'transforms', 'duckdb'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from pipelines import serve\n"
            "from models.serving import ServingStore\n"
            "serve.create_app(ServingStore('redis://127.0.0.1:1/0'))\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('pipelines.'))))\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-1:] == ["ok"], proc.stderr[-2000:]
    with open(os.path.join(REPO, "templates", "serve", "Dockerfile")) as handle:
        dockerfile = handle.read()
    assert "COPY models models" in dockerfile
    for module in lines[0].split():  # every pipelines module the service imports is copied
        assert module.replace(".", "/") + ".py" in dockerfile, module
    assert "COPY transforms" not in dockerfile and "apache-beam" not in dockerfile
