"""The OpenAI-compatible endpoint's settings as every caller of it reads them: whether one is
configured, and its API key. The decision layer's model client and the model-backed tools (tools/draft.py)
ask the same endpoint with the same key; neither imports the other, so this lives below both."""

from __future__ import annotations

from streamagent.config import Settings


def configured(settings: Settings) -> bool:
    """An endpoint is set (OPENAI_BASE_URL): without one, no model is asked."""
    return bool(settings.openai_base_url.strip())


def api_key(settings: Settings) -> str:
    """The key from OPENAI_API_KEY or the file STREAMAGENT_OPENAI_API_KEY_FILE names."""
    if settings.openai_api_key_file is not None:
        return settings.openai_api_key_file.read_text(encoding="utf-8").strip()
    # Local servers (vLLM, Ollama, llama.cpp) take any key; the openai client insists on one.
    return settings.openai_api_key.get_secret_value() or "no-key"
