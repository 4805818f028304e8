"""The docs cannot drift: the generated reference is current, the JSON Schema accepts every shipped
job and rejects a broken one, and the docs link only to files that exist."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys

import jsonschema
import pytest
import yaml

from orchestrator.spec import JobSpec
from orchestrator.spec_reference import markdown
from tests.helpers import REPO

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(subprocess.run([sys.executable, "-m", "orchestrator", "schema"], capture_output=True, text=True,
                                       check=True).stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_reference_is_generated_from_the_current_schema():
    assert (REPO / "docs" / "reference.md").read_text() == markdown(), \
        "docs/reference.md is stale: orchestrator schema --markdown > docs/reference.md"
    for field in JobSpec.model_fields:
        assert f"`{field}`" in markdown()


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_schema_accepts_every_shipped_job(job):
    assert list(_validator().iter_errors(yaml.safe_load(job.read_text()))) == []


@pytest.mark.parametrize("change, where", [
    (lambda s: s["train"].update(batch_sise=4), "batch_sise"),
    (lambda s: s["adapter"].update(r=0), "0"),
    (lambda s: s["adapter"].update(method="vera", alpha=16), "alpha"),
    (lambda s: s.pop("model"), "model"),
    (lambda s: s["scaling"].update(placement_strategy="ANYWHERE"), "ANYWHERE"),
])
def test_schema_rejects_a_broken_job(change, where):
    spec = yaml.safe_load((REPO / "jobs" / "local-smoke.yaml").read_text())
    change(spec)
    errors = list(_validator().iter_errors(spec))
    assert errors and any(where in e.message or where in str(list(e.path)) for e in errors)


def test_every_relative_link_in_the_docs_exists():
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
