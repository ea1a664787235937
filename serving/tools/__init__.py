"""Tool calling: formats per model family (`parsers`), following them while streaming
(`stream`), and tools into the chat template and `tool_choice` into a constraint
(`render`)."""

from serving.tools.parsers import (
    FORMATS,
    ParsedCall,
    ParsedOutput,
    ToolCallFormat,
    detect_format,
    format_named,
)
from serving.tools.render import ToolChoice, template_inputs, template_supports_tools, tool_guide
from serving.tools.stream import StreamDelta, ToolCallDelta, ToolCallStream

__all__ = [
    "FORMATS",
    "ParsedCall",
    "ParsedOutput",
    "StreamDelta",
    "ToolCallDelta",
    "ToolCallFormat",
    "ToolCallStream",
    "ToolChoice",
    "detect_format",
    "format_named",
    "template_inputs",
    "template_supports_tools",
    "tool_guide",
]
