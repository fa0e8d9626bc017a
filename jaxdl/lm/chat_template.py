"""Chat templates rendered as transformers renders them (``apply_chat_template``).

A model's chat template is Jinja2 source from its ``tokenizer_config.json`` (or
``chat_template.jinja``, or a GGUF's ``tokenizer.chat_template``). transformers compiles it
in a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``{% generation %}`` block tag, a ``tojson`` filter that
does not escape HTML, and ``raise_exception`` / ``strftime_now`` globals; then renders it
with ``messages``, ``add_generation_prompt`` and the special tokens (``bos_token``,
``eos_token``, ...). The same here, so the same conversation gives the same text, and so
the same ids.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from jaxdl.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached: a data set renders thousands of conversations)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text; it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise UserError(
            f"chat_template: not valid Jinja2 (line {err.lineno}: {err.message}). Fix: restore "
            "the model's tokenizer_config.json or chat_template.jinja."
        ) from err


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """A conversation as plain {"role", "content"} dicts, or one UserError naming the problem."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise UserError(
            f"{where}: expected a non-empty list of {{'role', 'content'}} objects, found "
            f"{type(messages).__name__}. Fix: pass [{{'role': 'user', 'content': '...'}}, ...]."
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
            raise UserError(
                f"{where}[{i}]: expected an object with 'role' and 'content', found "
                f"{message!r:.80}. Fix: give every message both keys."
            )
        if message["role"] not in ROLES:
            raise UserError(
                f"{where}[{i}].role: expected one of {list(ROLES)}, found {message['role']!r}. "
                "Fix: use system, user, assistant or tool."
            )
        if not isinstance(message["content"], str):
            raise UserError(
                f"{where}[{i}].content: expected a string, found "
                f"{type(message['content']).__name__}. Fix: give the message's text as a string."
            )
        out.append({str(k): v for k, v in message.items()})
    return out


def render(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str | None] | None = None,
) -> str:
    """The conversation as the template writes it."""
    import jinja2

    try:
        return compile_template(source).render(
            messages=check_messages(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in (special_tokens or {}).items()},
        )
    except jinja2.exceptions.TemplateError as err:
        raise UserError(
            f"chat_template: rendering the conversation failed ({err}). Fix: check the "
            "messages against what the model's template accepts (roles, their order)."
        ) from err
