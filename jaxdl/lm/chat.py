"""`jaxdl chat`: talk to an imported or fine-tuned chat model, in the terminal.

    jaxdl chat --workdir DIR --prompt "What is the capital of France?" --temperature 0

The conversation is rendered with the model's own chat template (as transformers renders
it), the reply streams token by token and stops at the template's end-of-turn token (the
ids of generation_config.json's ``eos_token_id`` and the tokenizer's ``eos_token``).
Only the reply goes to stdout; without ``--prompt`` the session is interactive (one line a
turn; an empty line, ``/exit`` or end of input ends it), the prompt marker on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, TextIO

import jax

from jaxdl.errors import UserError
from jaxdl.lm.generate import decoding_params, stream
from jaxdl.lm.tokenizer import JsonTokenizer, load_tokenizer


class Chat:
    """A workdir's model, tokenizer and sampling settings; `reply` streams one answer."""

    def __init__(
        self,
        workdir: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int = 0,
    ):
        from jaxdl.checkpoint.load import load_run_config
        from jaxdl.checkpoint.read import load_params

        cfg = load_run_config(workdir)
        tokenizer = load_tokenizer(workdir)
        if not isinstance(tokenizer, JsonTokenizer) or not tokenizer.chat_template:
            raise UserError(
                f"--workdir: {workdir}'s tokenizer has no chat template, so there is no "
                "conversation format to follow. Fix: chat with an instruction-tuned model's "
                "workdir (one imported with its tokenizer_config.json or GGUF chat template), "
                "or use `jaxdl generate` to continue plain text."
            )
        if not tokenizer.eos_ids:
            raise UserError(
                f"--workdir: {workdir}'s tokenizer names no end-of-turn token (no eos_token, no "
                "generation_config.json eos_token_id), so a reply would never stop. Fix: set "
                "eos_token_id in its generation_config.json."
            )
        if temperature < 0:
            raise UserError(
                f"--temperature: expected >= 0 (0 = greedy), found {temperature}. "
                "Fix: pass 0 or a positive value."
            )
        self.model_cfg = dict(cfg.model)
        self.tokenizer = tokenizer
        # once, not every turn; in the layout that decodes fastest
        self.params = decoding_params(self.model_cfg, load_params(workdir))
        self.sampling = dict(
            greedy=temperature == 0,
            temperature=temperature or 1.0,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        self.rng = jax.random.PRNGKey(seed)
        self.turn = 0

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """The assistant's answer to `messages`, as text pieces while it is decoded."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        self.turn += 1
        tokens = stream(
            self.model_cfg,
            self.params,
            prompt,
            rng=jax.random.fold_in(self.rng, self.turn),
            eos_ids=self.tokenizer.eos_ids,
            **self.sampling,
        )
        ids: list[int] = []
        shown = ""
        for token in tokens:
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                continue
            yield text[len(shown) :]
            shown = text
        text = self.tokenizer.decode(ids) if ids else ""
        if text != shown:
            yield text[len(shown) :]


def run_chat(
    workdir: str,
    *,
    prompt: str | None = None,
    system: str | None = None,
    out: TextIO = sys.stdout,
    inp: TextIO = sys.stdin,
    err: TextIO = sys.stderr,
    **sampling: Any,
) -> None:
    """One answer to `prompt`, or an interactive session reading `inp`."""
    chat = Chat(workdir, **sampling)
    history = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        if not prompt.strip():
            raise UserError("--prompt: expected some text, found none. Fix: pass a question.")
        _answer(chat, [*history, {"role": "user", "content": prompt}], out)
        return
    while True:
        err.write("> ")
        err.flush()
        line = inp.readline()
        if not line or line.strip() in ("", "/exit", "/quit"):
            return
        history.append({"role": "user", "content": line.rstrip("\n")})
        history.append({"role": "assistant", "content": _answer(chat, history, out)})


def _answer(chat: Chat, messages: list[dict[str, str]], out: TextIO) -> str:
    pieces = []
    for piece in chat.reply(messages):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    out.flush()
    return "".join(pieces)
