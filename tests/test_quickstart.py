"""docs/quickstart.md, executed: every ```bash block, in order, in one shell (set -e), as a newcomer
would type it. Isolation only: HOME and Ray's temp root are fresh, and the head's ports are free
ones (the session's own Ray holds the defaults). Its first run is also the user's path for `export`: a
local run with no storage (its own Ray and SeaweedFS server), exported as an adapter and merged, and
exports that cannot be made exit 2 and write nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.ray_head import free_ports, stop_group

pytestmark = pytest.mark.slow
QUICKSTART = REPO / "docs" / "quickstart.md"


def quickstart_script() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", QUICKSTART.read_text(), flags=re.S)
    assert len(blocks) >= 5
    return "\n".join(blocks)


# After the page, in the same shell: exports that cannot be made, against the store the page left serving (a store
# started again on the same directory right after the group is killed may find its ports taken).
BAD_EXPORTS = """
orchestrator export s3://orchestrator/runs/local-smoke/no-such-run --out ~/x 2> ~/missing.err && exit 90 || echo "missing run export: exit $?"
orchestrator export s3://orchestrator/runs/local-smoke/first --out ~/adapters/first 2> ~/taken.err && exit 91 || echo "taken directory export: exit $?"
"""


def test_every_quickstart_command_runs(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="orq-", dir="/tmp"))  # short: Ray's socket paths live below it
    gcs_port, dashboard_port = free_ports(2)
    script = quickstart_script().replace("127.0.0.1:8265", f"127.0.0.1:{dashboard_port}") + BAD_EXPORTS
    drop = ("AWS_", "RAY_ADDRESS", "RAY_AUTH", "ORCHESTRATOR_STORE_DIR", "ORCHESTRATOR_FAULTS", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), RAY_HEAD_PORT=str(gcs_port), RAY_DASHBOARD_PORT=str(dashboard_port))
    log = tmp_path / "quickstart.log"
    with open(log, "w") as sink:  # a file, not a pipe: the background head and store keep their stderr open
        shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, start_new_session=True,
                                 stdout=sink, stderr=subprocess.STDOUT)
    try:
        shell.wait(timeout=1500)
    finally:
        stop_group(shell.pid)  # the head (ray start --block) and the store were started in the shell's group
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = log.read_text()
    assert shell.returncode == 0, output[-4000:]
    assert "model ready: trainable" in output and "step    100/100 | loss" in output and "ETA" in output
    assert "final adapter: s3://orchestrator/runs/local-smoke/first/adapter" in output
    assert list((home / ".cache" / "orchestrator" / "store").rglob("*")), "the store keeps its data where the user finds it"
    assert "merged model checked against the trained model's logits" in output
    assert re.search(r"cluster-local-run-\S+: SUCCEEDED", output), output[-3000:]
    assert "local-search" in output and "best" in output.lower()
    _assert_merged_model_is_base_plus_adapter(home, home / "models" / "first", home / "adapters" / "first")
    # Exports that cannot be made exit 2 with one line, and write nothing.
    missing = (home / "missing.err").read_text()
    assert "missing run export: exit 2" in output and missing.count("\n") == 1 and "no complete run there" in missing, missing
    assert not (home / "x").exists()
    taken = (home / "taken.err").read_text()
    assert "taken directory export: exit 2" in output and "already exists and is not an empty directory" in taken, taken


def _assert_merged_model_is_base_plus_adapter(home: Path, merged: Path, adapter: Path) -> None:
    """Both exports load with stock transformers / PEFT alone and give the same logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = next((home / ".cache" / "orchestrator" / "models").glob("tiny-llama*"))  # what the user's run built
    ids = torch.arange(3, 20)[None]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    full = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
