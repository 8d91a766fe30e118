"""The causal LM side of distillation: Gemma 3 / Qwen3 decoders in JAX, decoding,
scoring, LLM reranking and the `embedder distill` jobs (Gecko's FRet, Gemini's
LLM filtering)."""
