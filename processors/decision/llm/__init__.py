"""The model decides: an OpenAI-compatible chat model picks each step, on context code prepared."""
