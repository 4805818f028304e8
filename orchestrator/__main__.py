from orchestrator.cli import console_entry

console_entry()
