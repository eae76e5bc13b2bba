"""Chat with the tuned model in the notebook: an ipywidgets box, tokens streamed as they are generated.

The conversation goes through the tokenizer's chat template (the one training used), generation
runs in a thread feeding transformers' `TextIteratorStreamer`, and the transcript updates token
by token. Nothing here waits for input: in a script or a headless nbval run the widget is built,
one line says it is interactive in Colab, and the cell ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from html import escape
from pathlib import Path
from typing import Any

__all__ = ["ChatUI", "chat_widget", "data_system_prompt"]

_STYLE = {
    "user": "background:#e8eef7;border-radius:8px;padding:6px 10px;margin:4px 0 4px 15%;",
    "assistant": "background:#f1f1f1;border-radius:8px;padding:6px 10px;margin:4px 15% 4px 0;",
    "system": "color:#777;font-size:85%;margin:2px 0;",
}


class ChatUI:
    """A chat box for a causal LM: `.widget` to display, `.send(text)` to ask (streams), `.reset()` to clear."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        title: str = "Chat with the tuned model",
    ):
        import ipywidgets as w

        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.messages: list[dict[str, str]] = []
        self._busy = threading.Lock()
        self.title = w.HTML(f"<b>{escape(title)}</b>")
        self.transcript = w.HTML(layout=w.Layout(max_height="420px", overflow_y="auto", border="1px solid #ddd",
                                                 padding="6px", width="100%"))
        self.box = w.Textarea(placeholder="Type a message, then press Send", layout=w.Layout(width="70%", height="60px"))
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.reset_button = w.Button(description="Reset", icon="refresh", tooltip="Start a new conversation")
        self.status = w.HTML()
        self.send_button.on_click(self._on_send)
        self.reset_button.on_click(lambda _b: self.reset())
        self.widget = w.VBox([self.title, self.transcript, w.HBox([self.box, self.send_button, self.reset_button]),
                              self.status])
        self._render()

    # a ChatUI displays as its widget (`display(ui)` or a cell ending in `ui`)
    def _repr_mimebundle_(self, **kwargs) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def conversation(self) -> list[dict[str, str]]:
        """Return the messages sent to the chat template: the system prompt (if any) and the turns so far."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def _render(self, partial: str | None = None) -> None:
        parts = [f"<div style='{_STYLE['system']}'>system: {escape(self.system)}</div>"] if self.system else []
        turns = self.messages + ([{"role": "assistant", "content": partial + " ▌"}] if partial is not None else [])
        for m in turns:
            text = escape(m["content"]).replace("\n", "<br>")
            parts.append(f"<div style='{_STYLE[m['role']]}'>{text}</div>")
        if not turns:
            parts.append("<div style='color:#999'>(no messages yet)</div>")
        self.transcript.value = "".join(parts)

    def stream(self, text: str) -> Iterator[str]:
        """Yield the reply to `text` piece by piece (the transcript updates as it goes); the turn is then kept."""
        from transformers import TextIteratorStreamer

        from .evaluation import render_prompt, stop_token_ids

        self.messages.append({"role": "user", "content": text})
        prompt = render_prompt(self.tokenizer, self.conversation())
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        enc = enc.to(next(self.model.parameters()).device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs: dict[str, Any] = dict(
            **enc,
            streamer=streamer,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(self.tokenizer, self.model) or None,
        )
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=0.95)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self.model.generate(**kwargs)
            except BaseException as e:  # surfaced below, in the caller's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        reply = ""
        for piece in streamer:
            reply += piece
            self._render(reply)
            yield piece
        thread.join()
        if errors:
            self.messages.pop()
            self._render()
            raise errors[0]
        self.messages.append({"role": "assistant", "content": reply.strip()})
        self._render()

    def send(self, text: str) -> str:
        """Return the model's whole reply to `text` after streaming it into the transcript."""
        text = (text or "").strip()
        if not text:
            return ""
        if not self._busy.acquire(blocking=False):
            self.status.value = "<i>still answering the last message…</i>"
            return ""
        try:
            self.send_button.disabled = True
            self.status.value = "<i>generating…</i>"
            return "".join(self.stream(text)).strip()
        finally:
            self.send_button.disabled = False
            self.status.value = ""
            self._busy.release()

    def _on_send(self, _button=None) -> None:
        text, self.box.value = self.box.value, ""
        try:
            self.send(text)
        except Exception as e:  # show it in the widget: a button callback's traceback is easy to miss
            self.status.value = f"<span style='color:#cc3311'>✗ {escape(type(e).__name__)}: {escape(str(e))}</span>"

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages.clear()
        self.status.value = ""
        self._render()


def data_system_prompt(run) -> str | None:
    """Return the system prompt the training rows used (data.system_prompt, else the first row's system turn)."""
    if run.cfg.get("data", {}).get("system_prompt"):
        return run.cfg["data"]["system_prompt"]
    try:
        from .data import load_prepared

        first = load_prepared(run)["validation"][0]["messages"]
    except Exception:  # no processed data: chat without a system prompt
        return None
    return first[0]["content"] if first and first[0]["role"] == "system" else None


def chat_widget(
    run, *, adapter_dir: Path | None = None, max_new_tokens: int = 128, temperature: float = 0.0, show: bool = True
) -> ChatUI:
    """Return a ChatUI on the tuned model (the adapter 04_export will ship, unless adapter_dir), displayed in a notebook."""
    from .display import in_notebook
    from .evaluation import export_adapter_source, load_tuned

    if adapter_dir is None:
        adapter_dir, why = export_adapter_source(run)
    else:
        why = str(adapter_dir)
    model, tok = load_tuned(run, adapter_dir)
    ui = ChatUI(model, tok, system=data_system_prompt(run), max_new_tokens=max_new_tokens, temperature=temperature,
                title=f"Chat with {run.name}: {why}")
    if show and in_notebook():
        from IPython.display import display

        from .environment import enable_colab_widgets

        enable_colab_widgets()  # Colab's built-in manager renders ipywidgets 7 only; this lab ships 8
        display(ui.widget)
        print(f"Chatting with {why}. Reset starts a new conversation.")
    else:
        print(f"Chat widget ready ({why}); it is interactive in Colab or Jupyter — this run does not wait for input.")
    return ui
