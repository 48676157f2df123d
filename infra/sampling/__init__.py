"""Samplers behind `rollout.backend`: the registry, the native CUDA-graph sampler, the OpenAI-compatible client, vLLM and its process watcher."""
