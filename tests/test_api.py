"""The public Python API: the real functions, typed and documented, behind a light `import orchestrator`."""

from __future__ import annotations

import inspect
import subprocess
import sys


def test_import_is_light_and_every_public_name_is_the_real_documented_function():
    probe = (
        "import sys, inspect, orchestrator\n"
        "assert not {'torch', 'ray', 'transformers', 'deepspeed'} & set(sys.modules), 'import orchestrator loaded a heavy module'\n"
        "for name in orchestrator.__all__:\n"
        "    value = getattr(orchestrator, name)\n"
        "    assert value.__doc__ and value.__doc__.strip(), name\n"
        "    if inspect.isfunction(value):\n"
        "        assert value.__module__ != 'orchestrator' or name in ('plan',), (name, value.__module__)\n"
        "        assert 'options' not in inspect.signature(value).parameters, name\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_plan_stays_the_function_after_its_module_is_imported():
    import orchestrator
    import orchestrator.plan  # noqa: F401  (binding the submodule must not replace the function)
    from orchestrator.plan import build_plan  # noqa: F401

    assert inspect.isfunction(orchestrator.plan)
    assert list(inspect.signature(orchestrator.plan).parameters) == ["spec"]


def test_signatures_are_the_real_ones():
    import orchestrator

    assert {"local", "run_id", "resume"} <= set(inspect.signature(orchestrator.run).parameters)
    assert {"submission_id", "address", "follow"} <= set(inspect.signature(orchestrator.logs).parameters)
    assert {"address", "show_all"} <= set(inspect.signature(orchestrator.list_jobs).parameters)
    assert {"local", "resume"} <= set(inspect.signature(orchestrator.tune).parameters)


def test_the_command_keeps_argparse_exit_codes():
    """`--help` exits 0 and a usage error 2, through the console entry that skips module teardown."""
    for argv, code in ((["--help"], 0), (["no-such-command"], 2), (["validate", "/no/such.yaml"], 2)):
        result = subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == code, (argv, result.returncode, result.stderr[-500:])
