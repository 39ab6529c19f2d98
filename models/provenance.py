"""What made a run: the code's commit, the template (image) version, the config and the model.

Recorded in every ``pipeline_runs`` row (#19) so that a published table can be
traced back to the build that produced it, and so that ``python -m
pipelines.status --verify`` can say where the deployed template, the last run
and the published rows disagree. A run that reported success while an old
build or an old model kept running is the failure this is for.

The commit and template version come from the image: ``templates/Dockerfile``
bakes the build's ``SOURCE_COMMIT`` and ``TEMPLATE_VERSION`` (the image tag)
into its environment. Outside an image the commit is read from git when the
code is a checkout, else ``unknown``; the template version is then ``local``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Any, Dict, Mapping, Optional

COMMIT_ENV = "SOURCE_COMMIT"
TEMPLATE_ENV = "TEMPLATE_VERSION"
UNKNOWN = "unknown"
LOCAL = "local"
FIELDS = ("source_commit", "template_version", "config_digest", "model_version")


def git_commit(directory: Optional[str] = None) -> Optional[str]:
    """The checkout's HEAD commit (``-dirty`` when tracked files changed), or None outside git."""
    where = directory or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", where, "diff-index", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def source_commit(env: Mapping[str, str] = os.environ) -> str:
    """The commit the running code was built from: the image's, else git's, else unknown."""
    return env.get(COMMIT_ENV) or git_commit() or UNKNOWN


def template_version(env: Mapping[str, str] = os.environ) -> str:
    """The image tag the running code came in (``local`` outside a built image)."""
    return env.get(TEMPLATE_ENV) or LOCAL


def config_digest(config: Any) -> str:
    """The first 16 hex digits of the SHA-256 of the configuration, every field spelled out.

    Two runs with the same digest applied the same weights, rules and gates,
    whichever YAML file (or none) they were given.

    >>> from models.config import DEFAULT_CONFIG
    >>> config_digest(DEFAULT_CONFIG) == config_digest(DEFAULT_CONFIG.replace())
    True
    >>> config_digest(DEFAULT_CONFIG) == config_digest(DEFAULT_CONFIG.replace(
    ...     segment_attributes=("make",)))
    False
    """
    from models.config_file import config_to_dict
    text = json.dumps(config_to_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(config: Any, model_version: Optional[str] = None,
               env: Mapping[str, str] = os.environ) -> Dict[str, Optional[str]]:
    """The four ``pipeline_runs`` provenance columns of a run."""
    return {"source_commit": source_commit(env), "template_version": template_version(env),
            "config_digest": config_digest(config), "model_version": model_version}
