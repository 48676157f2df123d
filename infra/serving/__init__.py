"""`opdflow serve`: an OpenAI-compatible server over a transformers model."""
