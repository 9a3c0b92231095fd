"""Progress lines go through the standard logging module (issue 18.5)."""

import ast
import logging
from pathlib import Path

import pytest

from scope_ray import logs

PACKAGE = Path(logs.__file__).parent


@pytest.fixture
def fresh_logger():
    """The scope_ray logger as a new process has it, restored afterwards (set-up is process-wide)."""
    logger = logging.getLogger(logs.LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_lines_are_info_records_and_setup_prints_each_once_without_control_codes(fresh_logger, capsys, caplog):
    with caplog.at_level(logging.INFO, logger=logs.LOGGER):
        logs.info("[extract] before set-up")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (logs.LOGGER, logging.INFO, "[extract] before set-up")]  # a record any logging config can route
    assert capsys.readouterr().out == ""  # a library prints nothing until logging is configured
    logs.setup()
    logs.setup()  # each CLI command and each worker calls it: still one handler
    logs.info("\x1b[33m(raylet)\x1b[0m [train-sae] step 1/2\r")
    logs.worker_info("[train-sae] step 2/2")
    assert capsys.readouterr().out == "(raylet) [train-sae] step 1/2\n[train-sae] step 2/2\n"


def test_setup_writes_to_the_stdout_current_at_each_line(fresh_logger, monkeypatch):
    """A redirect made after set-up (pytest's capture, a notebook's cell output) gets the lines."""
    import io
    import sys

    logs.setup()
    later = io.StringIO()
    monkeypatch.setattr(sys, "stdout", later)
    logs.info("after the redirect")
    assert later.getvalue() == "after the redirect\n"


def test_plain_keeps_text_tabs_and_newlines():
    assert logs.plain("a\tb\nc\x1b[2K\x1b[1A\x07") == "a\tb\nc"
    # A window title and a hyperlink (OSC) go with their payload; the link's text stays.
    assert logs.plain("\x1b]0;title\x07ok \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\") == "ok link"


def test_no_function_in_the_package_logs_with_print():
    """Every ``log`` parameter defaults to logs.info (a stage called from Python logs through logging)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                    + node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "log" and isinstance(default, ast.Name) and default.id == "print":
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert found == []
