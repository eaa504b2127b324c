"""YAML scenarios <-> validated Scenario objects, with errors that name file:line and field.

A scenario is a conversation as a user has it (ask, answer, regenerate, edit an earlier question) or,
for models without a chat template and for long prompts, raw token sequences. One import for all of
it: what a scenario is (steps.py), reading it (reader.py), writing it back (writer.py).
"""

from .checks import resolve_turn
from .reader import BUNDLED, discover, load
from .steps import (
    DEFAULT_SETTINGS,
    MAIN,
    Edit,
    Expect,
    Generate,
    Message,
    Parallel,
    Regenerate,
    Request,
    Sampling,
    Scenario,
    ScenarioError,
    SlotAction,
    Splice,
    Step,
    Switch,
    TemplateVars,
    Tokens,
    ToolCall,
    Truncate,
    surely_after,
)
from .writer import dump, reload, to_document

__all__ = [
    "BUNDLED", "DEFAULT_SETTINGS", "Edit", "Expect", "Generate", "MAIN", "Message", "Parallel", "Regenerate",
    "Request", "Sampling", "Scenario", "ScenarioError", "SlotAction", "Splice", "Step", "Switch",
    "TemplateVars", "Tokens", "ToolCall", "Truncate", "discover", "dump", "load", "reload", "resolve_turn",
    "surely_after", "to_document",
]
